# The README's two commands: `make demo` and `make test`. Both create .venv and install on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: torch 2.13.0 (CPU build) is installed first so that no CUDA build is pulled.
# GPU machines: `make TORCH_SPEC="torch" demo` (or pre-install your CUDA torch in .venv) - see README.
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: demo test test-fast venv peers-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[data,dev]"
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

clean:
	rm -rf $(VENV) runs
