# The two commands of README.md:
#   make serve   install, build tiny checkpoints if missing, serve on http://127.0.0.1:8000 (CPU)
#   make test    install, lint, run the whole test suite (what .ci/run calls)
# Also: make lint, make unit (the tests that start no Ray cluster and load no model), make cluster-configs, make lock,
# make image.
# Everything a fresh machine needs is installed here, into .venv.

PYTHON ?= python3
VENV   ?= .venv
# An unpinned torch pulls several GB of CUDA wheels; this pin takes the CPU build on CPU machines.
# GPU nodes: make TORCH_SPEC="torch==2.9.*" install (PyPI's Linux x86_64 wheels are the CUDA 12.8 build)
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip --disable-pip-version-check -q

export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

# A real Prometheus for the metrics tests: Debian's package, unpacked into .tools/ (no daemon, no
# post-install scripts). Its binaries need only libc.
PROMETHEUS := .tools/prometheus/usr/bin/prometheus
export IMAGESERVE_PROMETHEUS := $(CURDIR)/$(PROMETHEUS)

# A real Redis for the GCS storage tests (TLS and a password, as cluster/deploy/redis.yaml runs it): Debian's
# redis-server and the two libraries it needs beside libc and libssl, unpacked the same way.
REDIS := .tools/redis/usr/bin/redis-server
export IMAGESERVE_REDIS := $(CURDIR)/$(REDIS)

# Debian's haproxy, unpacked the same way, for the tests of the generated edge proxy (cluster/deploy/edge.yaml):
# header and idle timeouts in front of Serve's proxy.
HAPROXY := .tools/haproxy/usr/sbin/haproxy
export IMAGESERVE_HAPROXY := $(CURDIR)/$(HAPROXY)

.PHONY: install serve test lint unit cluster-configs lock image

install: $(VENV)/.installed

$(PROMETHEUS):
	mkdir -p .tools/deb
	cd .tools/deb && (apt-get download prometheus 2>/dev/null || (apt-get update -qq && apt-get download prometheus))
	dpkg -x .tools/deb/prometheus_*.deb .tools/prometheus
	test -x $@

$(REDIS):
	mkdir -p .tools/deb
	cd .tools/deb && (apt-get download redis-server redis-tools liblzf1 libjemalloc2 2>/dev/null || \
		(apt-get update -qq && apt-get download redis-server redis-tools liblzf1 libjemalloc2))
	for deb in .tools/deb/redis-*.deb .tools/deb/liblzf1_*.deb .tools/deb/libjemalloc2_*.deb; do \
		dpkg -x $$deb .tools/redis; done
	LD_LIBRARY_PATH=.tools/redis/usr/lib/x86_64-linux-gnu $@ --version

# Every package the node image installs is installed, at lock/image.txt's version (torch and what is built
# against its CUDA build aside: lock/constraints.py says which), so the tests run the libraries that ship;
# the test tools come on top, under the same constraints.
$(HAPROXY):
	mkdir -p .tools/deb
	cd .tools/deb && (apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 2>/dev/null || \
		(apt-get update -qq && apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1))
	for deb in .tools/deb/haproxy_*.deb .tools/deb/liblua5.3-0_*.deb .tools/deb/libopentracing*.deb; do \
		dpkg -x $$deb .tools/haproxy; done
	LD_LIBRARY_PATH=.tools/haproxy/usr/lib/x86_64-linux-gnu $@ -v

# Debian's Chromium and its chromedriver, for the console's tests in a real browser (tests/browser.py). Unlike the
# tools above they are installed into the system (root, or sudo): Chromium needs dozens of Debian's libraries.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(CHROMEDRIVER):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver 2>/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		chromium-driver)
	test -x /usr/bin/chromium && test -x $@

$(VENV)/.installed: pyproject.toml Makefile lock/image.txt lock/constraints.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(VENV)/bin/python lock/constraints.py lock/image.txt > $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt -r $(VENV)/constraints.txt -e '.[test]'
	touch $@

serve: install
	$(VENV)/bin/imageserve run

lint: install
	$(VENV)/bin/ruff check .

# The tests that start no Ray cluster and load no model (tests/conftest.py refuses Ray in them): under a minute.
unit: install $(PROMETHEUS) $(REDIS) $(HAPROXY)
	$(VENV)/bin/python -m pytest -m "not integration and not models"

test: lint $(PROMETHEUS) $(REDIS) $(HAPROXY) $(CHROMEDRIVER)
	$(VENV)/bin/python -m pytest

# serve_config.yaml and cluster/deploy/*.yaml from the example fleet and production config.
cluster-configs: install
	$(VENV)/bin/imageserve cluster-configs --serve-config-out serve_config.yaml --manifests-out cluster/deploy

# lock/image.txt: every package the node image installs, pinned with sha256 hashes, resolved for the
# image's Python and platform from pyproject.toml and lock/image.in (uv, from PyPI, into .venv).
lock: install
	test -x $(VENV)/bin/uv || $(PIP) install uv
	$(VENV)/bin/uv pip compile pyproject.toml lock/image.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o lock/image.txt

# The node image (Dockerfile): Ray's CUDA image with imageserve. For 4-bit variants pass the real
# nunchaku wheel and its sha256: make image NUNCHAKU_WHEEL=https://github.com/nunchaku-tech/nunchaku/releases/...
# NUNCHAKU_WHEEL_SHA256=...
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' serve_app/__init__.py)
IMAGE ?= imageserve:$(VERSION)
image:
	docker build -t $(IMAGE) $(if $(NUNCHAKU_WHEEL),--build-arg NUNCHAKU_WHEEL=$(NUNCHAKU_WHEEL) \
		--build-arg NUNCHAKU_WHEEL_SHA256=$(NUNCHAKU_WHEEL_SHA256)) .
