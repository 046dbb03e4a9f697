"""Errors inside a ``%%modelset save`` cell are the user's own: the notebook shows their cell's
traceback (their frames only, none of the magic's), the cell fails, and nothing is stored."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_magics import _shell

import mm_jupyter as mm
from mm_jupyter.jupyter.cells import CellError


@pytest.fixture
def ip(tmp_path: Path) -> Any:
    shell = _shell()
    shell.run_line_magic("load_ext", "mm_jupyter")
    shell.run_line_magic("config", f"ModelMagics.store = {str(tmp_path / 'store')!r}")
    shell.run_cell("import torch\nfrom torch import nn\nimport mm_jupyter as mm")
    yield shell
    shell.run_line_magic("config", "ModelMagics.store = None")


def shown(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


def no_magic_frames(lines: list[str]) -> None:
    text = "\n".join(lines)
    for internal in ("magics.py", "cells.py", "interactiveshell.py", "run_cell_magic", "mm_jupyter/jupyter"):
        assert internal not in text, f"{internal} shown in:\n{text}"


def test_exception_in_the_cell_shows_the_users_frames(ip: Any, capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    capsys.readouterr()
    result = ip.run_cell("%%modelset save bad\ndef helper(x):\n    return x / 0\nhelper(1)\n")
    assert isinstance(result.error_in_exec, CellError)
    assert isinstance(result.error_in_exec, mm.MMError)
    assert isinstance(result.error_in_exec.error, ZeroDivisionError)
    lines = shown(capsys)
    no_magic_frames(lines)
    text = "\n".join(lines)
    assert "helper(1)" in text and "return x / 0" in text and "in helper" in text
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert len(lines) < 15
    assert not (tmp_path / "store").exists() or mm.Store(tmp_path / "store").sets().empty


def test_syntax_error_in_the_cell(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    result = ip.run_cell("%%modelset save bad\nmodels = [nn.Linear(2, 1)\nmodels\n")
    assert isinstance(result.error_in_exec, CellError)
    lines = shown(capsys)
    no_magic_frames(lines)
    assert lines[-1].startswith("SyntaxError:") and len(lines) <= 5
    assert any("models = [nn.Linear(2, 1)" in line for line in lines)


def test_errors_of_the_store_stay_one_line(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """An MMError raised by code the cell calls is not wrapped: still one clear line."""
    capsys.readouterr()
    result = ip.run_cell("%%modelset save bad\nmm.Store().recover_set('nope@1')\n")
    assert isinstance(result.error_in_exec, mm.RefError)
    assert shown(capsys) == [f"RefError: {result.error_in_exec}"]


def test_exception_in_provenance_training_code(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("from mm_jupyter.usecases.training import initial_models\n"
                "from mm_jupyter.usecases.battery import cell_ref\nds = {'1': cell_ref(1, version=1)}")
    ip.run_cell_magic("modelset", "save base", "initial_models(3, hidden=8)")
    capsys.readouterr()
    result = ip.run_cell("%%modelset save base --approach provenance --datasets ds\n"
                         "scale = config.get('scale', 0)\nmodel.missing_attribute(scale)\n")
    assert isinstance(result.error_in_exec, CellError)
    lines = shown(capsys)
    no_magic_frames(lines)
    text = "\n".join(lines)
    assert "model.missing_attribute(scale)" in text and "train_cell" in text
    assert "provenance.py" not in text  # the training runner's frames are not the user's either
    assert lines[-1].startswith("AttributeError:")
    assert list(mm.Store(ip.magics_manager.registry["ModelMagics"].store).sets()["version"]) == [1]


def test_nondeterministic_provenance_cell_is_refused(ip: Any) -> None:
    """A cell whose training cannot be reproduced is refused at save (the trained weights stay in
    the notebook variable), instead of saving a version that could never be recovered."""
    ip.run_cell("import os\nfrom mm_jupyter.usecases.training import initial_models\n"
                "from mm_jupyter.usecases.battery import cell_ref\nds = {'1': cell_ref(1, version=1)}")
    ip.run_cell_magic("modelset", "save base", "initial_models(3, hidden=8)")
    with pytest.raises(mm.StoreError, match=r"does not reproduce model '1'.*nothing was stored"):
        ip.run_cell_magic("modelset", "save base --approach provenance --datasets ds --models trained",
                          "with torch.no_grad():\n"  # (8 random bytes: one byte repeats in a replay once in 256)
                          "    next(model.parameters()).add_(int.from_bytes(os.urandom(8), 'big') / 2**64 + 1e-3)\n")
    assert "1" in ip.user_ns["trained"]  # the models the cell trained are not lost
    assert list(mm.Store(ip.magics_manager.registry["ModelMagics"].store).sets()["version"]) == [1]
