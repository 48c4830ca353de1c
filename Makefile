# Two commands: `make demo` and `make test`. Each creates .venv if it is missing.
# torch is installed FIRST and pinned: torch==2.13.0 is a CPU build on local disk here; any
# other request pulls a multi-GB CUDA build (see ../shared/FACTS.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# pytest-xdist workers of `make test` (tests are grouped in tests/conftest.py)
TEST_WORKERS ?= 2
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONHASHSEED := 0

.PHONY: demo test test-fast lint venv clean bench docs docs-serve

$(BIN)/fl-sim: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,docs]"
	@touch $@

venv: $(BIN)/fl-sim

demo: $(BIN)/fl-sim
	$(BIN)/fl-sim run configs/default.toml

test: $(BIN)/fl-sim
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 \
		-n $(TEST_WORKERS)

test-fast: $(BIN)/fl-sim
	$(BIN)/python -m pytest -q -m "not slow and not ray and not deployment" --timeout=300

lint: $(BIN)/fl-sim
	$(BIN)/ruff check fl_sim attacks defenses strategies tests benchmarks

# the documentation site (mkdocs.yml): --strict fails on a broken link or a missing page; the
# plug-in reference pages are generated from the registries during the build (docs/hooks.py)
docs: $(BIN)/fl-sim
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/fl-sim
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(BIN)/fl-sim
	$(BIN)/python benchmarks/attack_speed.py
	$(BIN)/python benchmarks/federation.py

clean:
	rm -rf runs .pytest_cache site
