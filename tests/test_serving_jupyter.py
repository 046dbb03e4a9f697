"""``%modelserve`` through a real InteractiveShell, and the live serving widget with its static picture."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.testing import globalipapp

import mm_jupyter as mm
from mm_jupyter.jupyter.widgets import ServingMonitor
from mm_jupyter.jupyter.widgets.serving import PLOTLY_MIME
from mm_jupyter.usecases.models import ffnn, seeded_models


@pytest.fixture
def ip(tmp_path: Path) -> Any:
    import IPython

    globalipapp.start_ipython()
    shell = IPython.get_ipython()
    shell.run_line_magic("load_ext", "mm_jupyter")
    store = mm.Store(tmp_path / "store")
    store.save_set(seeded_models(ffnn, 20, hidden=8), "fleet")
    shell.run_line_magic("config", f"ModelMagics.store = {str(tmp_path / 'store')!r}")
    yield shell
    shell.run_line_magic("modelserve", "stop")
    shell.run_line_magic("config", "ModelMagics.store = None")


def test_modelserve_start_load_metrics_stop(ip, tmp_path):
    server = ip.run_line_magic("modelserve", "start fleet@latest --max-batch 64 --cache 100 --no-widget -o srv")
    assert ip.user_ns["srv"] is server and str(server.version) == "fleet@1" and server.max_batch == 64
    listing = ip.run_line_magic("modelserve", "list")
    assert list(listing["started as"]) == ["fleet@latest"] and listing["http"][0] == ""
    ip.user_ns["pool"] = torch.randn(32, 5)
    result = ip.run_line_magic("modelserve", "load --rate 2000 --requests 300 --spread zipf --repeat 0.5 --inputs pool")
    assert result.answered == 300 and result.cached > 0 and result.rejected == 0
    metrics = ip.run_line_magic("modelserve", "metrics fleet@latest")
    assert metrics["answered"] == 300 and metrics["cache_hit_rate"] > 0
    again = ip.run_line_magic("modelserve", "start fleet@latest --batching model --http --no-widget")
    assert server.closed and again.batching == "model" and again._http is not None   # replaced
    assert ip.run_line_magic("modelserve", "list")["http"][0].startswith("http://127.0.0.1:")
    assert "stopped 1 server(s): fleet@latest" == ip.run_line_magic("modelserve", "stop fleet@latest")
    assert again.closed


def test_modelserve_usage_errors(ip):
    for line in ("", "serve fleet", "start", "start fleet --batching fast", "stop nothing", "metrics",
                 "load --requests 10", "start fleet -o 1x"):
        with pytest.raises(UsageError):
            ip.run_line_magic("modelserve", line)
    with pytest.raises(mm.RefError):
        ip.run_line_magic("modelserve", "start nothing@latest --no-widget")
    assert "%modelserve start" in ip.find_line_magic("modelserve").__doc__


def test_serving_monitor_samples_draws_and_has_a_static_picture(store):
    store.save_set(seeded_models(ffnn, 6, hidden=8), "cells")
    clock = iter(range(100)).__next__
    with mm.serve(store, "cells") as server:
        monitor = ServingMonitor(server, start=False, clock=lambda: float(clock()))
        for i in range(12):
            server.predict(i % 6, torch.zeros(5))
        sample = monitor.sample()
        assert sample.version == "cells@1" and sample.throughput > 0 and sample.hit_rate == pytest.approx(6 / 12)
        throughput, p50, p95, p99, bars = monitor.figure.data
        assert list(throughput.x) == [1.0, 2.0] and throughput.y[-1] == sample.throughput
        assert p99.y[-1] == sample.p99 and p50.name == "p50"
        assert sum(int(k) * v for k, v in zip(bars.x, bars.y)) == 6          # 6 computed, 6 from the cache
        assert "cells@latest" in monitor.status.value and "cache hits 50%" in monitor.status.value
        bundle = monitor._repr_mimebundle_()
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        assert "application/vnd.jupyter.widget-view+json" in data
        assert [t["name"] for t in data[PLOTLY_MIME]["data"]] == ["throughput", "p50", "p95", "p99", "model calls"]
        assert "<table>" in data["text/html"] and "<script" not in data["text/html"]
        assert data["text/plain"] == repr(monitor)
        assert repr(monitor) == "ServingMonitor(cells@latest, multi batching, max_batch 256, cache 10000)"
        live = ServingMonitor(server, interval=0.02)
        server.predict(0, torch.ones(5))
    live._thread.join(5)
    assert not live._thread.is_alive() and len(live.samples) >= 2 and "closed" in live.status.value
    live.stop()
    with pytest.raises(ValueError):
        ServingMonitor(server, interval=0)
