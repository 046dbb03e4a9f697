"""The papers' experiments as runnable harnesses: ``python -m mm_jupyter.bench <experiment>``.

- ``modelsets``: the Efficient Multi-Model Management experiment (U1 + U3 update steps; storage,
  time-to-save and time-to-recover of mmlib-base, baseline, update and provenance, against a
  plain safetensors write/read of the same bytes).
- ``catalog``: listing and recovering sets in a store whose catalog holds 100,000 models.

The harness modules return data (rows, targets); only ``__main__`` prints.
"""
