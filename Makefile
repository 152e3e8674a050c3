# speechrl: `make demo` runs the whole pipeline, `make test` runs the tests.
# Each target bootstraps what it needs on a fresh machine: system packages (espeak-ng, sox),
# a virtual environment in .venv, the CPU build of PyTorch where one is at hand, and the project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
OUT    ?= runs/demo

.PHONY: test demo demo-quick lint system venv clean

test: $(STAMP) system
	$(PY) -m pytest -q

demo: $(STAMP) system
	$(VENV)/bin/speechrl demo --out $(OUT)

demo-quick: $(STAMP) system
	$(VENV)/bin/speechrl demo --quick --out runs/demo-quick

lint: $(STAMP)
	$(VENV)/bin/ruff check speechrl tests benchmarks

# espeak-ng voices the synthetic corpus; sox is handy for inspecting audio.
system:
	@command -v espeak-ng >/dev/null 2>&1 && command -v sox >/dev/null 2>&1 || { \
	  echo "installing espeak-ng and sox with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng sox libsndfile1 >/dev/null; }

venv: $(STAMP)

# The CPU build of torch is installed first, pinned, when pip can find it (a local wheel or the
# registry); an unpinned torch would otherwise pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[lhotse,dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
