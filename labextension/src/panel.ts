import {
  SidePanel,
  ToolbarButton,
  refreshIcon
} from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  ILineagePayload,
  ISetRow,
  ISetsPayload,
  requestAPI
} from './handler';
import { storeIcon } from './icons';

/** `1536` -> `1.5 KiB`. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** An ISO timestamp in the browser's locale (the raw text when it does not parse). */
export function formatCreated(created: string): string {
  const date = new Date(created);
  return isNaN(date.getTime()) ? created : date.toLocaleString();
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function table(headers: string[], rows: (string | HTMLElement)[][]): HTMLTableElement {
  const node = element('table', 'mm-store-table');
  const head = node.createTHead().insertRow();
  for (const header of headers) {
    head.appendChild(element('th', '', header));
  }
  const body = node.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const cell of row) {
      const td = tr.insertCell();
      if (typeof cell === 'string') {
        td.textContent = cell;
      } else {
        td.appendChild(cell);
      }
    }
  }
  return node;
}

/**
 * The body of the "Model store" side panel: the store path, a table of its
 * model sets and, after a click on a set name, that set's lineage.
 */
export class StoreBrowser extends Widget {
  constructor() {
    super();
    this.addClass('mm-store-browser');
    this.node.append(this._path, this._message, this._sets, this._lineage);
  }

  /** The name whose lineage is shown, or null. */
  get selected(): string | null {
    return this._selected;
  }

  /** Fetch the list of sets (and the shown lineage) again. */
  async refresh(): Promise<void> {
    this._showMessage('Loading…');
    let payload: ISetsPayload;
    try {
      payload = await requestAPI<ISetsPayload>('sets');
    } catch (error) {
      this._path.textContent = '';
      this._sets.replaceChildren();
      this._showMessage(`Cannot list the model store: ${(error as Error).message}`, true);
      return;
    }
    this._path.textContent = `Store: ${payload.store}`;
    this._path.title = payload.store;
    this._renderSets(payload.sets);
    if (payload.sets.length === 0) {
      this._showMessage(
        payload.exists
          ? 'The store holds no model sets yet.'
          : 'No store here yet: save a set with %%modelset save NAME to create it.'
      );
    } else {
      this._showMessage('');
    }
    const names = new Set(payload.sets.map(row => row.name));
    if (this._selected !== null && names.has(this._selected)) {
      await this.showLineage(this._selected);
    } else {
      this._clearLineage();
    }
  }

  /** Show the versions of `name` (base → derived, approach, models, bytes). */
  async showLineage(name: string): Promise<void> {
    this._selected = name;
    const heading = element('div', 'mm-store-heading');
    heading.appendChild(element('span', '', `Lineage of ${name}`));
    const close = element('button', 'mm-store-close jp-Button', '×');
    close.title = 'Hide the lineage';
    close.onclick = () => this._clearLineage();
    heading.appendChild(close);
    let payload: ILineagePayload;
    try {
      payload = await requestAPI<ILineagePayload>('lineage', { name });
    } catch (error) {
      this._lineage.replaceChildren(
        heading,
        element('div', 'mm-store-message mm-store-error', (error as Error).message)
      );
      return;
    }
    if (this._selected !== name) {
      return; // another set was clicked meanwhile
    }
    const rows = payload.versions.map(v => [
      `v${v.version}`,
      v.base === null ? '—' : `v${v.base} → v${v.version}`,
      v.approach === v.requested ? v.approach : `${v.approach} (${v.requested})`,
      String(v.models),
      formatBytes(v.bytes)
    ]);
    this._lineage.replaceChildren(
      heading,
      table(['version', 'base → derived', 'approach', 'models', 'size'], rows)
    );
  }

  /** Every time the panel opens, the list is fetched again. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this.refresh();
  }

  private _renderSets(sets: ISetRow[]): void {
    if (sets.length === 0) {
      this._sets.replaceChildren();
      return;
    }
    const rows = sets.map(row => {
      const link = element('button', 'mm-store-link', row.name);
      link.title = `Show the lineage of ${row.name}`;
      link.onclick = () => void this.showLineage(row.name);
      return [
        link,
        `v${row.version}`,
        row.approach,
        String(row.models),
        formatBytes(row.bytes),
        formatCreated(row.created)
      ];
    });
    this._sets.replaceChildren(
      table(['name', 'version', 'approach', 'models', 'size', 'created'], rows)
    );
  }

  private _clearLineage(): void {
    this._selected = null;
    this._lineage.replaceChildren();
  }

  private _showMessage(text: string, error = false): void {
    this._message.textContent = text;
    this._message.classList.toggle('mm-store-error', error);
    this._message.hidden = text === '';
  }

  private _selected: string | null = null;
  private _path = element('div', 'mm-store-path');
  private _message = element('div', 'mm-store-message');
  private _sets = element('div', 'mm-store-sets');
  private _lineage = element('div', 'mm-store-lineage');
}

/** The left-sidebar panel: title, refresh button and a `StoreBrowser`. */
export function createStorePanel(): { panel: SidePanel; browser: StoreBrowser } {
  const panel = new SidePanel();
  panel.id = 'mm-jupyter-store';
  panel.addClass('mm-store-panel');
  panel.title.icon = storeIcon;
  panel.title.caption = 'Model store';
  const title = new Widget({ node: element('h2', 'mm-store-title', 'Model store') });
  panel.header.addWidget(title);
  const browser = new StoreBrowser();
  panel.toolbar.addItem(
    'refresh',
    new ToolbarButton({
      icon: refreshIcon,
      tooltip: 'Refresh the list of model sets',
      onClick: () => void browser.refresh()
    })
  );
  panel.addWidget(browser);
  return { panel, browser };
}
