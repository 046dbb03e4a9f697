

def test_a_tensor_on_another_device_is_found_anywhere_in_the_tree():
    """``_prepare`` moves a candidate only when one of its parameters or buffers is elsewhere; the
    walk reads every module's own tensors (shared submodules once, empty slots skipped)."""
    import torch
    from torch import nn

    from mm_jupyter.modelsearch.api import _elsewhere

    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared), nn.Linear(3, 2, bias=False))
    assert model[2].bias is None
    cpu = torch.device("cpu")
    assert not _elsewhere(model, cpu)
    model[1][0].register_buffer("deep", torch.zeros(2, device="meta"))
    assert _elsewhere(model, cpu)
    assert _elsewhere(model, torch.device("meta"))  # seen from the meta device, the rest is elsewhere
    del model[1][0].deep
    model[2].weight = nn.Parameter(torch.zeros(2, 3, device="meta"))
    assert _elsewhere(model, cpu)


def test_eval_is_skipped_only_when_it_would_change_nothing():
    """``_survey`` says a candidate needs no ``eval()`` only when every module is in eval mode and
    only ``nn.Module``'s (or Hugging Face's) ``train``/``eval`` would run; a search still calls the
    model's own ``train`` when it has one, even with every module in eval mode already."""
    import torch
    from torch import nn

    import mm_jupyter as mm
    from mm_jupyter.modelsearch.api import _survey

    cpu = torch.device("cpu")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3))).eval()
    assert _survey(model, cpu) == (True, False)
    model[2][0].register_buffer("far", torch.zeros(1, device="meta"))
    assert _survey(model, cpu) == (True, True)
    del model[2][0].far
    model[2].training = True  # one module deep inside in training mode
    assert _survey(model, cpu) == (False, False)
    model.eval()
    model[1].train = lambda mode=True: model[1]  # an instance's own train
    assert not _survey(model, cpu)[0]
    del model[1].train
    assert _survey(model, cpu)[0]

    calls = []

    class Frozen(nn.Linear):
        """Puts its statistics into eval whatever ``mode`` says: a side effect eval() must run."""

        def train(self, mode: bool = True) -> "Frozen":
            calls.append(mode)
            return super().train(mode)

    torch.manual_seed(0)
    cands = {f"m{i}": nn.Sequential(Frozen(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval() for i in range(3)}
    calls.clear()
    assert not _survey(cands["m0"], cpu)[0]
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    mm.search(cands, (x, y), k=1, seed=0)
    assert calls.count(False) >= len(cands), "the candidates' own train() did not run"


def test_a_hugging_face_model_in_eval_mode_is_settled_unless_it_uses_kernels():
    import pytest

    transformers = pytest.importorskip("transformers")
    import torch

    from mm_jupyter.modelsearch.api import _survey

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    cpu = torch.device("cpu")
    assert _survey(model, cpu)[0]
    model.use_kernels = True
    assert not _survey(model, cpu)[0]
