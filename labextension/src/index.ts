import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker } from '@jupyterlab/notebook';
import { saveIcon, searchIcon } from '@jupyterlab/ui-components';

import { storeIcon } from './icons';
import { createStorePanel } from './panel';

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
  optional: [ICommandPalette, ILauncher, INotebookTracker, IDocumentManager, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    tracker: INotebookTracker | null,
    docManager: IDocumentManager | null,
    restorer: ILayoutRestorer | null
  ) => {
    const { panel } = createStorePanel();
    app.shell.add(panel, 'left', { rank: 900 });
    restorer?.add(panel, panel.id);

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
