# The two commands of the README: `make run` and `make test`. Both install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	sh scripts/install.sh $(VENV)
	touch $@

# The main job: until the Jupyter surface lands, the multi-model management benchmark.
run: install
	$(PY) -m mm_jupyter.bench modelsets

test: install
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) -m mm_jupyter.bench modelsets --quick

clean:
	rm -rf $(VENV) .pytest_cache bench_results
