"""``%modelserve``: serve a stored set from the notebook, watch it live, load it, stop it.

    %modelserve start fleet@latest --max-batch 256 --max-wait-ms 2 --cache 10000 --http -o server
    %modelserve load fleet@latest --rate 2000 --requests 4000 --spread zipf --repeat 0.3 --inputs pool
    %modelserve metrics fleet@latest
    %modelserve list
    %modelserve stop fleet@latest          # or: %modelserve stop   (every server)

Servers are kept per reference as typed (``fleet@latest``); starting the same reference again
replaces the old server. The store is resolved as for ``%modelset`` (``--store``, ``%config
ModelMagics.store``, ``$MM_JUPYTER_STORE``, ``./.mm_store``). Registered by ``magics.register``.
"""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

STORE_HELP = "store folder (default: %%config ModelMagics.store, $MM_JUPYTER_STORE, else ./.mm_store)"
BATCHING = ("multi", "model", "none")


def _parsers() -> dict[str, MagicArgumentParser]:
    def parser(prog: str, description: str) -> MagicArgumentParser:
        return MagicArgumentParser(prog=prog, description=description, add_help=False)

    p: dict[str, MagicArgumentParser] = {}
    start = p["start"] = parser("%modelserve start", "Serve a stored set (name@latest follows new versions) "
                                "with a live throughput/latency widget; returns the Server.")
    start.add_argument("ref", help="name@latest (or name), or name@version to pin one version")
    start.add_argument("--batching", default="multi", choices=BATCHING,
                       help="multi: one call over many models; model: one call per model; none: one at a time")
    start.add_argument("--max-batch", type=int, default=256, help="rows per batch")
    start.add_argument("--max-wait-ms", type=float, default=None,
                       help="longest wait of a batch forming while the worker computes (an idle worker never waits; "
                            "default: one measured batch's cost, at most 2 ms)")
    start.add_argument("--cache", type=int, default=10_000, help="answers kept in the prediction cache (0: off)")
    start.add_argument("--queue", type=int, default=10_000,
                       help="requests that may wait before new ones are rejected")
    start.add_argument("--modules", type=int, default=1024, help="built modules kept for --batching model/none")
    start.add_argument("--watch", type=float, default=1.0, help="seconds between checks for a new version")
    start.add_argument("--http", action="store_true", help="also serve over HTTP (token-protected)")
    start.add_argument("--host", default="127.0.0.1", help="HTTP address (with --http)")
    start.add_argument("--port", type=int, default=0, help="HTTP port (with --http; 0: a free one)")
    start.add_argument("--no-widget", action="store_true", help="do not show the live widget")
    start.add_argument("-o", "--out", default=None, metavar="VAR", help="also assign the Server to VAR")
    start.add_argument("--store", default=None, help=STORE_HELP)
    stop = p["stop"] = parser("%modelserve stop", "Stop one server (answering what is queued), or all of them.")
    stop.add_argument("ref", nargs="?", default=None, help="the reference it was started with (default: all)")
    p["list"] = parser("%modelserve list", "The running servers.")
    metrics = p["metrics"] = parser("%modelserve metrics", "Throughput and latency of a server over a stated "
                                    "window (the last load run, else the last 10 s), batches and cache.")
    metrics.add_argument("ref", nargs="?", default=None,
                         help="the reference it was started with (default: the only one)")
    metrics.add_argument("--window", type=float, default=None, metavar="SECONDS",
                         help="the last SECONDS seconds instead of the last load's window")
    load = p["load"] = parser("%modelserve load", "Open-loop load (Poisson arrivals) against a running server; "
                              "returns the measured throughput and latency percentiles.")
    load.add_argument("ref", nargs="?", default=None, help="the reference it was started with (default: the only one)")
    load.add_argument("--rate", type=float, required=True, help="requests per second")
    load.add_argument("--requests", type=int, default=2000, help="how many requests")
    load.add_argument("--spread", default="uniform", choices=("uniform", "zipf"),
                      help="how requests spread over models")
    load.add_argument("--repeat", type=float, default=0.0, help="fraction of requests repeating an earlier one exactly")
    load.add_argument("--inputs", default=None, metavar="VAR",
                      help="variable holding a pool of inputs, shape (pool, *input_shape) (default: random normal)")
    load.add_argument("--seed", type=int, default=0)
    return p


PARSERS = _parsers()


@magics_class
class ServeMagics(Magics):
    """``%modelserve``; shares the store resolver of ``ModelMagics``."""

    shell: InteractiveShell  # always given (Magics allows None for magics made without a shell)

    def __init__(self, shell: Any, model_magics: Any) -> None:
        super().__init__(shell=shell)
        self._model_magics = model_magics
        self.servers: dict[str, Any] = {}
        self.monitors: dict[str, Any] = {}

    @line_magic
    def modelserve(self, line: str) -> Any:
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"%modelserve: {e}") from None
        if not argv or argv[0] not in PARSERS:
            raise UsageError("%modelserve needs a command: " + ", ".join(PARSERS) + " (see %modelserve?)")
        args = PARSERS[argv[0]].parse_args(argv[1:])
        return getattr(self, f"_{argv[0]}")(args)

    def _server(self, ref: str | None) -> Any:
        if ref is None:
            if len(self.servers) != 1:
                raise UsageError("name the server: " + (", ".join(self.servers) or "none is running "
                                                         "(start one with %modelserve start NAME@latest)"))
            return next(iter(self.servers.values()))
        if ref not in self.servers:
            raise UsageError(f"no server started as {ref!r}; running: {', '.join(self.servers) or 'none'}")
        return self.servers[ref]

    def _start(self, args: Any) -> Any:
        from ..serving.server import serve

        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o must be a variable name, not {args.out!r}")
        store = self._model_magics._store(args.store)
        if args.ref in self.servers:
            self._close(args.ref)
        server = serve(store, args.ref, batching=args.batching, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, cache_size=args.cache, max_queue=args.queue,
                          max_modules=args.modules, watch_s=args.watch if args.watch > 0 else None)
        self.servers[args.ref] = server
        if args.http:
            server.http(host=args.host, port=args.port)
        if args.out is not None:
            self.shell.user_ns[args.out] = server
        if not args.no_widget:
            from .widgets import ServingMonitor

            monitor = self.monitors[args.ref] = ServingMonitor(server, start=False)
            monitor.show()
        return server

    def _close(self, ref: str) -> None:
        """Close a server; its monitor draws its last picture (with a PNG) at once."""
        self.servers.pop(ref).close()
        monitor = self.monitors.pop(ref, None)
        if monitor is not None:
            monitor.stop()

    def _stop(self, args: Any) -> str:
        refs = list(self.servers) if args.ref is None else [args.ref]
        for ref in refs:
            self._server(ref)  # a UsageError for a name never started
            self._close(ref)
        return f"stopped {len(refs)} server(s)" + (f": {', '.join(refs)}" if refs else "")

    def _list(self, args: Any) -> Any:
        import pandas as pd

        rows = []
        for ref, server in self.servers.items():
            endpoint = server._http
            rows.append({"started as": ref, "version": str(server.version), "models": len(server.models),
                         "batching": server.batching, "max_batch": server.max_batch, "cache": server.cache.size,
                         "http": endpoint.url if endpoint is not None else ""})
        return pd.DataFrame(rows, columns=["started as", "version", "models", "batching", "max_batch", "cache", "http"])

    def _metrics(self, args: Any) -> Any:
        from .display import ServerMetrics

        server = self._server(args.ref)
        if args.window is not None and not args.window > 0:
            raise UsageError(f"--window must be > 0 seconds, not {args.window}")
        loaded = server.load_metrics() if args.window is None else None
        return ServerMetrics(loaded if loaded is not None else server.metrics(window_s=args.window or 10.0))

    def _load(self, args: Any) -> Any:
        import torch

        from ..serving.load import make_workload, open_loop

        server = self._server(args.ref)
        if args.rate <= 0 or args.requests < 1 or not 0 <= args.repeat < 1:
            raise UsageError("--rate must be > 0, --requests >= 1 and --repeat in [0, 1)")
        if args.inputs is not None:
            if not args.inputs.isidentifier() or args.inputs not in self.shell.user_ns:
                raise UsageError(f"--inputs: no variable named {args.inputs!r} in the notebook")
            inputs = list(self.shell.user_ns[args.inputs])  # rows of a tensor or array
        else:
            gen = torch.Generator().manual_seed(args.seed)
            inputs = list(torch.randn((1024, *server.input_shape), generator=gen))
        workload = make_workload(len(server.models), args.requests, len(inputs), spread=args.spread,
                                 repeat=args.repeat, seed=args.seed)
        return open_loop(server, workload, inputs, args.rate)


ServeMagics.modelserve.__doc__ = "\n".join([__doc__ or ""] + [p.format_help() for p in PARSERS.values()])


def register(shell: Any, model_magics: Any) -> ServeMagics:
    """Register ``%modelserve`` once per shell, sharing ``model_magics``' store resolver."""
    existing = shell.magics_manager.registry.get(ServeMagics.__name__)
    if isinstance(existing, ServeMagics):
        return existing
    magics = ServeMagics(shell, model_magics)
    shell.register_magics(magics)
    return magics
