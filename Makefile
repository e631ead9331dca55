# CFR Factory: `make demo` runs the main job on the embedded synthetic data,
# `make test` runs lint and the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export DAGSTER_HOME   ?= $(CURDIR)/dagster_home

.PHONY: install demo test test-postgres lint format ui clean

# torch and torchvision go in first and pinned, so that no other torch is ever
# resolved (2.14.1 + 0.29.1 is the pair whose torchvision ops load).
# TORCH_INDEX: on a CPU-only machine with internet access, `make install
# TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the CPU build of the same
# versions (~1 GB) instead of the default CUDA build (~6 GB, which also runs on the CPU).
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH_FROM) torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cfr demo --home "$(DAGSTER_HOME)"

test: lint
	$(BIN)/pytest -q

# The pipeline on a real PostgreSQL (Dagster storage + bank registry): a throwaway server
# from the Debian package `postgresql` (installed when missing), run as an unprivileged user.
PG_STAMP := $(VENV)/.postgres-stamp
$(PG_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,postgres]"
	touch $(PG_STAMP)

test-postgres: $(PG_STAMP)
	$(BIN)/python scripts/with_postgres.py -- $(BIN)/pytest -q -m postgres

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(STAMP)
	$(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
