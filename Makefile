# Two commands do all set-up on a fresh machine (see README):
#   make demo   - the main job: train a small HierarchicalTopK SAE on Gemma-3 270M, serve it, query it
#   make test   - install, lint, type-check and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev,gguf,serving
PYTEST_ARGS ?= -m "not slow"
# The Triton server the live test starts (the `triton` extra's wheel, docs/triton.md). Installed
# without its Python pins (numpy<2, protobuf<7), which would move the core's versions back.
TRITON_SERVER ?= nvidia-pytriton==0.7.0

.PHONY: install proto saelens browser test test-slow lint demo bench pareto clean

# torch==2.13.0 first: it is the local CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps "$(TRITON_SERVER)"
	touch $@

install: $(VENV)/.installed proto

# docs/openapi.json: the HTTP API's OpenAPI document, derived from its pydantic models (a test
# fails when the committed copy is stale).
openapi: $(VENV)/.installed
	$(BIN)/python -m hsae_runtime.serving.http > docs/openapi.json

# Generated gRPC stubs are built here, never committed.
proto: $(VENV)/.installed
	@if [ -f protos/hsae/v1/hsae.proto ]; then $(BIN)/python -m hsae_runtime.serving.build_proto; fi

# The real SAELens, for the round-trip test (tests/test_exporters_saelens.py) and bench_step's
# comparison: a venv of its own (never one of our dependencies). A .pth line lets it reuse this
# venv's packages, torch's CPU wheel first of all, so pip adds only what SAELens needs on top
# (versions it needs otherwise go into its own folder, which comes first). Times: docs/exporters.md.
SAELENS_VENV ?= .cache/saelens-venv
SAELENS      ?= sae-lens==6.54.12
$(SAELENS_VENV)/.installed: $(VENV)/.installed
	test -x $(SAELENS_VENV)/bin/python || $(PYTHON) -m venv $(SAELENS_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(SAELENS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/hsae_project.pth"
	$(SAELENS_VENV)/bin/python -m pip install -q "$(SAELENS)"
	touch $@

saelens: $(SAELENS_VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/pyright

# Headless Chromium for the report's browser test (tests/test_features_browser.py): installed
# with apt only where it is missing and apt is usable (root or passwordless sudo); elsewhere
# that one test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			|| echo "chromium could not be installed: the browser test will skip"; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium \
			|| echo "chromium could not be installed: the browser test will skip"; \
	else echo "no chromium and no usable apt: the browser test will skip"; fi

# HSAE_REQUIRE_SAELENS: the real-SAELens round trip fails instead of skipping without its venv.
test: lint browser saelens
	HSAE_REQUIRE_SAELENS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow

demo: install
	$(BIN)/python -m hsae_runtime.demo

# The Pareto experiment: one HierarchicalTopK SAE vs TopK SAEs on Gemma-3 270M, in two settings
# (docs/pareto.md). PARETO_SETTINGS picks them, PARETO_ARGS adds flags to each.
PARETO_OUT ?= runs/pareto
PARETO_SETTINGS ?= layer9-4096 layer5-8192
pareto: install
	@for s in $(PARETO_SETTINGS); do \
		$(BIN)/python benchmarks/pareto.py --setting $$s --out $(PARETO_OUT)/$$s $(PARETO_ARGS) || exit 1; \
	done

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) hsae_runtime/serving/pb .pytest_cache .ruff_cache
