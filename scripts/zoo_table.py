"""Print the zoo's table: every architecture of ``mm_jupyter/bench/zoo.py`` (through the suite's helpers in
``tests/hf_zoo.py``) saved as a set of three plus an update and recovered in a fresh process (state
bit-exact, outputs equal), and every text and vision model searched with ``alsatian`` and ``shift`` on verified blocks.

    python scripts/zoo_table.py [NAME ...]        (all entries by default; several minutes)

Columns: architecture, domain, saved & recovered exactly, searchable (split verified, rankings equal to
shift, every shared block run once), the split (method, blocks, stem form, feature step), notes (why
not). The summary counts the targets of issue 20, and the accepted splits whose features differ from
what the model's classifier consumes (computed without the search code: ``hf_zoo.own_features``).
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def search_row(name: str) -> dict[str, Any]:
    """Split, verify and search entry ``name``; what happened."""
    import hf_zoo
    import torch

    import mm_jupyter as mm
    from mm_jupyter.modelsearch.splitting import split_model

    row: dict[str, Any] = {"searchable": False, "split": "", "notes": "", "wrong": False}
    x = hf_zoo.inputs(name, 24, seed=2)
    try:
        base = hf_zoo.build(name, 0)
        split = split_model(base, x[:8])
    except mm.MMError as e:
        row["notes"] = str(e).split("; declare its blocks")[0]
        return row
    recipe = split.recipe
    stem = getattr(recipe, "stem", "")
    reduce = getattr(recipe, "reduce", "") or ("feature map" if getattr(recipe, "spatial", False) else "")
    row["split"] = f"{split.kind}: {len(split.blocks)} blocks" + (f", stem {stem}, {reduce.split(':')[0]}" if stem
                                                                  else "")
    with torch.no_grad():
        ours = hf_zoo.head_input(split, split.features(x[:8]))
    try:
        ref = hf_zoo.own_features(base, name, x[:8])
        row["wrong"] = ours.shape != ref.shape or not torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    except Exception as e:  # noqa: BLE001 - no independent reference: reported
        row["notes"] = f"no independent reference: {type(e).__name__}"
    if row["wrong"]:
        row["notes"] = "ACCEPTED SPLIT WITH FEATURES THAT DIFFER"
        return row
    if hf_zoo.ZOO[name].domain == "audio":
        row["searchable"] = True
        row["notes"] = row["notes"] or "split verified (search not part of the target)"
        return row
    try:
        cands = hf_zoo.derived(name)
        y = hf_zoo.labels(len(x))
        shared = mm.search(cands, (x, y), k=1, approach="alsatian", batch_size=12)
        whole = mm.search(cands, (x, y), k=1, approach="shift", batch_size=12)
    except mm.MMError as e:
        row["notes"] = str(e)
        return row
    same = list(shared.ranking["model"]) == list(whole.ranking["model"]) and list(shared.ranking["score"]) == list(
        whole.ranking["score"])
    once = shared.stats["block_inferences"] == shared.stats["unique_edges"] < whole.stats["block_inferences"]
    row["searchable"] = same and once
    if not row["searchable"]:
        row["notes"] = "rankings differ from shift" if not same else "shared blocks ran more than once"
    return row


def main(names: list[str]) -> int:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    import hf_zoo

    import mm_jupyter as mm

    names = names or list(hf_zoo.ZOO)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = mm.Store(Path(tmp) / "zoo")
        want = {name: hf_zoo.save(store, name) for name in names}
        store.close()
        saved = [n for n in names if "error" not in want[n]]
        got = hf_zoo.recover_fresh(str(Path(tmp) / "zoo"), saved) if saved else {}
    rows = []
    for name in names:
        problem = hf_zoo.roundtrip_problem(want[name], got.get(name, {}))
        row = search_row(name)
        notes = "; ".join(n for n in (problem, row["notes"]) if n)
        rows.append((name, hf_zoo.ZOO[name].domain, problem is None, row, notes))
    print("| architecture | domain | saved & recovered | searchable | split | notes |")
    print("|---|---|---|---|---|---|")
    for name, domain, ok, row, notes in rows:
        print(f"| {name} | {domain} | {'yes' if ok else 'NO'} | {'yes' if row['searchable'] else 'NO'} | "
              f"{row['split']} | {notes.replace('|', '/')} |")
    stored = sum(ok for _, _, ok, _, _ in rows)
    searched = [r for r in rows if r[1] != "audio"]
    found = sum(r[3]["searchable"] for r in searched)
    wrong = sum(r[3]["wrong"] for r in rows)
    print(f"\nsaved and recovered exactly: {stored}/{len(rows)} ({100 * stored / len(rows):.1f} %)")
    if searched:
        print(f"searchable (text and vision): {found}/{len(searched)} ({100 * found / len(searched):.1f} %)")
    print(f"accepted splits whose features differ from the model's own: {wrong}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
