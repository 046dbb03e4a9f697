import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One stored version, as listed by `GET mm-jupyter/sets`. */
export interface ISetRow {
  name: string;
  version: number;
  approach: string;
  models: number;
  bytes: number;
  /** `bytes` in the notebook's units (decimal: kB, MB), formatted by the server. */
  size: string;
  created: string;
  tts_s: number;
}

/** Reply of `GET mm-jupyter/sets`. */
export interface ISetsPayload {
  store: string;
  exists: boolean;
  sets: ISetRow[];
}

/** One node of a set's lineage, as listed by `GET mm-jupyter/lineage?name=NAME`. */
export interface ILineageVersion {
  version: number;
  approach: string;
  requested: string;
  base: number | null;
  chain: number;
  models: number;
  added: string[];
  dropped: string[];
  changed: number | null;
  datasets: [string, string, string][];
  bytes: number;
  size: string;
  tts_s: number;
  created: string;
}

/** Reply of `GET mm-jupyter/lineage?name=NAME`. */
export interface ILineagePayload {
  store: string;
  name: string;
  versions: ILineageVersion[];
  edges: [number, number][];
  /** The notebook's lineage graph (plotly JSON), laid out for a narrow panel. */
  figure: Record<string, unknown>;
}

/** One kept search, as listed by `GET mm-jupyter/searches` (newest first). */
export interface ISearchRow {
  id: number;
  dataset: string;
  created: string;
  approach: string;
  k: number;
  candidates: number;
  winner: string;
  score: number | null;
  top5: string[];
  /** The stored candidate set (`name@version`) the candidates came from; null: held in memory. */
  source: string | null;
}

/** Reply of `GET mm-jupyter/searches`. */
export interface ISearchesPayload {
  store: string;
  exists: boolean;
  searches: ISearchRow[];
}

/**
 * Which store a request means: `store` (an absolute path the kernel reported)
 * or `path` (a notebook: the store the magics use in its folder); neither
 * means the server root's default store.
 */
export interface IStoreSource {
  store?: string;
  path?: string;
  /** `store` is the one this notebook's kernel reported before (its magics are not loaded now). */
  remembered?: boolean;
}

/**
 * Call the mm_jupyter server extension under `<base_url>/mm-jupyter/`.
 *
 * Resolves with the parsed JSON reply; rejects with an `Error` whose message is
 * the server's `{"error": ...}` text (or the HTTP status when there is none).
 */
export async function requestAPI<T>(
  endPoint: string,
  query: Record<string, string> = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url =
    URLExt.join(settings.baseUrl, 'mm-jupyter', endPoint) +
    URLExt.objectToQueryString(query);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, {}, settings);
  } catch (error) {
    throw new Error(`cannot reach the server: ${String(error)}`);
  }
  const text = await response.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const reply = (data ?? {}) as { error?: string; message?: string };
    throw new Error(
      reply.error ?? reply.message ?? `HTTP ${response.status} ${response.statusText}`
    );
  }
  if (data === null) {
    throw new Error(`the server sent no JSON for ${endPoint}`);
  }
  return data as T;
}
