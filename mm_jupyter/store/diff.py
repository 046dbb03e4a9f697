"""Which models and tensors differ between two stored versions, from per-tensor digests.

Update and provenance versions carry digests already, so a diff of two such versions reads no
parameters; baseline and mmlib-base versions are hashed once on the fly.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .tensors import Layout

if TYPE_CHECKING:
    import pandas as pd

    from .basetypes import SetRow


@dataclass(frozen=True)
class SetDiff:
    """Models added, dropped and changed (with the names of their changed tensors) from ``a`` to ``b``."""

    a: str
    b: str
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    changed: dict[str, tuple[str, ...]]
    unchanged: int

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per model that differs: ``model``, ``change`` (added/dropped/changed), ``tensors``."""
        import pandas as pd

        rows = [{"model": m, "change": "added", "tensors": ""} for m in self.added]
        rows += [{"model": m, "change": "dropped", "tensors": ""} for m in self.dropped]
        rows += [{"model": m, "change": "changed", "tensors": ", ".join(t)} for m, t in self.changed.items()]
        return pd.DataFrame(rows, columns=["model", "change", "tensors"])

    def __repr__(self) -> str:
        lines = [f"{self.a} -> {self.b}: {len(self.changed)} changed, {len(self.added)} added, "
                 f"{len(self.dropped)} dropped, {self.unchanged} unchanged"]
        for label, names in (("added", self.added), ("dropped", self.dropped)):
            if names:
                lines.append(f"  {label}: {_some(names)}")
        for model, tensors in list(self.changed.items())[:20]:
            lines.append(f"  changed {model}: {_some(tensors, 6)}")
        if len(self.changed) > 20:
            lines.append(f"  ... and {len(self.changed) - 20} more changed models")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre>{_escape(repr(self).splitlines()[0])}</pre>" + self.frame.to_html(index=False)


def _some(names: tuple[str, ...], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def _escape(text: str) -> str:

    return html.escape(text)


def diff_sets(digests: "Callable[[SetRow], tuple[list[str], np.ndarray]]", row_a: "SetRow", row_b: "SetRow"
              ) -> SetDiff:
    """Compare two versions (of any names) model by model, matching models by name and tensors by key;
    ``digests`` gives a version's (names, per-tensor digests) (``Store.version_digests``)."""
    names_a, dig_a = digests(row_a)
    names_b, dig_b = digests(row_b)
    keys_a = Layout.from_json(row_a.manifest["layout"]).specs
    keys_b = Layout.from_json(row_b.manifest["layout"]).specs
    col_a = {s.name: (k, s.dtype, s.shape) for k, s in enumerate(keys_a)}
    col_b = {s.name: (k, s.dtype, s.shape) for k, s in enumerate(keys_b)}
    common = [(key, col_a[key][0], col_b[key][0]) for key in col_a
              if key in col_b and col_a[key][1:] == col_b[key][1:]]
    # keys only on one side, or with another dtype/shape, count as changed for every common model
    reshaped = tuple(key for key in list(col_a) + [k for k in col_b if k not in col_a]
                     if key not in {c[0] for c in common})
    pos_a = {n: i for i, n in enumerate(names_a)}
    both = [(n, pos_a[n], j) for j, n in enumerate(names_b) if n in pos_a]
    changed: dict[str, tuple[str, ...]] = {}
    if both:
        ia = np.array([i for _, i, _ in both])
        ib = np.array([j for _, _, j in both])
        ka = np.array([c[1] for c in common], dtype=np.int64)
        kb = np.array([c[2] for c in common], dtype=np.int64)
        if len(common):
            differs = (dig_a[ia][:, ka] != dig_b[ib][:, kb]).any(axis=2)
        else:
            differs = np.zeros((len(both), 0), dtype=bool)
        for row, (name, _, _) in enumerate(both):
            tensors = tuple(common[c][0] for c in np.flatnonzero(differs[row])) + reshaped
            if tensors:
                changed[name] = tensors
    in_b = set(names_b)
    return SetDiff(
        f"{row_a.name}@{row_a.version}", f"{row_b.name}@{row_b.version}",
        tuple(n for n in names_b if n not in pos_a), tuple(n for n in names_a if n not in in_b),
        changed, len(both) - len(changed),
    )
