# Two entry points (see README): `make study` and `make test`. Each bootstraps .venv first.
PY := .venv/bin/python
PROFILE ?= small
export MPLBACKEND := Agg
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: study test lint

study: .venv/installed
	$(PY) -m uncurl.study --profile $(PROFILE)

test: .venv/installed
	$(PY) -m pytest

lint: .venv/installed
	$(PY) -m ruff check uncurl tests notebooks
	$(PY) -m ruff format --check uncurl tests notebooks
	.venv/bin/lint-imports

# torch==2.13.0 is a CPU build; DS_BUILD_OPS=0 keeps DeepSpeed pure Python (README, Environment).
.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@
