"""``%modelserve`` through a real InteractiveShell, and the live serving widget with its static picture."""
from __future__ import annotations

import re
import time
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
        assert [s.t for s in monitor.samples] == [1.0, 2.0]
        # live: HTML with inline SVG charts and the text, no widget and no plotly (whose renderer never redraws)
        live = monitor._repr_mimebundle_()
        assert set(live) == {"text/html", "text/plain"}
        assert live["text/html"].count("<svg") == 3 and "<script" not in live["text/html"]
        status = monitor.status_lines()
        assert status[0] == "cells@latest -> cells@1, multi batching"
        assert status[1].startswith("now, last 1 s: 12 answered in ") and "50% from the cache" in status[1]
        assert status[-1].endswith("cache hits 50%")
        assert live["text/plain"].splitlines() == [repr(monitor), *status]
        assert repr(monitor) == "ServingMonitor(cells@latest, multi batching, max_batch 256, cache 10000)"
        running = ServingMonitor(server, interval=0.02)
        server.predict(0, torch.ones(5))
        deadline = time.monotonic() + 30
        while len(running.samples) < 2 and time.monotonic() < deadline:  # the thread samples by itself
            time.sleep(0.01)
    running._thread.join(5)
    assert not running._thread.is_alive() and len(running.samples) >= 2 and running.final
    assert "(stopped)" in running.status_lines()[0]
    # stopped: the plotly figure (every panel switched by the log/linear buttons), a PNG and the text
    monitor.stop()
    final = monitor._repr_mimebundle_()
    figure = final[PLOTLY_MIME]
    assert [t["name"] for t in figure["data"]] == ["throughput", "p50", "p95", "p99", "model calls"]
    # its last reading is taken when it stops: 6 computed, 6 from the cache, then one more computed
    assert sum(int(k) * v for k, v in zip(figure["data"][4]["x"], figure["data"][4]["y"])) == 7
    (menu,) = figure["layout"]["updatemenus"]
    assert [b["args"][0] for b in menu["buttons"]] == [{f"yaxis{i}.type": scale for i in ("", "2", "3")}
                                                       for scale in ("log", "linear")]
    assert final["text/html"].count('<img src="data:image/png;base64,') == 1 and "<table>" in final["text/html"]
    with pytest.raises(ValueError):
        ServingMonitor(server, interval=0)


def test_load_result_widget_and_metrics_agree(ip, tmp_path):
    """One source of truth: the LoadResult of %modelserve load, %modelserve metrics and the widget's
    'last load' line are the same numbers over the same named window, printed rounded."""
    ip.run_line_magic("modelserve", "start fleet@latest --cache 100")
    (monitor,) = ip.find_magic("modelserve").__self__.monitors.values()
    ip.user_ns["pool"] = torch.randn(32, 5)
    result = ip.run_line_magic("modelserve", "load --rate 1500 --requests 400 --spread zipf --repeat 0.3 --inputs pool")
    metrics = ip.run_line_magic("modelserve", "metrics")
    window = metrics["window"]
    assert window["label"] == result.window == "load at 1,500/s"
    assert window["answered"] == result.answered == 400 and window["cached"] == result.cached
    for key in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "seconds"):
        assert window[key] == getattr(result, key), key
    assert metrics["throughput_rps"] == result.throughput_rps and metrics["latency_ms"]["p99"] == result.p99_ms
    monitor.sample()
    line = result.stats().describe()
    assert "last " + line in monitor.status_lines()
    assert line in repr(metrics).splitlines()[1] and line in repr(result).splitlines()[1]
    assert re.fullmatch(r"load at 1,500/s: 400 answered in \d+\.\d\d s, [\d,]+ answers/s; latency p50 [\d.]+ ms, "
                        r"p95 [\d.]+ ms, p99 [\d.]+ ms(, \d+% from the cache)?", line), line
    recent = ip.run_line_magic("modelserve", "metrics --window 30")
    assert recent["window"]["label"] == "last 30 s" and recent["window"]["answered"] == 400
    with pytest.raises(UsageError):
        ip.run_line_magic("modelserve", "metrics --window 0")
    ip.run_line_magic("modelserve", "stop")
    assert monitor.final and monitor.server.closed  # the stopped monitor's last picture has its PNG
