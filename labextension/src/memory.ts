/**
 * The store each notebook's kernel last reported, kept in the browser
 * (localStorage), so the Model store panel stays on a notebook's store after a
 * page reload or a kernel restart, until the kernel loads mm_jupyter again and
 * reports its store itself.
 */
const KEY = 'mm-jupyter:notebook-stores';
/** At most this many notebooks are remembered (the oldest are forgotten first). */
const LIMIT = 200;

function load(): Record<string, string> {
  try {
    const value = JSON.parse(window.localStorage.getItem(KEY) ?? '{}');
    return value && typeof value === 'object' ? value : {};
  } catch {
    return {};
  }
}

/** Remember that the notebook at `path` uses `store`. */
export function rememberStore(path: string, store: string): void {
  const stores = load();
  if (stores[path] === store) {
    return;
  }
  delete stores[path];
  stores[path] = store;
  const paths = Object.keys(stores);
  for (const old of paths.slice(0, Math.max(0, paths.length - LIMIT))) {
    delete stores[old];
  }
  try {
    window.localStorage.setItem(KEY, JSON.stringify(stores));
  } catch {
    // storage full or disabled: the panel falls back to the folder's store
  }
}

/** The store the notebook at `path` last reported, if any. */
export function rememberedStore(path: string): string | undefined {
  const store = load()[path];
  return typeof store === 'string' ? store : undefined;
}
