import { ICodeCellModel } from '@jupyterlab/cells';
import * as nbformat from '@jupyterlab/nbformat';
import { NotebookPanel } from '@jupyterlab/notebook';

/** The mime type of an ipywidgets view in an output bundle. */
export const WIDGET_MIME = 'application/vnd.jupyter.widget-view+json';

/**
 * Whether a widget output also carries a picture of its own: any entry besides
 * the widget view and text (mm_jupyter's widgets add HTML, plotly JSON or PNG).
 */
export function hasStatic(data: nbformat.IMimeBundle): boolean {
  return Object.keys(data).some(mime => mime !== WIDGET_MIME && mime !== 'text/plain');
}

/**
 * The widget model ids referenced by outputs that carry a static picture (an
 * empty id: ipywidgets blanks the id of a view whose model was closed).
 */
export function staticWidgetIds(panel: NotebookPanel): Set<string> {
  const ids = new Set<string>();
  const cells = panel.content.model?.cells;
  if (!cells) {
    return ids;
  }
  for (let c = 0; c < cells.length; c++) {
    const cell = cells.get(c);
    if (cell.type !== 'code') {
      continue;
    }
    const outputs = (cell as ICodeCellModel).outputs;
    for (let i = 0; i < outputs.length; i++) {
      const data = outputs.get(i).data as nbformat.IMimeBundle;
      const view = data[WIDGET_MIME] as { model_id?: string } | undefined;
      if (view && hasStatic(data)) {
        ids.add(view.model_id ?? '');
      }
    }
  }
  return ids;
}

/**
 * Drop the widget view from outputs whose model is in `dead`, so that the
 * output shows its static entries instead of "Error displaying widget: model
 * not found". The notebook's dirty flag is kept: nothing the user wrote changed.
 * Returns how many outputs changed.
 */
export function dropWidgetViews(panel: NotebookPanel, dead: Set<string>): number {
  const model = panel.content.model;
  if (!model || dead.size === 0) {
    return 0;
  }
  const dirty = model.dirty;
  let changed = 0;
  for (let c = 0; c < model.cells.length; c++) {
    const cell = model.cells.get(c);
    if (cell.type !== 'code') {
      continue;
    }
    const outputs = (cell as ICodeCellModel).outputs;
    for (let i = 0; i < outputs.length; i++) {
      const output = outputs.get(i);
      const data0 = output.data as nbformat.IMimeBundle;
      const view = data0[WIDGET_MIME] as { model_id?: string } | undefined;
      if (!view || !hasStatic(data0) || !dead.has(view.model_id ?? '')) {
        continue;
      }
      const json = output.toJSON() as nbformat.IDisplayData;
      const data = { ...json.data };
      delete data[WIDGET_MIME];
      outputs.set(i, { ...json, data });
      changed += 1;
    }
  }
  model.dirty = dirty;
  return changed;
}

/**
 * The widget models the kernel still holds (ipywidgets' comm target), or
 * null when that cannot be known (no kernel reply).
 */
async function liveWidgetIds(panel: NotebookPanel): Promise<Set<string> | null> {
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return new Set();
  }
  try {
    const reply = await kernel.requestCommInfo({ target_name: 'jupyter.widget' });
    if (reply.content.status !== 'ok') {
      return null;
    }
    return new Set(Object.keys(reply.content.comms));
  } catch {
    return null;
  }
}

/**
 * Show the static picture of every widget output whose model the kernel does
 * not hold: a saved notebook reopened on a fresh kernel, or after a restart.
 * Only outputs present before asking the kernel are considered, so a widget
 * created meanwhile is never touched.
 */
export async function showStaticWhereWidgetsAreGone(panel: NotebookPanel): Promise<void> {
  const known = staticWidgetIds(panel);
  if (known.size === 0) {
    return;
  }
  const live = await liveWidgetIds(panel);
  if (live === null || panel.isDisposed) {
    return;
  }
  dropWidgetViews(panel, new Set([...known].filter(id => id === '' || !live.has(id))));
}

/**
 * Keep a notebook's widget outputs readable: check when it opens, when its
 * kernel changes and after a kernel restart.
 */
export function watchWidgetOutputs(panel: NotebookPanel): void {
  const session = panel.sessionContext;
  const check = () => void showStaticWhereWidgetsAreGone(panel);
  void Promise.all([panel.context.ready, session.ready]).then(check);
  session.kernelChanged.connect(() => void session.ready.then(check));
  session.statusChanged.connect((_, status) => {
    if (status === 'restarting' || status === 'autorestarting') {
      // the kernel forgot every widget; check once it is back
      const once = (_: unknown, next: string) => {
        if (next === 'idle') {
          session.statusChanged.disconnect(once);
          check();
        }
      };
      session.statusChanged.connect(once);
    }
  });
}
