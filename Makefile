# The README's two commands: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: torch 2.13.0 (CPU build) is installed first so that no CUDA build is pulled.
# GPU machines: `make TORCH_SPEC="torch" demo` (or pre-install your CUDA torch in .venv) - see README.
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/demo
# The tested dependency set (exact versions; `make lock` regenerates it). CONSTRAINTS= installs without it.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
LOCK_VENV := /tmp/invdiff-lock-venv-$(shell id -u)
UPGRADE_VENV := .venv-upgrade

.PHONY: demo test test-fast venv peers-venv clean lock upgrade-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q $(PIP_C) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_C) -e ".[data,dev]"
	touch $@

venv: $(VENV)/.installed

# The peers of `invdiff bench --peers` in their own venv (they pin older transformers / huggingface-hub):
# `invdiff bench ... --peers optimum-ort,openvino --peers-python .venv-peers/bin/python`
.venv-peers/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > .venv-peers/torch-constraint.txt
	.venv-peers/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-peers/bin/python -m pip install -q -c .venv-peers/torch-constraint.txt -e ".[peers]"
	touch $@

peers-venv: .venv-peers/.installed

demo: $(VENV)/.installed
	$(BIN)/invdiff demo --out $(OUT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -ra -m "not slow"

# Regenerate constraints.txt: resolve pyproject afresh in a throwaway venv (unattended; run it after adding a
# dependency, then `make test`).
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[data,dev]"
	$(LOCK_VENV)/bin/python tools/deps.py lock constraints.txt
	rm -rf $(LOCK_VENV)

# Not in CI: the newest release of every dependency (pyproject's upper bounds lifted) in a separate venv, fast tests.
# torch is installed as TORCH_SPEC (pass TORCH_SPEC=torch for the newest; on Linux PyPI that is a CUDA build).
upgrade-check:
	rm -rf $(UPGRADE_VENV) && $(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade "$(TORCH_SPEC)"
	$(PYTHON) tools/deps.py unbounded > $(UPGRADE_VENV)/requirements.txt
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r $(UPGRADE_VENV)/requirements.txt
	$(UPGRADE_VENV)/bin/python -m pip install -q --no-deps -e .
	$(UPGRADE_VENV)/bin/python -m pip list --format=freeze | grep -v "^invdiff-rt" > $(UPGRADE_VENV)/versions.txt
	INVDIFF_UPGRADE_CHECK=1 $(UPGRADE_VENV)/bin/python -m pytest -q -ra -m "not slow" -p no:cacheprovider
	@echo "passed with the versions in $(UPGRADE_VENV)/versions.txt: raise pyproject's bounds, then make lock"

clean:
	rm -rf $(VENV) runs
