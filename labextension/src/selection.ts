import { ILineagePayload, ILineageVersion } from './handler';

/** Name of the trace that rings the selected version in a lineage graph. */
export const SELECTED_TRACE = 'selected';

type Trace = Record<string, any>;

/**
 * The lineage figure with `version` ringed: a copy of `figure` with one more
 * trace (no legend, no hover) drawn over that version's node. The node's
 * position comes from the figure itself (each approach's trace lists its
 * versions in `customdata`), so lanes stay whatever the server laid out.
 */
export function highlightVersion(
  figure: Record<string, unknown>,
  version: number
): Record<string, unknown> {
  const data = (figure.data as Trace[] | undefined) ?? [];
  for (const trace of data) {
    const versions = (trace.customdata as number[] | undefined) ?? [];
    const at = versions.indexOf(version);
    if (at >= 0 && Array.isArray(trace.x) && Array.isArray(trace.y)) {
      const ring: Trace = {
        type: 'scatter',
        mode: 'markers',
        name: SELECTED_TRACE,
        x: [trace.x[at]],
        y: [trace.y[at]],
        showlegend: false,
        hoverinfo: 'skip',
        marker: {
          size: 30,
          color: 'rgba(0,0,0,0)',
          line: { width: 3, color: '#1976d2' }
        }
      };
      return { ...figure, data: [...data, ring] };
    }
  }
  return figure;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** What changed against the parent, in words. */
export function changeText(v: ILineageVersion): string {
  if (v.base === null) {
    return 'first version: no parent';
  }
  const parts: string[] = [];
  if (v.changed !== null) {
    parts.push(`${plural(v.changed, 'model')} changed`);
  } else {
    parts.push('a full copy (tensors not compared)');
  }
  if (v.added.length) {
    parts.push(`${v.added.length} added`);
  }
  if (v.dropped.length) {
    parts.push(`${v.dropped.length} dropped`);
  }
  return `vs v${v.base}: ${parts.join(', ')}`;
}

/**
 * The selected version's details: approach (and what was asked), models,
 * bytes it added, and what changed against its parent.
 */
export function versionDetails(payload: ILineagePayload, version: number): HTMLElement | null {
  const v = payload.versions.find(item => item.version === version);
  if (!v) {
    return null;
  }
  const box = document.createElement('dl');
  box.className = 'mm-store-details';
  const rows: [string, string][] = [
    ['version', `${payload.name}@${v.version}`],
    ['approach', v.approach === v.requested ? v.approach : `${v.approach} (asked: ${v.requested})`],
    ['models', String(v.models)],
    ['stored', `${v.size} (bytes this version added)`],
    ['changed', changeText(v)]
  ];
  if (v.datasets.length) {
    rows.push(['datasets', plural(v.datasets.length, 'dataset reference')]);
  }
  for (const [key, value] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = key;
    const dd = document.createElement('dd');
    dd.textContent = value;
    box.append(dt, dd);
  }
  return box;
}
