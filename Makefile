# Everything a fresh machine needs: `make demo` and `make test` build their own virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-quick evaluate evaluate-fundus train-fundus federate-fundus flwr-run deploy-local clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # pinned first: the local CPU wheel
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e ".[test]"   # setuptools' editable-install notice is not for users
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The main job: the source row, then every federation variant (local_only, fed_stats, fed_affine, fed_kin) across four synthetic sites (Flower
# simulations, MLflow in ./mlflow.db); the first run trains the small source model (conf/data/demo.yaml: 96 px, 1 thread)
demo: $(STAMP)
	$(BIN)/python -m simulations.compare

# Speed: step throughput (faithful fp32 vs fast), Dice check on the real data, training, federation overhead
# (about 40 min on a 2-core CPU; tables in bench/results/tables.md). bench-quick: about 1.5 min.
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick --out bench/results/quick $(ARGS)

# The paper's protocol, one process, every method (no federation)
evaluate: $(STAMP)
	$(BIN)/python -m simulations.evaluate

train-fundus: $(STAMP)
	$(BIN)/python -m grata.train_source data=fundus

evaluate-fundus: $(STAMP)
	$(BIN)/python -m simulations.evaluate data=fundus

federate-fundus: $(STAMP)
	$(BIN)/python -m simulations.compare data=fundus

# The same federation through Flower's own launcher (`flwr run .`, its own SuperLink, one SuperNode per site), live log, true status
flwr-run: $(STAMP)
	$(BIN)/python -m simulations.flwr_local $(ARGS)

# A real deployment on loopback: SuperLink with TLS + SuperNode authentication, one SuperNode per site
deploy-local: $(STAMP)
	$(BIN)/python -m simulations.deploy_local $(ARGS)

clean:
	rm -rf $(VENV) runs outputs checkpoints mlartifacts mlflow.db .flwr
