"""Alsatian's bottleneck analysis (Sec. 3, Fig. 5): where the time goes when one model is scored.

One candidate is scored the way the paper's Fig. 5 times it, in four phases:

* **prepare data**: read the images from disk as stored (uint8, a larger source resolution), convert
  them to floats, resize them to the model's input and normalise; with a cache, read the cached
  intermediate (the input of the last ``n`` blocks) from disk instead;
* **prepare model**: read every needed block's parameters from disk (one safetensors file per block,
  as a block store holds them), load them into the block and move it to the device;
* **inference**: the blocks over the data in batches;
* **proxy**: the linear proxy trained on 80% of the features and scored on the rest.

The paper's model store reads at most 200 MB/s from hard disks, cold; ours is the page cache of a local
disk, warm. So each row also gives the phases with *prepare model* modelled at the paper's read speed
(its bytes over 200 MB/s, when that is slower than what we measured): the share the paper's setting would
see with our compute.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

PHASES = ("prepare data", "prepare model", "inference", "proxy")
#: the paper's cap on reading the model store (Sec. 6, hardware)
READ_BYTES_PER_S = 200e6
Progress = Callable[[str], None]


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def score_one(model: Any, items: int, side: int, *, cached_blocks: int | None = None, device: str = "cpu",
              batch_size: int = 64, repeats: int = 3, seed: int = 0,
              progress: Progress = lambda m: None) -> dict[str, Any]:
    """Median seconds per phase (``t_<phase>``) of scoring ``model`` on ``items`` images of ``side``
    pixels, over ``repeats`` runs; with ``cached_blocks`` only the last that many blocks run, on their
    cached input read from disk. Also the bytes read per phase and the shares of the total."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from ..modelsearch.proxies import linear_proxy
    from ..modelsearch.splitting import split_model

    split = split_model(model)
    blocks = split.blocks
    first = 0 if cached_blocks is None else max(0, len(blocks) - cached_blocks)
    work = Path(tempfile.mkdtemp(prefix="mm_bottleneck_"))
    try:
        rng = np.random.default_rng(seed)
        source = side + side // 7  # stored larger than the model's input, like 256 px images for 224
        images = rng.integers(0, 256, size=(items, 3, source, source), dtype=np.uint8)
        labels = torch.from_numpy(np.arange(items) % 10)
        np.save(work / "images.npy", images)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

        def prepare_data() -> Any:
            raw = torch.from_numpy(np.load(work / "images.npy"))
            x = F.interpolate(raw.float().div_(255.0), size=(side, side), mode="bilinear", align_corners=False)
            return (x - mean) / std

        block_bytes = []
        for i, block in enumerate(blocks[first:], start=first):
            state = {k: v.detach().contiguous().clone() for k, v in block.module.state_dict().items()}
            save_file(state, str(work / f"block{i}.safetensors"))
            block_bytes.append((work / f"block{i}.safetensors").stat().st_size)
        data_bytes = images.nbytes
        if cached_blocks is not None:  # the cached intermediate, computed once (untimed) and stored
            x = prepare_data()
            ctx = split.context(x)
            parts = []
            with torch.inference_mode():  # in the batches the uncached run uses
                for s in range(0, items, batch_size):
                    h = x[s:s + batch_size]
                    for block in blocks[:first]:
                        h = block(h, ctx)
                    parts.append(h)
            save_file({"h": torch.cat(parts).contiguous()}, str(work / "cached.safetensors"))
            data_bytes = (work / "cached.safetensors").stat().st_size
        runs: dict[str, list[float]] = {p: [] for p in PHASES}
        score, checksum = None, None
        for r in range(repeats):
            for b in blocks:  # nothing of an earlier run stays on the device
                b.module.to("cpu")
            t0 = time.perf_counter()
            x = load_file(str(work / "cached.safetensors"))["h"] if cached_blocks is not None else prepare_data()
            x = x.to(device)
            _sync(device)
            runs["prepare data"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, block in enumerate(blocks[first:], start=first):
                block.module.load_state_dict(load_file(str(work / f"block{i}.safetensors")))
                block.module.to(device).eval()
            _sync(device)
            runs["prepare model"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            feats = []
            ctx = {k: v.to(device) for k, v in split.context(x).items()}
            with torch.inference_mode():
                for s in range(0, items, batch_size):
                    h = x[s:s + batch_size]
                    for block in blocks[first:]:
                        h = block(h, ctx)
                    feats.append(h.reshape(len(h), -1).float().cpu())
            _sync(device)
            runs["inference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            f = torch.cat(feats)
            checksum = [float(f.double().sum()), float(f.double().abs().sum())]
            n_train = max(1, int(0.8 * items))
            score = linear_proxy(f[:n_train], labels[:n_train], f[n_train:], labels[n_train:], seed=seed).score
            runs["proxy"].append(time.perf_counter() - t0)
            progress(f"run {r + 1}/{repeats}: " + ", ".join(f"{p} {v[-1]:.3f} s" for p, v in runs.items()))
    finally:
        for b in blocks:
            b.module.to("cpu")
        shutil.rmtree(work, ignore_errors=True)
    row: dict[str, Any] = {f"t_{p}": statistics.median(v) for p, v in runs.items()}
    row.update({"items": items, "side": side, "cached_blocks": cached_blocks, "blocks_run": len(blocks) - first,
                "model_bytes_read": sum(block_bytes), "data_bytes_read": int(data_bytes), "repeats": repeats,
                "score": score, "feature_checksum": checksum})
    total = sum(row[f"t_{p}"] for p in PHASES)
    row["seconds"] = total
    row.update({f"share_{p}": row[f"t_{p}"] / total for p in PHASES})
    # the same phases with the paper's model store (200 MB/s, cold): prepare model modelled from the bytes
    hdd = max(row["t_prepare model"], sum(block_bytes) / READ_BYTES_PER_S)
    hdd_total = total - row["t_prepare model"] + hdd
    row["t_prepare model (200 MB/s)"] = hdd
    row.update({f"share_{p} (200 MB/s)": (hdd if p == "prepare model" else row[f"t_{p}"]) / hdd_total
                for p in PHASES})
    return row


def bottleneck_rows(models: Sequence[tuple[str, Any]], sizes: Sequence[int], cached_items: int, side: int, *,
                    cached_blocks: int = 3, device: str = "cpu", repeats: int = 3,
                    progress: Progress = lambda m: None) -> list[dict[str, Any]]:
    """Fig. 5's panels: every model at every dataset size without a cache, and at ``cached_items`` with
    only its last ``cached_blocks`` blocks run on a cached input."""
    rows = []
    for name, model in models:
        for items in sizes:
            progress(f"{name}: {items} items, no cache")
            rows.append({"arch": name, "panel": f"{items} items, no cache",
                         **score_one(model, items, side, device=device, repeats=repeats, progress=progress)})
        progress(f"{name}: {cached_items} items, cached input of the last {cached_blocks} blocks")
        rows.append({"arch": name, "panel": f"{cached_items} items, last {cached_blocks} blocks cached",
                     **score_one(model, cached_items, side, cached_blocks=cached_blocks, device=device,
                                 repeats=repeats, progress=progress)})
    return rows
