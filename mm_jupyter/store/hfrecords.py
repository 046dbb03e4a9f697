"""Hugging Face configs from a record: literal and offline.

A config dict can point a model's constructor at the Hugging Face hub: ``auto_map`` and
``trust_remote_code`` name remote code, ``backbone`` (without ``use_timm_backbone``) makes the
constructor fetch another model's config, ``use_pretrained_backbone`` downloads weights, and an
attention implementation such as ``"kernels-community/flash-attn"`` downloads a kernel. A record
is data: none of these is honoured. Records that name remote code or hub repositories are
refused (at save too, so nothing is stored that could not be recovered); downloaded weights are
never needed (the store holds them), so ``use_pretrained_backbone`` is switched off while building
and restored on the built config afterwards. Builds also run with the hub switched to offline mode
(:func:`hub_offline`), so a constructor that still reaches for the network fails instead.
"""
from __future__ import annotations

import copy
import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from .trust import HFConfigClass

#: Config keys that hold an attention/kernel implementation by name (a ``/`` makes it a hub repo).
_IMPLEMENTATION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                        "_experts_implementation", "experts_implementation")
_LOCK = threading.Lock()
_DEPTH = [0]
_saved: dict[str, Any] = {}


def _nested(value: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every dict inside ``value`` (sub-configs: ``text_config``, ``backbone_config``, ...), iteratively."""
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, dict):
            yield where, v
            todo.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


def check_literal(config: Mapping[str, Any], what: str) -> None:
    """ArchitectureError when a config (or a sub-config) names remote code or a hub repository."""
    for where, d in _nested(dict(config)):
        at = f"{what}{' ' + where if where else ''}"
        for k, v in d.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise ArchitectureError(f"{at}: config key {k!r} refused")
            if k == "auto_map" and v:
                raise ArchitectureError(f"{at}: 'auto_map' names remote code on the Hugging Face hub; a record "
                                        "cannot load it (save the model's structure instead)")
            if k == "trust_remote_code" and v:
                raise ArchitectureError(f"{at}: 'trust_remote_code' is set; a record never runs remote code")
            if k == "backbone" and v is not None and not d.get("use_timm_backbone"):
                raise ArchitectureError(f"{at}: 'backbone' {v!r} names a model on the Hugging Face hub whose config "
                                        "the constructor would download; use backbone_config instead")
            if k in _IMPLEMENTATION_KEYS and v is not None and (not isinstance(v, str) or "/" in v):
                raise ArchitectureError(f"{at}: {k} {v!r} names a kernel on the Hugging Face hub; refused")


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub requests fail while a record is built (``HF_HUB_OFFLINE``, scoped: the
    previous setting comes back afterwards; nested and concurrent builds share one switch)."""
    with _LOCK:
        _DEPTH[0] += 1
        if _DEPTH[0] == 1:
            _saved.clear()
            _saved["env"] = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants: Any = sys.modules.get("huggingface_hub.constants")
            if constants is not None:
                _saved["constant"] = getattr(constants, "HF_HUB_OFFLINE", False)
                constants.HF_HUB_OFFLINE = True  # what huggingface_hub reads on every request
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                if _saved["env"] is None:
                    os.environ.pop("HF_HUB_OFFLINE", None)
                else:
                    os.environ["HF_HUB_OFFLINE"] = _saved["env"]
                constants = sys.modules.get("huggingface_hub.constants")
                if constants is not None and "constant" in _saved:
                    constants.HF_HUB_OFFLINE = _saved["constant"]



def build_config(klass: "HFConfigClass", data: Any, private: Any, what: str) -> Any:
    """A config of ``klass`` from recorded ``data`` (its ``to_dict()``) and ``private`` settings
    (plain values of ``_``-attributes ``to_dict`` leaves out, such as the attention kernel)."""
    if not isinstance(data, dict) or not isinstance(private, dict):
        raise ArchitectureError(f"{what}: a config record is a JSON object")
    check_literal(data, what)
    check_literal(private, what)
    for k, v in private.items():
        plain = v is None or isinstance(v, (bool, int, float, str))
        if not (isinstance(k, str) and k.startswith("_") and not k.startswith("__") and plain):
            raise ArchitectureError(f"{what}: bad private config setting {k!r}")
        if callable(getattr(klass, k, None)):
            raise ArchitectureError(f"{what}: private config setting {k!r} would replace a method; refused")
    with hub_offline():  # a copy: a constructor that edits its config must not edit the record
        config = klass.from_dict(copy.deepcopy(data))
    for k, v in private.items():
        setattr(config, k, v)
    return config


def construct(make: Callable[[Any], Any], config: Any) -> Any:
    """``make(config)`` offline, with pretrained backbone weights switched off (the store holds
    the weights); the config keeps its recorded value afterwards."""
    pretrained = getattr(config, "use_pretrained_backbone", None)
    if pretrained:
        config.use_pretrained_backbone = False
    try:
        with hub_offline():
            return make(config)
    finally:
        if pretrained:
            config.use_pretrained_backbone = pretrained
