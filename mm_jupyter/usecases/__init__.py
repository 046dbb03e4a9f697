"""Use-case data and models shared by benchmarks, tests and notebooks (built from code, no downloads)."""
