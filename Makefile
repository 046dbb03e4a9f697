# The two commands of the README: `make run` and `make test`. Both install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
JUPYTER_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL := --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg
# small notebooks with deterministic outputs: compared strictly; notebooks holding timings: run, lax.
# The tour (00) is run once, by tests/test_browser.py in JupyterLab, which compares its saved outputs with the
# committed ones by nbval's strict rules (tests/notebook_outputs.py).
STRICT_NOTEBOOKS := notebooks/01_exercise_model_registry.ipynb
LAX_NOTEBOOKS := notebooks/02_exercise_transfer_learning.ipynb notebooks/03_paper_multi_model_management.ipynb \
	notebooks/04_paper_alsatian.ipynb notebooks/05_exercise_model_serving.ipynb \
	notebooks/06_paper_alsatian_evaluation.ipynb notebooks/07_model_lake.ipynb

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	sh scripts/install.sh $(VENV)
	touch $@

# The main job: JupyterLab with the mm_jupyter extension, opened on the tour notebook.
run: install
	$(VENV)/bin/jupyter lab $(JUPYTER_ARGS) --LabApp.default_url=/lab/tree/notebooks/00_tour.ipynb

# Lint and types first (ruff: httpx's rule set on $(LINT); mypy: [tool.mypy] in pyproject.toml),
# then everything else in one run: the unit tests, the strict notebooks and the notebooks whose outputs hold timings
# and training results (--lax-notebook: compared only where a cell asks, as --nbval-lax does). Those run on torch's
# plain (non-SIMD) CPU kernels: references are written on the machine's own path (scripts/refresh_notebooks.py), so
# every run proves that the notebooks' checks hold on another kernel path (float results are compared with a
# stated tolerance, never character by character).
# The paper benchmarks run once: the tests write their results to a folder both share (MM_JUPYTER_BENCH_RESULTS),
# and notebooks 03 and 06 read the runs of the same code and arguments from it (bench/results.py) instead of
# running them again; their correctness checks were proven by the tests.
# Scheduling (tests/conftest.py): three workers on two cores (many tests wait on fsync, subprocesses, kernels or
# the browser); every test is a unit of its own, so a heavy file is split over workers, except the xdist groups (a
# notebook's cells, a module's expensive fixture, the session's Ray cluster, a benchmark module and the notebook
# that reads its results), which are queued first.
# ruff checks every Python file but the notebooks' cells
LINT := mm_jupyter tests scripts conftest.py
DIST := -n 3 --dist loadgroup --no-loadscope-reorder
test: install
	$(VENV)/bin/ruff check $(LINT)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	export MM_JUPYTER_BENCH_RESULTS=$$(mktemp -d); \
	$(PY) -m pytest $(DIST) --nbval $(NBVAL) tests $(STRICT_NOTEBOOKS) $(LAX_NOTEBOOKS) \
		$(foreach nb,$(LAX_NOTEBOOKS),--lax-notebook $(nb)) $(PYTEST_ARGS); \
	rc=$$?; rm -rf "$$MM_JUPYTER_BENCH_RESULTS"; exit $$rc

# The inner loop: lint, types and the unit tests that need no service, notebook, browser or benchmark run
# (markers in pyproject.toml); `make test` runs everything.
FAST := not (services or notebook or browser or bench or slow)
test-fast: install
	$(VENV)/bin/ruff check $(LINT)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 -q -m "$(FAST)" tests $(PYTEST_ARGS)

bench: install
	$(PY) -m mm_jupyter.bench modelsets --quick

clean:
	rm -rf $(VENV) .pytest_cache bench_results
