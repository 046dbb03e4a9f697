"""The zoo suite (issue 20): Hugging Face architectures across text, vision and audio at tiny configs
(random weights, built offline), each saved as a set of three plus an update version and recovered in
a fresh process — state bit-exact, outputs equal — and each text and vision model searched with
``alsatian`` and ``shift`` on three candidates sharing a prefix: equal rankings and scores, every
shared block run once, and the split's features equal to what the model's classifier consumes
(computed here without the search code). The normal run takes ``hf_zoo.QUICK``; ``MM_ZOO=full``
runs every entry (``python scripts/zoo_table.py`` prints the whole zoo's table)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import mm_jupyter as mm

tf = pytest.importorskip("transformers")
import hf_zoo  # noqa: E402
from search_models import assert_search_agrees  # noqa: E402

from mm_jupyter.modelsearch.splitting import split_model  # noqa: E402
from mm_jupyter.modelsearch.verify import check_split, clear_verdicts, general_position  # noqa: E402

pytestmark = pytest.mark.xdist_group("hf-zoo")  # its module-scoped fixture is built once

NAMES = hf_zoo.profile()
SEARCHED = [n for n in NAMES if hf_zoo.ZOO[n].domain != "audio"]
SEARCHED += [n for n in hf_zoo.LEARNT if n not in SEARCHED]


def test_the_zoo_covers_text_vision_and_audio() -> None:
    domains = [e.domain for e in hf_zoo.ZOO.values()]
    assert len(hf_zoo.ZOO) >= 45 and all(domains.count(d) >= 8 for d in ("text", "vision", "audio"))
    assert {hf_zoo.ZOO[n].domain for n in hf_zoo.QUICK} == {"text", "vision", "audio"}
    models = {hf_zoo.ZOO[n].model for n in hf_zoo.ZOO}
    for needed in ("LlamaModel", "MistralModel", "Qwen2Model", "GemmaModel", "PhiModel", "FalconModel", "GPTNeoXModel",
                   "T5EncoderModel", "AlbertModel", "Dinov2ForImageClassification"):
        assert needed in models, needed


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    path = tmp_path_factory.mktemp("zoo") / "store"
    store = mm.Store(path)
    want = {name: hf_zoo.save(store, name) for name in NAMES}
    store.close()
    saved = [name for name, w in want.items() if "error" not in w]
    got = hf_zoo.recover_fresh(str(path), saved) if saved else {}
    return want, got


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_set_and_its_update_recover_exactly_in_a_fresh_process(roundtrip: tuple[dict, dict], name: str) -> None:
    want, got = roundtrip
    assert hf_zoo.roundtrip_problem(want[name], got.get(name, {})) is None


@pytest.mark.parametrize("name", SEARCHED)
def test_search_agrees_with_shift_on_verified_blocks(name: str) -> None:
    cands = hf_zoo.derived(name)
    x = hf_zoo.inputs(name, 24, seed=2)
    y = hf_zoo.labels(24)
    base = cands["base"]
    split = split_model(base, x[:8])
    with general_position(base):
        assert check_split(base, split, x[:8]) is None
    # the features are what the model's classifier consumes, computed without the search code
    feats = split.features(x[:8])
    torch.testing.assert_close(hf_zoo.head_input(split, feats), hf_zoo.own_features(base, name, x[:8]),
                               atol=1e-4, rtol=1e-4)
    assert_search_agrees(cands, x, y)


def test_verdicts_are_paid_once_per_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search over many candidates of one architecture checks the first only: the others are
    cached by structure, and a second search on the same data checks none."""
    from mm_jupyter.modelsearch import verify

    clear_verdicts()
    checked: list[str] = []
    real = verify.check_split

    def counting(model: Any, split: Any, probe: torch.Tensor) -> str | None:
        checked.append(type(model).__name__)
        return real(model, split, probe)

    monkeypatch.setattr(verify, "check_split", counting)
    cands = {f"m{i}": hf_zoo.build("llama", i) for i in range(4)}
    x = hf_zoo.inputs("llama", 40, seed=3)
    mm.search(cands, (x, hf_zoo.labels(40)), k=1, approach="alsatian", batch_size=20)
    assert checked == ["LlamaModel"]
    mm.search(cands, (x, hf_zoo.labels(40)), k=1, approach="shift", batch_size=20)
    assert checked == ["LlamaModel"]


def test_roundtrip_helpers_report_what_differs() -> None:
    """The suite's comparison would fail on a changed state, a changed output or an error."""
    want = {"1": {"state": [{"a": "x"}], "outputs": [["o"]]}, "2": {"state": [{"a": "y"}], "outputs": [["p"]]}}
    assert hf_zoo.roundtrip_problem(want, want) is None
    assert "state differs" in str(hf_zoo.roundtrip_problem(want, {**want, "2": {**want["2"], "state": [{"a": "z"}]}}))
    assert "outputs differ" in str(hf_zoo.roundtrip_problem(want, {**want, "1": {**want["1"], "outputs": [["q"]]}}))
    assert "recover v1" in str(hf_zoo.roundtrip_problem(want, {"1": {"error": "boom"}, "2": want["2"]}))
    assert "save" in str(hf_zoo.roundtrip_problem({"error": "refused"}, {}))


def test_own_features_reference_is_not_the_first_token_for_dinov2(tmp_path: Path) -> None:
    """The suite's reference follows the family's classifier: DINOv2's is CLS next to the mean
    patch token, so a split giving only the first token would fail the search test above."""
    model = hf_zoo.build("dinov2", 0)
    x = hf_zoo.inputs("dinov2", 3)
    ref = hf_zoo.own_features(model, "dinov2", x)
    with torch.no_grad():
        tokens = model(x).last_hidden_state
    assert ref.shape == (3, 2 * tokens.shape[-1])
    torch.testing.assert_close(ref, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1))


def test_context_the_backbone_computes_before_its_layers_is_owned_by_the_stem() -> None:
    """DeBERTa-v2's layers get relative embeddings that its encoder computes from its own table
    (read as a weight, never called): the forward-prefix stem owns that table, so a candidate whose
    table differs shares no block with the base (its layers would get other embeddings), while one
    that differs in its last layer shares the stem; both splits give their own model's features."""
    from mm_jupyter.modelsearch.hashing import block_ids

    x = hf_zoo.inputs("deberta-v2", 8, seed=1)
    base = hf_zoo.build("deberta-v2", 0)
    table, last = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        table.encoder.rel_embeddings.weight.add_(0.5)
        last.encoder.layer[-1].output.dense.weight.add_(0.5)
    splits = {name: split_model(m, x) for name, m in (("base", base), ("table", table), ("last", last))}
    recipe = splits["base"].recipe
    assert recipe.stem == "prefix" and any(p.endswith("rel_embeddings") for p in recipe.stem_paths)
    assert any("=prefix.rel_embeddings" in entry for _, _, inputs, _ in recipe.layers for entry in inputs)
    ids = {name: block_ids(split.blocks) for name, split in splits.items()}
    assert ids["table"][0] != ids["base"][0]
    assert ids["last"][:2] == ids["base"][:2] and ids["last"][2] != ids["base"][2]
    for name, model in (("table", table), ("last", last)):
        assert check_split(model, splits[name], x) is None
        torch.testing.assert_close(hf_zoo.head_input(splits[name], splits[name].features(x)),
                                   hf_zoo.own_features(model, "deberta-v2", x), atol=1e-4, rtol=1e-4)
    assert_search_agrees({"base": base, "table": table, "last": last}, hf_zoo.inputs("deberta-v2", 24, seed=2),
                         hf_zoo.labels(24))
