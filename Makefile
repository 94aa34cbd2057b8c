# Hatchery: the two commands a new user needs are `make demo` and `make test` (as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-unit fuzz test-integration test-image lint bench images clean lock guest-kernel arm64-guest qemu-next

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## install system packages (apt) and the venv; idempotent
	@tools/setup-host.sh

guest-kernel: setup ## fetch Debian's stock kernel for test guests into .cache/
	@tools/fetch-guest-kernel.sh

arm64-guest: setup ## fetch Debian's arm64 kernel, busybox and EFI stub for arm64 test guests into .cache/
	@tools/fetch-arm64-guest.sh

qemu-next: setup ## unpack the next QEMU (bookworm-backports) into .cache/ for cross-version tests
	@tools/fetch-qemu-next.sh

demo: setup guest-kernel ## the main job: set up, build, run the story (see README)
	@$(PY) -m hatchery_lab.demo

test: setup guest-kernel arm64-guest qemu-next ## every tier in order (lint+unit, integration, image); stops at the first failure
	@PYTEST_ARGS='$(PYTEST_ARGS)' tools/test-tiers.sh

test-unit: setup ## the fast tier only
	$(PY) -m pytest -m "not integration and not image" $(PYTEST_ARGS)

fuzz: setup ## the fuzz tests only, 50 000 examples each (CI runs 2 000)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-50000} $(PY) -m pytest -m "not integration and not image" -k fuzz $(PYTEST_ARGS)

test-integration: setup guest-kernel arm64-guest qemu-next ## netns, real clients and servers, QEMU guests
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

test-image: setup guest-kernel ## mkosi builds and boots of our images
	$(PY) -m pytest -m image $(PYTEST_ARGS)

lint: setup ## ruff, mypy --strict, shellcheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	shellcheck $$(git ls-files '*.sh' .ci/run)

bench: setup guest-kernel qemu-next ## run benchmarks, write docs/benchmarks.md
	$(PY) -m bench

images: setup ## build the images with mkosi (LOCKED=1: fail on package drift; REFRESH=1; UPDATE_LOCK=1)
	@tools/build-images.sh

lock: ## re-pin requirements.lock from pyproject.toml (needs network to PyPI)
	rm -rf .cache/lock-venv && /usr/bin/python3 -m venv .cache/lock-venv
	.cache/lock-venv/bin/pip install -q -e '.[dev]'
	{ echo '# Pinned Python packages for the venv (make setup). Regenerate: make lock'; \
	  .cache/lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock

clean: ## remove build outputs (keeps the package and image caches in .cache/)
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
