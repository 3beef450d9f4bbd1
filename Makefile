# The README's two commands:  `make demo`  and  `make test`.
# Each creates .venv when missing (or when pyproject.toml changed), then runs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
DEMO_CONFIG := config/demo.yaml

.PHONY: demo test test-integration bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision first and pinned, so nothing else can pull another build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --configfile $(DEMO_CONFIG)
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --configfile $(DEMO_CONFIG) \
		--report results/demo/report.html
	@echo "demo finished: results/demo/ (open results/demo/report.html)"

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/snakemake --lint
	$(BIN)/snakemake --lint --configfile $(DEMO_CONFIG)
	$(BIN)/pytest

# Real services on this machine (root; installs slurm-wlm, munge, MariaDB and a Label Studio venv):
# the demo through profiles/slurm on a one-node cluster, and a Label Studio review round trip.
test-integration: $(STAMP)
	BIN=$(BIN) bash ci/integration.sh

bench: $(STAMP)
	$(BIN)/python -m vlmrel.bench mcdo --json
	$(BIN)/python -m vlmrel.bench anomaly --json
	$(BIN)/python -m vlmrel.bench thresholds --json
	$(BIN)/python -m vlmrel.bench vlm --json
	$(BIN)/python -m vlmrel.bench scale --json

clean-demo:
	rm -rf results/demo .snakemake
