# The README's two commands: `make run` (the embedded default, end to end) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup envs run test bench clean-results

$(BIN)/m3lab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel. Everything after is constrained to it, so no CUDA build is pulled.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[cpu,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(BIN)/m3lab

# The quantizers' own pinned environments (m3lab/envs/<name>.txt → .envs/<name>/, see m3lab/envs/__init__.py):
# rebuilt when their requirements change.
envs: $(BIN)/m3lab $(wildcard m3lab/envs/*.txt)
	$(BIN)/python -m m3lab.envs build

setup: $(BIN)/m3lab envs

run: setup
	$(BIN)/m3lab run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_dag.py
