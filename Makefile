# Everything a fresh machine needs: `make demo` and `make test` build their own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo evaluate-fundus train-fundus clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # pinned first: the local CPU wheel
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m simulations.evaluate

train-fundus: $(STAMP)
	$(BIN)/python -m grata.train_source data=fundus

evaluate-fundus: $(STAMP)
	$(BIN)/python -m simulations.evaluate data=fundus

clean:
	rm -rf $(VENV) runs outputs checkpoints
