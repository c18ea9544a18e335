# Two commands do all the set-up on a fresh machine:
#   make demo   venv + keys + signed runner + 3 local sshd hosts + a real multi-server run with helpers
#   make test   the whole test suite (real sshd hosts, SQLite and PostgreSQL)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SSHD ?= /usr/sbin/sshd

.PHONY: demo demo-stop test lint bench venv sshd clean

$(BIN)/cronium-fab: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(BIN)/cronium-fab

# sshd is needed for the local test hosts; install it when we can (root + apt), else say how.
sshd:
	@if [ ! -x $(SSHD) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing openssh-server (needed for the local test hosts)..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; \
	  else \
	    echo "OpenSSH's sshd is not installed: run 'sudo apt-get install -y openssh-server' (Debian/Ubuntu)" \
	         "or 'sudo dnf install -y openssh-server' (Fedora/RHEL), then run make again." >&2; exit 1; \
	  fi; \
	fi

keys/cosign.key: | venv
	$(BIN)/inv keygen

dist/cronium-runner.pyz.sig: keys/cosign.key $(shell find runner -type f -not -path '*/__pycache__/*' 2>/dev/null) | venv
	$(BIN)/inv build sign

demo: venv sshd dist/cronium-runner.pyz.sig
	$(BIN)/python -m cronium_fab.testing.demo

demo-stop: venv
	$(BIN)/python -m cronium_fab.testing.demo --stop

# One process by default. TEST_WORKERS=2 runs two pytest-xdist workers (each with its own hosts,
# PostgreSQL schemas and ports; the tests that start a `cronium-fab worker` share an xdist_group): about
# 10 min instead of 17, but not yet reliable: a worker test has seen the site-packages directory change
# under a running worker ("runs other code") with no test of its own changing it.
TEST_WORKERS ?= 0
test: venv sshd
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/vermin --no-tips -t=3.8- --violations runner/

bench: venv sshd dist/cronium-runner.pyz.sig
	$(BIN)/python bench/bench_runner.py
	$(BIN)/python bench/bench_run_event.py

clean:
	rm -rf dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
