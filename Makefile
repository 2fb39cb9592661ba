# `make demo`: toy data -> tiny VAE -> tiny DiT on the CPU -> sampled videos in outputs/.
# `make test`: the test suite. Both create .venv and install what they need on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	@# Without CUDA, take the CPU wheel of torch before anything asks for a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install torch==2.13.0; fi
	$(PIP) install setuptools wheel packaging numpy ninja
	$(PIP) install --no-build-isolation -r requirements.txt -r requirements-dev.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf data/toy data/toy_cache checkpoints/demo outputs
