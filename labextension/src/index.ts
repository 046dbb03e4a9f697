import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Kernel } from '@jupyterlab/services';
import { saveIcon, searchIcon } from '@jupyterlab/ui-components';

import { watchWidgetOutputs } from './fallback';
import { IStoreSource } from './handler';
import { storeIcon } from './icons';
import { rememberStore, rememberedStore } from './memory';
import { StoreBrowser, createStorePanel } from './panel';

/** Command ids of the extension. */
export namespace CommandIDs {
  export const openTour = 'mm-jupyter:open-tour';
  export const insertSaveCell = 'mm-jupyter:insert-save-cell';
  export const insertSearchCell = 'mm-jupyter:insert-search-cell';
  export const showStore = 'mm-jupyter:show-store';
}

/** Palette and launcher category. */
export const CATEGORY = 'mm_jupyter';

/** The tour notebook, relative to the server root. */
export const TOUR_PATH = 'notebooks/00_tour.ipynb';

/** Cell templates inserted by the commands (they need `%load_ext mm_jupyter` first). */
export const SAVE_CELL = '%%modelset save NAME --approach baseline\nmodels';
export const SEARCH_CELL = '%modelsearch CANDIDATES DATA -k 1 -o result';

/**
 * What the kernel evaluates (silently) to tell which store its magics use: only
 * when mm_jupyter's magics are loaded, so no other kernel ever imports anything.
 */
export const KERNEL_STORE_EXPRESSION =
  "__import__('sys').modules.get('mm_jupyter.jupyter.magics') and " +
  "__import__('sys').modules['mm_jupyter.jupyter.magics'].kernel_store()";

/** How long the panel waits for a busy kernel's answer before using what it knew. */
const KERNEL_ANSWER_MS = 2000;

/**
 * Which store each kernel's magics use, as the kernels report it. A busy kernel
 * answers only after its queued cells, so at most one question per kernel is in
 * flight; until it is answered the last answer (or the notebook folder's store)
 * stands, and `answered` is called when a late answer arrives.
 */
class KernelStores {
  constructor(answered: () => void) {
    this._answered = answered;
  }

  /** The store of a notebook: its kernel's, else the one the magics would use in its folder. */
  async of(panel: NotebookPanel): Promise<IStoreSource> {
    const fallback: IStoreSource = { path: panel.context.path };
    const kernel = panel.sessionContext.session?.kernel;
    if (!kernel) {
      return fallback;
    }
    this._paths.set(kernel.id, panel.context.path);
    let question = this._pending.get(kernel.id);
    if (question === undefined) {
      question = this._ask(kernel).finally(() => this._pending.delete(kernel.id));
      this._pending.set(kernel.id, question);
    }
    let late = false;
    const timeout = new Promise<undefined>(resolve =>
      setTimeout(() => {
        late = true;
        resolve(undefined);
      }, KERNEL_ANSWER_MS)
    );
    void question.then(() => {
      if (late) {
        this._answered();
      }
    });
    await Promise.race([question, timeout]);
    const known = this._known.get(kernel.id);
    return known ? { store: known } : remembered(panel.context.path, fallback);
  }

  private async _ask(kernel: Kernel.IKernelConnection): Promise<void> {
    try {
      const future = kernel.requestExecute(
        { code: '', silent: true, store_history: false, user_expressions: { mm: KERNEL_STORE_EXPRESSION } },
        true
      );
      const reply = await future.done;
      const answer = (reply.content as any).user_expressions?.mm;
      const store = answer?.status === 'ok' ? answer.data?.['application/json']?.store : undefined;
      if (typeof store === 'string') {
        this._known.set(kernel.id, store);
        const path = this._paths.get(kernel.id);
        if (path) {
          rememberStore(path, store);
        }
      } else {
        this._known.delete(kernel.id);
      }
    } catch {
      // a dead or restarting kernel: keep what was known
    }
  }

  private _answered: () => void;
  private _known = new Map<string, string>();
  private _paths = new Map<string, string>();
  private _pending = new Map<string, Promise<void>>();
}

/**
 * The store a notebook's kernel reported before (a reload, a restart: its
 * magics are not loaded yet), else `fallback` (the folder's store).
 */
function remembered(path: string, fallback: IStoreSource): IStoreSource {
  const store = path ? rememberedStore(path) : undefined;
  return store ? { store, remembered: true } : fallback;
}

/**
 * Keep the panel on the active notebook's store: when another notebook becomes
 * active, its kernel changes, or one of its cells finishes (a save shows up
 * without a click). Work is done only while the panel is visible; opening it
 * catches up.
 */
function followNotebooks(tracker: INotebookTracker, browser: StoreBrowser): void {
  let timer: number | undefined;
  const update = () => {
    window.clearTimeout(timer);
    timer = window.setTimeout(async () => {
      if (!browser.isVisible) {
        return;
      }
      const panel = tracker.currentWidget;
      await browser.setSource(panel ? await stores.of(panel) : {});
    }, 300);
  };
  const stores = new KernelStores(update);
  tracker.currentChanged.connect(update);
  tracker.widgetAdded.connect((_, panel) => {
    panel.sessionContext.kernelChanged.connect(update);
  });
  NotebookActions.executed.connect((_, { notebook }) => {
    if (tracker.currentWidget?.content === notebook) {
      update();
    }
  });
  browser.shown = update;
}

/**
 * Insert a code cell holding `source` below the active cell of the current
 * notebook and select it; false (with a message) when no notebook is open.
 */
function insertCell(
  app: JupyterFrontEnd,
  tracker: INotebookTracker | null,
  source: string
): boolean {
  const panel = tracker?.currentWidget ?? null;
  const model = panel?.content.model ?? null;
  if (panel === null || model === null) {
    Notification.warning('Open a notebook first: mm_jupyter inserts the cell into the active notebook.', {
      autoClose: 5000
    });
    return false;
  }
  const notebook = panel.content;
  const index =
    notebook.activeCellIndex < 0 ? model.cells.length : notebook.activeCellIndex + 1;
  model.sharedModel.insertCell(index, { cell_type: 'code', source });
  notebook.activeCellIndex = index;
  app.shell.activateById(panel.id);
  return true;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mm-jupyter:plugin',
  description:
    'mm_jupyter: a model-store browser and commands that insert model-set and model-search cells.',
  autoStart: true,
  optional: [
    ICommandPalette,
    ILauncher,
    INotebookTracker,
    IDocumentManager,
    ILayoutRestorer,
    IRenderMimeRegistry
  ],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    tracker: INotebookTracker | null,
    docManager: IDocumentManager | null,
    restorer: ILayoutRestorer | null,
    rendermime: IRenderMimeRegistry | null
  ) => {
    const { panel, browser } = createStorePanel(rendermime);
    app.shell.add(panel, 'left', { rank: 900 });
    restorer?.add(panel, panel.id);
    if (tracker) {
      followNotebooks(tracker, browser);
      tracker.forEach(watchWidgetOutputs);
      tracker.widgetAdded.connect((_, notebook) => watchWidgetOutputs(notebook));
    }

    app.commands.addCommand(CommandIDs.openTour, {
      label: 'Open the mm_jupyter tour',
      caption: `Open ${TOUR_PATH}`,
      icon: storeIcon,
      execute: async () => {
        try {
          await app.serviceManager.contents.get(TOUR_PATH, { content: false });
        } catch {
          Notification.warning(
            `The tour ${TOUR_PATH} is not under the server root; start JupyterLab in the mm_jupyter checkout.`,
            { autoClose: 8000 }
          );
          return;
        }
        if (docManager) {
          docManager.openOrReveal(TOUR_PATH);
        } else {
          await app.commands.execute('docmanager:open', { path: TOUR_PATH });
        }
      }
    });
    app.commands.addCommand(CommandIDs.insertSaveCell, {
      label: 'Insert model-set save cell',
      caption: 'Insert a %%modelset save cell below the active cell',
      icon: saveIcon,
      execute: () => insertCell(app, tracker, SAVE_CELL)
    });
    app.commands.addCommand(CommandIDs.insertSearchCell, {
      label: 'Insert model search cell',
      caption: 'Insert a %modelsearch cell below the active cell',
      icon: searchIcon,
      execute: () => insertCell(app, tracker, SEARCH_CELL)
    });
    app.commands.addCommand(CommandIDs.showStore, {
      label: 'Show the model store',
      icon: storeIcon,
      execute: () => app.shell.activateById(panel.id)
    });

    const commands = [
      CommandIDs.openTour,
      CommandIDs.insertSaveCell,
      CommandIDs.insertSearchCell
    ];
    commands.forEach((command, rank) => {
      palette?.addItem({ command, category: CATEGORY, rank });
      launcher?.add({ command, category: CATEGORY, rank });
    });
    palette?.addItem({ command: CommandIDs.showStore, category: CATEGORY, rank: commands.length });
  }
};

export default plugin;
