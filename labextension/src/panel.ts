import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import {
  SidePanel,
  ToolbarButton,
  refreshIcon
} from '@jupyterlab/ui-components';
import { Message, MessageLoop } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  ILineagePayload,
  ISearchesPayload,
  ISetRow,
  ISetsPayload,
  IStoreSource,
  requestAPI
} from './handler';
import { storeIcon } from './icons';
import { highlightVersion, versionDetails } from './selection';

/** The plotly figure's mime type (drawn by the plotly renderer JupyterLab has for notebooks). */
export const PLOTLY_MIME = 'application/vnd.plotly.v1+json';

/** An ISO timestamp in the browser's locale (the raw text when it does not parse). */
export function formatCreated(created: string): string {
  const date = new Date(created);
  return isNaN(date.getTime()) ? created : date.toLocaleString();
}

/** The day of an ISO timestamp in the browser's locale (short, for the searches list). */
export function formatDay(created: string): string {
  const date = new Date(created);
  return isNaN(date.getTime()) ? created.slice(0, 10) : date.toLocaleDateString();
}

/** What the searches view says while the store has kept none. */
export const NO_SEARCHES =
  'No kept searches yet. After a search, keep it with result.save(store, dataset="NAME") ' +
  '(or %modelsearch … --keep NAME): its dataset, date, winner and top 5 show up here.';

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

function table(
  headers: string[],
  rows: { cells: (string | HTMLElement)[]; title?: string; selected?: boolean }[],
  numeric: number[] = []
): HTMLTableElement {
  const node = element('table', 'mm-store-table');
  const head = node.createTHead().insertRow();
  headers.forEach((header, i) => {
    head.appendChild(element('th', numeric.includes(i) ? 'mm-store-num' : '', header));
  });
  const body = node.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    if (row.title) {
      tr.title = row.title;
    }
    if (row.selected) {
      tr.classList.add('mm-store-selected');
    }
    row.cells.forEach((cell, i) => {
      const td = tr.insertCell();
      if (numeric.includes(i)) {
        td.className = 'mm-store-num';
      }
      if (typeof cell === 'string') {
        td.textContent = cell;
      } else {
        td.appendChild(cell);
      }
    });
  }
  return node;
}

/**
 * The body of the "Model store" side panel: which store (the active
 * notebook's), its model sets and, after a click on a set, that set's lineage
 * drawn as the notebook's lineage graph.
 */
export class StoreBrowser extends Widget {
  constructor(rendermime: IRenderMimeRegistry | null = null) {
    super();
    this._rendermime = rendermime;
    this.addClass('mm-store-browser');
    this.node.append(this._path, this._message, this._sets, this._lineage, this._searches);
  }

  /** The name whose lineage is shown, or null. */
  get selected(): string | null {
    return this._selected;
  }

  /** The version selected in that lineage (highlighted, its details shown), or null. */
  get selectedVersion(): number | null {
    return this._selectedVersion;
  }

  /** Which store the panel shows (see `IStoreSource`). */
  get source(): IStoreSource {
    return this._source;
  }

  /** Show another store; refreshes when it differs from the current one. */
  async setSource(source: IStoreSource): Promise<void> {
    const same = source.store === this._source.store && source.path === this._source.path;
    this._source = source;
    if (!same && this._selected !== null) {
      this._clearLineage();
    }
    await this.refresh();
  }

  /** Fetch the list of sets (and the shown lineage) again. */
  async refresh(): Promise<void> {
    const request = ++this._requests;
    if (!this._loaded) {
      this._showMessage('Loading…');
    }
    let payload: ISetsPayload;
    try {
      payload = await requestAPI<ISetsPayload>('sets', this._query());
    } catch (error) {
      if (request === this._requests) {
        this._path.textContent = '';
        this._sets.replaceChildren();
        this._showMessage(`Cannot list the model store: ${(error as Error).message}`, true);
      }
      return;
    }
    if (request !== this._requests) {
      return; // a newer refresh is under way
    }
    this._loaded = true;
    const remembered = this._source.remembered ? ' (last used by this notebook)' : '';
    this._path.textContent = `Store: ${payload.store}${remembered}`;
    this._path.title = payload.store + (remembered ? `: the store this notebook's kernel reported before; ` +
      'run its cells to refresh' : '');
    this._renderSets(payload.sets);
    const searches = this._refreshSearches(request);
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
      if (this._lineageKey(payload, this._selected) !== this._shownKey) {
        // redraw only when the set got new versions
        await this.showLineage(this._selected, this._selectedVersion ?? undefined);
      }
    } else {
      this._clearLineage();
    }
    await searches;
  }

  /** Fetch and show the kept searches (dataset, date, winner, top 5); an error stays in this view. */
  private async _refreshSearches(request: number): Promise<void> {
    const heading = element('div', 'mm-store-heading');
    heading.appendChild(element('span', '', 'Kept searches'));
    let payload: ISearchesPayload;
    try {
      payload = await requestAPI<ISearchesPayload>('searches', this._query());
    } catch (error) {
      if (request === this._requests) {
        this._searches.replaceChildren(
          heading,
          element('div', 'mm-store-message mm-store-error', `Cannot list the kept searches: ${(error as Error).message}`)
        );
      }
      return;
    }
    if (request !== this._requests) {
      return; // a newer refresh is under way
    }
    if (payload.searches.length === 0) {
      this._searches.replaceChildren(heading, element('div', 'mm-store-message mm-store-searches-empty', NO_SEARCHES));
      return;
    }
    const node = element('table', 'mm-store-table mm-store-searches-table');
    const head = node.createTHead().insertRow();
    for (const header of ['dataset', 'date', 'winner']) {
      head.appendChild(element('th', '', header));
    }
    const body = node.createTBody();
    for (const s of payload.searches) {
      const row = body.insertRow();
      row.className = 'mm-store-search';
      row.dataset.search = String(s.id);
      const score = s.score === null ? '' : `, score ${s.score.toFixed(3)}`;
      row.title =
        `search #${s.id} on ${s.dataset}: ${s.approach}, ${s.candidates} candidates, k=${s.k}` +
        `${s.source ? `, from ${s.source}` : ''}; kept ${formatCreated(s.created)}`;
      row.insertCell().textContent = s.dataset;
      row.insertCell().textContent = formatDay(s.created);
      const winner = row.insertCell();
      winner.className = 'mm-store-winner';
      winner.textContent = s.winner;
      winner.title = `${s.winner}${score}`;
      const top = body.insertRow();
      top.className = 'mm-store-top';
      const cell = top.insertCell();
      cell.colSpan = 3;
      cell.textContent = `top 5: ${s.top5.join(' · ')}`;
      cell.title = cell.textContent;
    }
    this._searches.replaceChildren(heading, node);
  }

  /**
   * Show the lineage graph of `name` (the plotly figure of the notebook's
   * lineage widget); with `version`, that version is ringed in the graph, its
   * row marked in the list and its details shown below the graph.
   */
  async showLineage(name: string, version?: number): Promise<void> {
    this._selected = name;
    this._selectedVersion = version ?? null;
    this._markSelectedRow();
    const heading = element('div', 'mm-store-heading');
    heading.appendChild(element('span', '', `Lineage of ${name}`));
    const close = element('button', 'mm-store-close jp-Button', '×');
    close.title = 'Hide the lineage';
    close.onclick = () => this._clearLineage();
    heading.appendChild(close);
    let payload: ILineagePayload;
    try {
      payload = await requestAPI<ILineagePayload>('lineage', { ...this._query(), name });
    } catch (error) {
      this._disposeGraph();
      this._lineage.replaceChildren(
        heading,
        element('div', 'mm-store-message mm-store-error', (error as Error).message)
      );
      return;
    }
    if (this._selected !== name) {
      return; // another set was clicked meanwhile
    }
    const total = payload.versions.length;
    const summary = element(
      'div',
      'mm-store-summary',
      `${total} version${total === 1 ? '' : 's'}, ${payload.edges.length} edge${payload.edges.length === 1 ? '' : 's'}`
    );
    const host = element('div', 'mm-store-graph');
    this._disposeGraph();
    this._lineage.replaceChildren(heading, summary, host);
    const figure = version === undefined ? payload.figure : highlightVersion(payload.figure, version);
    if (!(await this._renderFigure(figure, host))) {
      host.appendChild(this._lineageTable(payload));
    }
    const details = version === undefined ? null : versionDetails(payload, version);
    if (details !== null) {
      this._lineage.appendChild(details);
    }
    this._shownKey = `${payload.store}|${name}|${payload.versions.map(v => v.version).join(',')}`;
  }

  /** Called when the panel opens (the plugin points the panel at the active notebook's store). */
  shown: (() => void) | null = null;

  /** Every time the panel opens, the list is fetched again. */
  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    if (this.shown) {
      this.shown();
    } else {
      void this.refresh();
    }
  }

  /**
   * Draw a plotly figure into `host` (attached first, so the graph takes the
   * panel's width); false when JupyterLab has no plotly renderer.
   */
  private async _renderFigure(figure: Record<string, unknown>, host: HTMLElement): Promise<boolean> {
    const rendermime = this._rendermime;
    const data = { [PLOTLY_MIME]: figure as any };
    if (rendermime === null || rendermime.preferredMimeType(data, 'any') !== PLOTLY_MIME) {
      return false;
    }
    const renderer = rendermime.createRenderer(PLOTLY_MIME);
    this._graph = renderer;
    Widget.attach(renderer, host);
    await renderer.renderModel(rendermime.createModel({ data, trusted: true }));
    return true;
  }

  /** The graph follows the panel's width. */
  protected onResize(msg: Widget.ResizeMessage): void {
    super.onResize(msg);
    if (this._graph !== null) {
      MessageLoop.sendMessage(this._graph, Widget.ResizeMessage.UnknownSize);
    }
  }

  /** The versions as a table: the graph's fallback without a plotly renderer. */
  private _lineageTable(payload: ILineagePayload): HTMLTableElement {
    const rows = payload.versions.map(v => ({
      selected: v.version === this._selectedVersion,
      cells: [
        `v${v.version}`,
        v.base === null ? '—' : `v${v.base}`,
        v.approach === v.requested ? v.approach : `${v.approach} (${v.requested})`,
        String(v.models),
        v.size
      ]
    }));
    return table(['version', 'base', 'approach', 'models', 'size'], rows, [3, 4]);
  }

  private _renderSets(sets: ISetRow[]): void {
    if (sets.length === 0) {
      this._sets.replaceChildren();
      return;
    }
    const rows = sets.map(row => {
      const link = element('button', 'mm-store-link', `${row.name}@${row.version}`);
      link.title = `Show the lineage of ${row.name}, ${row.name}@${row.version} marked`;
      link.dataset.set = row.name;
      link.dataset.version = String(row.version);
      link.onclick = () => void this.showLineage(row.name, row.version);
      return {
        selected: row.name === this._selected && row.version === this._selectedVersion,
        cells: [link, row.approach, String(row.models), row.size],
        title: `${row.name}@${row.version}: saved ${formatCreated(row.created)} in ${row.tts_s.toFixed(3)} s`
      };
    });
    this._sets.replaceChildren(table(['set', 'approach', 'models', 'size'], rows, [2, 3]));
  }

  /** Identifies what a lineage drawing shows: store, name and versions. */
  private _lineageKey(payload: ISetsPayload, name: string): string {
    const versions = payload.sets.filter(row => row.name === name).map(row => row.version);
    return `${payload.store}|${name}|${versions.join(',')}`;
  }

  private _query(): Record<string, string> {
    const query: Record<string, string> = {};
    if (this._source.store) {
      query.store = this._source.store;
    } else if (this._source.path) {
      query.path = this._source.path;
    }
    return query;
  }

  private _disposeGraph(): void {
    this._graph?.dispose();
    this._graph = null;
  }

  /** Mark the list's row of the selected version (and only that one). */
  private _markSelectedRow(): void {
    this._sets.querySelectorAll<HTMLElement>('.mm-store-link').forEach(link => {
      const row = link.closest('tr');
      row?.classList.toggle(
        'mm-store-selected',
        link.dataset.set === this._selected && link.dataset.version === String(this._selectedVersion)
      );
    });
  }

  private _clearLineage(): void {
    this._selected = null;
    this._selectedVersion = null;
    this._markSelectedRow();
    this._shownKey = '';
    this._disposeGraph();
    this._lineage.replaceChildren();
  }

  private _showMessage(text: string, error = false): void {
    this._message.textContent = text;
    this._message.classList.toggle('mm-store-error', error);
    this._message.hidden = text === '';
  }

  private _rendermime: IRenderMimeRegistry | null;
  private _source: IStoreSource = {};
  private _selected: string | null = null;
  private _selectedVersion: number | null = null;
  private _graph: Widget | null = null;
  private _shownKey = '';
  private _loaded = false;
  private _requests = 0;
  private _path = element('div', 'mm-store-path');
  private _message = element('div', 'mm-store-message');
  private _sets = element('div', 'mm-store-sets');
  private _lineage = element('div', 'mm-store-lineage');
  private _searches = element('div', 'mm-store-searches');
}

/** The left-sidebar panel: title, refresh button and a `StoreBrowser`. */
export function createStorePanel(
  rendermime: IRenderMimeRegistry | null = null
): { panel: SidePanel; browser: StoreBrowser } {
  const panel = new SidePanel();
  panel.id = 'mm-jupyter-store';
  panel.addClass('mm-store-panel');
  panel.title.icon = storeIcon;
  panel.title.caption = 'Model store';
  const title = new Widget({ node: element('h2', 'mm-store-title', 'Model store') });
  panel.header.addWidget(title);
  const browser = new StoreBrowser(rendermime);
  browser.title.label = 'Sets and lineage';
  panel.toolbar.addItem(
    'refresh',
    new ToolbarButton({
      icon: refreshIcon,
      tooltip: 'Refresh the model sets and kept searches',
      onClick: () => void browser.refresh()
    })
  );
  panel.addWidget(browser);
  return { panel, browser };
}
