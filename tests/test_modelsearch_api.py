

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
