# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extras to install: test,demo by default; CI adds interop (torch + PEFT), bench (+ qwix) and tunix.
# With interop or bench, torch==2.13.0 is installed first on its own (the CPU wheel where one is on the
# find-links/index), so resolving peft & co. never swaps in another torch build.
EXTRAS ?= test,demo

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(findstring interop,$(EXTRAS))$(findstring bench,$(EXTRAS)),$(PY) -m pip install -q -c constraints.txt torch==2.13.0)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

.PHONY: demo test lint bench
demo: $(VENV)/.installed
	$(PY) examples/digits_mlp.py

test: $(VENV)/.installed
	$(PY) -m pytest tests -n 2 --dist loadfile  # 2 processes, each test file on one (its fixtures built once)

# ruff + pyright (basic) over lora_jax/; needs the lint extra (CI installs it).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lora_jax
	$(VENV)/bin/pyright

# bench extra (qwix, torch + PEFT, matplotlib) on top of whatever EXTRAS installed; torch first, as above.
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS),bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/core.py
	$(PY) benchmarks/compare.py
