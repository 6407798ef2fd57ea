# Stead: every target builds what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := iproute2 nftables rsync e2fsprogs util-linux procps psmisc kmod curl bind9 openssh-server openssh-client libvirt-clients libvirt-dev pkg-config gcc python3-dev

.PHONY: all env sysdeps demo test test-fast lint bench clean lab-down

all: env

sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

env: sysdeps $(STAMP)

demo: env
	$(BIN)/python -m stead.lab.demo

test: env
	$(BIN)/stead lab down --all >/dev/null 2>&1 || true
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: env
	$(BIN)/pytest -q -m "not cluster" -p no:cacheprovider

lint: env
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: env
	$(BIN)/python -m bench

lab-down: env
	$(BIN)/stead lab down --all

clean:
	rm -rf $(VENV) build dist src/*.egg-info
