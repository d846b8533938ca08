# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-finetune install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-$$(nproc)} $(BIN)/bnncc demo

test: $(STAMP)
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-$$(nproc)} $(BIN)/pytest -q

test-slow: $(STAMP)
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-$$(nproc)} $(BIN)/pytest -q -m slow

# Speed is measured here, never asserted in tests; figures go to bench/RESULTS.md.
bench: $(STAMP)
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-$$(nproc)} $(BIN)/python bench/kernels.py --results bench/RESULTS.md
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-$$(nproc)} $(BIN)/python bench/network.py

bench-finetune: $(STAMP)
	$(BIN)/python bench/finetune.py

clean:
	rm -rf $(VENV) build *.egg-info out
