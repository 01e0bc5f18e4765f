# The two set-up commands of the README. Each creates .venv when absent and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A plain `torch` requirement pulls a multi-GB CUDA build; pin the CPU wheel by default.
TORCH_SPEC ?= torch==2.13.0
# Peer packages compared side by side in tests and benchmarks; their own deps (lightning,
# torchvision) are not needed: timm's AGC is read from its own file, as no torchvision wheel
# here matches the CPU torch.
PEERS := zclip==1.0.0 autoclip==0.2.1 timm==1.0.31

.PHONY: demo test lint typecheck pytest bench lab-reference clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.demo-installed: $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[cli,lab,report]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.demo-installed
	$(PY) -m pip install -q -e ".[cli,lab,report,dev]"
	$(PY) -m pip install -q --no-deps $(PEERS)
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/gradguard lab --quick

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

pytest: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/overhead.py

# The lab's record of every claim at both scales (src/gradguard/lab/reference.json): rebuild
# it after changing an experiment, on a quiet machine.
lab-reference: $(VENV)/.demo-installed
	rm -rf runs/reference-full runs/reference-quick
	$(VENV)/bin/gradguard lab --out runs/reference-full
	$(VENV)/bin/gradguard lab --quick --out runs/reference-quick
	$(PY) -c "import sys; from gradguard.lab._reference import main; \
		sys.exit(main(['runs/reference-full', 'runs/reference-quick']))"

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
