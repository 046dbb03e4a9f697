"""The model store: catalog, content-addressed objects, architectures, the four multi-model
management approaches, lazy ModelSets and lineage."""
from __future__ import annotations

from .architectures import Architecture, architecture
from .lineage import Lineage
from .modelset import ModelSet, SetRef
from .provenance import DatasetRef, Provenance
from .store import Store
from .trust import allow_functions, allow_modules, trusted

__all__ = ["Architecture", "DatasetRef", "Lineage", "ModelSet", "Provenance", "SetRef", "Store", "allow_functions",
           "allow_modules", "architecture", "trusted"]
