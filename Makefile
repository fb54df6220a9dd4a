# adfed — the two commands: `make demo` and `make test` (each sets up .venv itself).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo

.PHONY: setup demo test bench experiments lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/adfed data generate --users 20000 --ads 10000 --seed 0 --out $(DEMO_DATA) --overwrite
	$(BIN)/adfed data describe $(DEMO_DATA)
	$(BIN)/adfed train --mode centralized --data $(DEMO_DATA) --out $(DEMO_RUN)/centralized --seed 0 --overwrite
	$(BIN)/adfed train --mode federated --data $(DEMO_DATA) --out $(DEMO_RUN)/federated --seed 0 --rounds 200 --set fl.eval_every=25 --overwrite --reference $(DEMO_RUN)/centralized
	$(BIN)/adfed compare $(DEMO_RUN)/centralized $(DEMO_RUN)/federated

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_fl.py --data $(DEMO_DATA)
	$(BIN)/python benchmarks/bench_checkpoint.py

experiments: $(STAMP)
	test -f $(DEMO_DATA)/manifest.json || $(BIN)/adfed data generate --users 20000 --ads 10000 --seed 0 --out $(DEMO_DATA)
	$(BIN)/adfed experiment run all --data $(DEMO_DATA) --out runs/experiments

# ruff + mypy; not part of `make test` (CI runs both: .ci/run).
lint: $(STAMP)
	$(BIN)/ruff check adfed data_gen serving experiments tests benchmarks
	$(BIN)/mypy adfed data_gen serving experiments benchmarks

clean:
	rm -rf $(VENV) runs data/demo
