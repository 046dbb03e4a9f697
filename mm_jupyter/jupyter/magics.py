"""``%modelset`` / ``%%modelset`` and ``%modelsearch``: one line to save, recover, inspect or search.

Arguments are parsed with IPython's ``MagicArgumentParser`` (bad arguments raise ``UsageError``);
failures inside the store or the search raise ``MMError`` subclasses, which IPython renders as one
line. Nothing here imports torch at import time: the store and the search load it when they run.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Unicode

from ..errors import MMError, RefError, StoreError, a_type
from ..store.store import APPROACH_CHOICES as APPROACHES  # the store's registry, plus "auto"
from .cells import TRAIN_NAME, run_cell, train_function_source, user_code
from .display import EmptyStore, NoMatch, NoSearches, SavedSet, SetInfo, StoreInfo
from .server import store_exists

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

STORE_HELP = ("store folder or postgresql:// URL (default: %%config ModelMagics.store, $MM_JUPYTER_STORE, "
              "else ./.mm_store)")
SEARCH_APPROACHES = ("alsatian", "shift", "base")
PROXIES = ("linear", "knn", "logme")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
          "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str, option: str = "--budget") -> int:
    """``"64MB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (a budget on the command line)."""
    m = _SIZE.match(text)
    if not m or m.group(2) is None and not m.group(1):
        raise UsageError(f"{option} {text!r} is not a size like 1000000, 64MB or 1.5GiB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value < 1:
        raise UsageError(f"{option} {text!r} must be at least one byte")
    return int(value)


def _parser(prog: str, description: str) -> MagicArgumentParser:
    """IPython's help formatter puts one ``%`` before ``prog``: a line magic's prog has none, a cell
    magic's one, so the usage reads ``%modelset list`` / ``%%modelset save``."""
    return MagicArgumentParser(prog=prog, description=description, add_help=False)


def _modelset_parsers() -> dict[str, MagicArgumentParser]:
    p: dict[str, MagicArgumentParser] = {}
    save = p["save"] = _parser("%modelset save", "Run the cell and save the models it produces as a new "
                               "version of NAME (the cell's last expression, or --models VAR). With "
                               "--approach provenance the cell is the training code for one model: it trains "
                               "`model` on `data` with `config`; it runs once per entry of --datasets on a "
                               "copy of the base version's model, and recovery retrains with the same code.")
    save.add_argument("name", help="set name")
    save.add_argument("--approach", "-a", default=None, choices=APPROACHES,
                      help="storage approach (default: baseline for a new NAME, auto for a NAME already stored: "
                           "update when that saves space)")
    save.add_argument("--base", "-b", default=None, help="base version (name@version); default: latest of NAME")
    save.add_argument("--models", "-m", default=None, metavar="VAR",
                      help="variable holding the models (list or dict); for provenance: receives them")
    save.add_argument("--datasets", "-d", default=None, metavar="VAR",
                      help="provenance: variable holding {model name: mm.DatasetRef or file path}")
    save.add_argument("--config", "-c", default=None, metavar="JSON|VAR",
                      help="provenance: training config as JSON or the name of a dict variable")
    save.add_argument("--seed", type=int, default=0, help="provenance: seed of the deterministic training")
    save.add_argument("--store", default=None, help=STORE_HELP)
    recover = p["recover"] = _parser("modelset recover", "Recover a stored version (lazily: models build on access).")
    recover.add_argument("ref", help="name (latest) or name@version")
    recover.add_argument("-o", "--out", default=None, metavar="VAR", help="also assign the ModelSet to VAR")
    recover.add_argument("--trust-code", action="store_true",
                         help="allow code recorded in the store (notebook classes, provenance training code and "
                              "dataset loaders) to run; only for stores whose writers you trust")
    recover.add_argument("--store", default=None, help=STORE_HELP)
    lst = p["list"] = _parser("modelset list", "Every stored version.")
    lst.add_argument("--store", default=None, help=STORE_HELP)
    show = p["show"] = _parser("modelset show", "Storage, approach and models of one version.")
    show.add_argument("ref", help="name (latest) or name@version")
    show.add_argument("--store", default=None, help=STORE_HELP)
    diff = p["diff"] = _parser("modelset diff", "Which models were added, dropped or changed, and which tensors.")
    diff.add_argument("a", help="older version (name@version)")
    diff.add_argument("b", help="newer version (name@version)")
    diff.add_argument("--store", default=None, help=STORE_HELP)
    lineage = p["lineage"] = _parser("modelset lineage", "The version graph of a set, as a widget.")
    lineage.add_argument("name", help="set name")
    lineage.add_argument("--store", default=None, help=STORE_HELP)
    compare = p["compare"] = _parser("modelset compare", "Storage / TTS / TTR chart: from the store's records "
                                     "(TTR measured now by recovering each version) or from a benchmark file.")
    compare.add_argument("names", nargs="*", help="set names (default: every set in the store)")
    compare.add_argument("--file", "-f", default=None,
                         help="benchmark results.json / results.csv, or a folder of results.json files")
    compare.add_argument("--no-ttr", action="store_true", help="do not measure time-to-recover")
    compare.add_argument("--store", default=None, help=STORE_HELP)
    find = p["find"] = _parser("modelset find", "Stored models matching a pandas query over store.models() "
                               "(columns: kind, set, version, name, family, arch_hash, params, parent, datasets, "
                               "tags, best_on, score); answered from the catalog, nothing runs. Example: "
                               "%modelset find \"params < 20e6 and best_on == 'cifar-subset'\"")
    find.add_argument("query", nargs="+", help="the query (quote it when it holds quotes)")
    find.add_argument("--store", default=None, help=STORE_HELP)
    searches = p["searches"] = _parser("modelset searches", "The kept searches (result.save(store, dataset=...)): "
                                       "dataset, date, approach, winner, top 5.")
    searches.add_argument("--store", default=None, help=STORE_HELP)
    return p


def _search_parser() -> MagicArgumentParser:
    p = _parser("modelsearch", "Rank candidate models as base models for a labelled dataset (Alsatian "
                "model search) with a live successive-halving widget; returns the SearchResult.")
    p.add_argument("candidates", help="variable holding a list/dict of nn.Module or stored candidates, "
                   "or store:NAME for candidates saved with mm.add_candidates")
    p.add_argument("data", help="variable holding (X, y) tensors or a torch Dataset")
    p.add_argument("-k", type=int, default=1, help="how many models to select")
    p.add_argument("--approach", "-a", default="alsatian", choices=SEARCH_APPROACHES)
    p.add_argument("--budget", default=None, help="cache budget, e.g. 64MB (default: unlimited)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    p.add_argument("--proxy", default="linear", choices=PROXIES)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default=None, metavar="VAR", help="also assign the SearchResult to VAR")
    p.add_argument("--no-widget", action="store_true", help="do not show the live progress widget")
    p.add_argument("--keep", default=None, metavar="DATASET",
                   help="keep the result in the store as the search on DATASET (see %%modelset searches / find)")
    p.add_argument("--reuse", action="store_true",
                   help="read and keep block features in the store: a repeated or extended search computes only "
                        "what is new")
    p.add_argument("--feature-budget", default=None, metavar="SIZE",
                   help="with --reuse: bytes of kept features at most, e.g. 2GB (least recently used go first)")
    p.add_argument("--layers", type=int, default=1, metavar="N",
                   help="score the features at each candidate's last N block boundaries as separate arms")
    p.add_argument("--store", default=None, help=STORE_HELP)
    return p


PARSERS = _modelset_parsers()
SEARCH = _search_parser()


def _usage() -> str:
    parts = ["Save, recover and inspect model sets.\n"]
    parts += [PARSERS[c].format_help() for c in PARSERS]
    return "\n".join(parts)


@magics_class
class ModelMagics(Magics):
    """The mm_jupyter magics. ``%config ModelMagics.store = "path"`` picks the store folder."""

    shell: InteractiveShell  # always given (Magics allows None for magics made without a shell)

    store = Unicode(None, allow_none=True, help="Folder of the model store the magics use, or a team's "
                    "postgresql://... catalog (default: $MM_JUPYTER_STORE, else ./.mm_store)").tag(config=True)
    objects = Unicode(None, allow_none=True, help="Object area of a postgresql:// store: s3://bucket/prefix "
                      "(default: $MM_JUPYTER_OBJECTS)").tag(config=True)

    def __init__(self, shell: Any) -> None:
        super().__init__(shell=shell)
        self._stores: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------------
    def _store(self, path: str | None, create: bool = True) -> Any:
        """The open store at ``--store`` / ``%config`` / the default; a command that only reads
        (``create=False``) never creates one: a missing store raises ``RefError``."""
        from ..store import Store

        resolved = str(store_location(path, self.store))
        key = f"{resolved} {self.objects or ''}"
        if key not in self._stores:
            if not create and not store_exists(resolved):
                raise RefError(f"there is no model store at {resolved!r} yet: save a set with %%modelset save NAME")
            self._stores[key] = Store(resolved, objects=self.objects or None)
        return self._stores[key]

    def _var(self, name: str, what: str) -> Any:
        if not name.isidentifier():
            raise UsageError(f"{what} must be a variable name, not {name!r}")
        if name not in self.shell.user_ns:
            raise UsageError(f"no variable named {name!r} in the notebook ({what})")
        return self.shell.user_ns[name]

    @staticmethod
    def _parse(parser: MagicArgumentParser, args: list[str]) -> Any:
        return parser.parse_args(args)

    # -- %modelset ----------------------------------------------------------------------------
    @line_cell_magic
    def modelset(self, line: str, cell: str | None = None) -> Any:
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%modelset: {e}") from None
        if not argv:
            raise UsageError("%modelset needs a command: " + ", ".join(PARSERS) + " (see %modelset?)")
        command, rest = argv[0], argv[1:]
        if command not in PARSERS:
            raise UsageError(f"unknown %modelset command {command!r}; choose one of {', '.join(PARSERS)}")
        if command != "save" and cell is not None:
            raise UsageError(f"%%modelset {command} takes no cell body; use the line magic %modelset {command}")
        args = self._parse(PARSERS[command], rest)
        if command == "save" and cell is None and (args.models is None or args.approach == "provenance"):
            raise UsageError("save runs a cell: write %%modelset save NAME at the top of a cell "
                             "(the line form %modelset save NAME --models VAR saves a variable)")
        if command == "find" and len(args.query) > 1 and args.store is None:
            args.query = [line.strip()[len("find"):].strip()]  # unquoted: as typed, its own quotes kept
        handler: Callable[..., Any] = getattr(self, f"_{command}")
        return handler(args, cell) if command == "save" else handler(args)

    def _save(self, args: Any, cell: str | None) -> SavedSet:
        store = self._store(args.store)
        if args.approach == "provenance":
            assert cell is not None  # modelset() refuses a provenance save without a cell
            ref = self._save_provenance(store, args, cell)
        else:
            for flag in ("datasets", "config"):
                if getattr(args, flag) is not None:
                    raise UsageError(f"--{flag} only applies to --approach provenance")
            value = run_cell(self.shell, cell) if cell is not None else None
            if args.models is not None:
                value = self._var(args.models, "--models")
            elif value is None:
                raise UsageError("the cell's last expression must be the models (a list or dict of nn.Module), "
                                 "or name their variable with --models VAR")
            approach = args.approach or ("auto" if store.catalog.find(args.name, None) is not None else "baseline")
            ref = store.save_set(_as_models(value), args.name, approach=approach, base=args.base)
        return SavedSet.of(store, ref)

    def _save_provenance(self, store: Any, args: Any, cell: str) -> Any:
        from ..errors import ArchitectureError
        from ..store.provenance import Provenance
        from ..store.sourcecode import capture_code, exec_source

        if args.datasets is None:
            raise UsageError("--approach provenance needs --datasets VAR: {model name: mm.DatasetRef or file}")
        datasets = self._var(args.datasets, "--datasets")
        if not isinstance(datasets, dict) or not datasets:
            raise UsageError(f"--datasets {args.datasets} must be a non-empty dict {{model name: dataset reference}}")
        config = self._config(args.config)
        try:
            source = capture_code(train_function_source(self.shell, cell), TRAIN_NAME, self.shell.user_ns)
            exec_source(source, TRAIN_NAME)  # the user's own cell, checked to run in a fresh namespace
        except ArchitectureError as e:
            raise StoreError(f"cannot record the cell as training code: {e}") from None
        base = args.base or args.name
        base_set = store.recover_set(base)
        try:
            models = {name: base_set[name] for name in base_set.names}
        finally:
            base_set.close()
        missing = [str(k) for k in datasets if str(k) not in models]
        if missing:
            raise StoreError(f"--datasets names model(s) not in {base}: {', '.join(missing[:5])}")
        prov = Provenance(train=TRAIN_NAME, source=source, config=config, datasets=datasets, seed=args.seed)
        models.update(user_code(self.shell, lambda c: c.co_name == TRAIN_NAME, lambda: prov.run(models), source))
        if args.models is not None:
            if not args.models.isidentifier():
                raise UsageError(f"--models must be a variable name, not {args.models!r}")
            self.shell.user_ns[args.models] = models
        return store.save_set(models, args.name, approach="provenance", base=args.base, provenance=prov)

    def _config(self, text: str | None) -> dict[str, Any]:
        import json

        if text is None:
            return {}
        if text.isidentifier():
            value = self._var(text, "--config")
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"--config is neither a variable name nor JSON: {e}") from None
        if not isinstance(value, dict):
            raise UsageError(f"--config must be a dict, not {type(value).__name__}")
        return value

    def _recover(self, args: Any) -> Any:
        ms = self._store(args.store, create=False).recover_set(args.ref, trust_code=args.trust_code or None)
        if args.out is not None:
            if not args.out.isidentifier():
                raise UsageError(f"-o must be a variable name, not {args.out!r}")
            self.shell.user_ns[args.out] = ms
        return ms

    def _list(self, args: Any) -> Any:
        """Every stored version (a DataFrame); a missing or empty store says so in one line."""
        try:
            store = self._store(args.store, create=False)
        except RefError:
            return EmptyStore(str(store_location(args.store, self.store)), exists=False)
        listing = store.sets()
        return EmptyStore(store.location, exists=True) if listing.empty else listing

    def _show(self, args: Any) -> SetInfo:
        return SetInfo.of(self._store(args.store, create=False), args.ref)

    def _diff(self, args: Any) -> Any:
        return self._store(args.store, create=False).diff(args.a, args.b)

    def _lineage(self, args: Any) -> Any:
        from .widgets import LineageGraph

        return LineageGraph(self._store(args.store, create=False).lineage(args.name))

    def _find(self, args: Any) -> Any:
        """The stored models a query selects (a DataFrame); a query pandas cannot evaluate, or one
        that does not select rows, is one UsageError line naming the columns."""
        query = " ".join(args.query)
        models = self._store(args.store, create=False).models()
        import pandas as pd

        try:
            mask = models.eval(query)
        except Exception as e:  # noqa: BLE001 - any failure of the user's expression is a bad argument
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"%modelset find: cannot evaluate {query!r} ({type(e).__name__}: {detail}); columns: "
                             f"{', '.join(models.columns)}") from None
        if not (isinstance(mask, pd.Series) and pd.api.types.is_bool_dtype(mask.dtype)):
            raise UsageError(f"%modelset find: {query!r} is not a condition on each model (e.g. params < 1e6)")
        found = models[mask.fillna(False).astype(bool)]
        return found if len(found) else NoMatch(query, len(models))

    def _searches(self, args: Any) -> Any:
        """The kept searches (a DataFrame); none: one line saying how to keep one."""
        try:
            store = self._store(args.store, create=False)
        except RefError:
            return NoSearches(str(store_location(args.store, self.store)))
        kept = store.searches()
        return NoSearches(store.location) if kept.empty else kept

    def _compare(self, args: Any) -> Any:
        from .widgets import ComparisonChart

        if args.file is not None:
            if args.names:
                raise UsageError("give either set names (from the store) or --file, not both")
            return ComparisonChart.from_benchmark(args.file)
        return ComparisonChart.from_store(self._store(args.store, create=False), names=args.names or None,
                                          ttr=not args.no_ttr)

    # -- %modelsearch --------------------------------------------------------------------------
    @line_magic
    def modelsearch(self, line: str) -> Any:
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%modelsearch: {e}") from None
        args = self._parse(SEARCH, argv)
        from ..modelsearch.api import search
        from ..modelsearch.stored import load_candidates

        if args.candidates.startswith("store:"):
            candidates = load_candidates(self._store(args.store, create=False), args.candidates[len("store:"):])
        else:
            candidates = self._var(args.candidates, "candidates")
        data = self._var(args.data, "data")
        budget = parse_size(args.budget) if args.budget is not None else None
        if args.k < 1:
            raise UsageError(f"-k must be at least 1, not {args.k}")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {args.batch_size}")
        if args.layers < 1:
            raise UsageError(f"--layers must be at least 1, not {args.layers}")
        if args.feature_budget is not None and not args.reuse:
            raise UsageError("--feature-budget needs --reuse")
        feature_budget = None if args.feature_budget is None else parse_size(args.feature_budget,
                                                                             "--feature-budget")
        if args.keep is not None:
            from ..store.searchlog import check_dataset

            try:
                check_dataset(args.keep)
            except StoreError as e:
                raise UsageError(f"--keep: {e}") from None
        progress = None
        if not args.no_widget:
            from .widgets import SearchProgress

            progress = SearchProgress()
            progress.display_live()
        try:
            result = search(candidates, data, k=args.k, approach=args.approach, cache_budget=budget,
                            device=args.device, proxy=args.proxy, progress=progress,
                            store=self._store(args.store) if args.reuse else None, reuse=args.reuse,
                            layers=args.layers, batch_size=args.batch_size, seed=args.seed,
                            feature_budget=feature_budget)
        except (KeyboardInterrupt, MMError):
            if progress is not None:
                progress.interrupted()
            raise
        if args.out is not None:
            if not args.out.isidentifier():
                raise UsageError(f"-o must be a variable name, not {args.out!r}")
            self.shell.user_ns[args.out] = result
        if args.keep is not None:
            result.save(self._store(args.store), dataset=args.keep)
        return result


def _as_models(value: Any) -> Any:
    """A single module is a set of one; lists, tuples and dicts go to the store as they are."""
    if isinstance(value, (list, tuple, dict)):
        return list(value) if isinstance(value, tuple) else value
    if type(value).__module__.startswith("torch") or hasattr(value, "state_dict"):
        return [value]
    raise UsageError(f"the cell produced {a_type(value)}; expected a list or dict of nn.Module")


ModelMagics.modelset.__doc__ = _usage()
ModelMagics.modelsearch.__doc__ = SEARCH.format_help()


def store_location(path: str | None = None, configured: str | None = None) -> str | Path:
    """Where the magics' store is: ``--store`` > ``%config ModelMagics.store`` > the default rule
    (``$MM_JUPYTER_STORE`` or ``.mm_store``, relative to the kernel's working directory); a
    ``postgresql://`` URL is kept as it is."""
    from ..store.backends import is_database
    from ..store.store import default_path

    chosen = path or configured
    if is_database(chosen):
        return str(chosen)
    if chosen:
        return Path(os.path.abspath(os.path.expanduser(chosen)))
    found = default_path(os.getcwd())
    return found if isinstance(found, str) else found.resolve()


def kernel_store() -> StoreInfo:
    """The store this kernel's magics use right now. The JupyterLab sidebar asks the kernel for it
    (a silent ``user_expressions`` request), so the panel lists what the notebook saves."""
    from IPython import get_ipython

    from ..store.backends import display
    from .locations import register

    shell = get_ipython()
    magics = shell.magics_manager.registry.get(ModelMagics.__name__) if shell is not None else None
    path = store_location(None, magics.store if isinstance(magics, ModelMagics) else None)
    # the sidebar gets an id, not the location: it travels in a URL query (logs, history) and the
    # server opens only what a kernel of its own registered (see jupyter/locations.py)
    sid = register(str(path), _runtime_dir())
    return StoreInfo(sid, store_exists(path), display(path))


def _runtime_dir() -> str | None:
    """Where this kernel's server keeps connection files (and so the store ids): the folder of the
    kernel's connection file; None (Jupyter's default runtime folder) outside a kernel."""
    try:
        from ipykernel.connect import get_connection_file

        return os.path.dirname(os.path.abspath(get_connection_file()))
    except (ImportError, RuntimeError, OSError):  # no ipykernel, not in a kernel (terminal IPython, tests), no file
        return None


def register(shell: Any) -> ModelMagics:
    """Register the magics once per shell; IPython's registry also makes ``%config ModelMagics`` work."""
    existing = shell.magics_manager.registry.get(ModelMagics.__name__)
    if isinstance(existing, ModelMagics):
        return existing
    magics = ModelMagics(shell)
    shell.register_magics(magics)
    if magics not in shell.configurables:
        shell.configurables.append(magics)
    from .serve_magics import register as register_serve

    register_serve(shell, magics)
    return magics
