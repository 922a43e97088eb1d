# Fresh machine: `make demo` (tiny profile end to end) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Make variables map to CLI flags; left empty, pipeline.toml (and PROFILE) decide.
PROFILE ?=
CONFIG ?=
LAYERS ?=
SOURCE ?=
CACHE ?=
TOKENS ?=
QUESTIONS ?=
OUT ?=
WORKERS ?=
SET ?=
SCHEDULER ?=

common = $(if $(CONFIG),--config $(CONFIG)) $(if $(PROFILE),--profile $(PROFILE)) \
	$(if $(CACHE),--cache $(CACHE)) $(if $(LAYERS),--layers $(LAYERS)) \
	$(foreach s,$(SET),--set $(s))

.PHONY: install gpu-kernels browser-deps test demo config harvest train report browse vllm-env bench bench-peers-env clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build on CPU machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(MAKE) --no-print-directory gpu-kernels
	touch $@

install: $(STAMP) browser-deps

# Debian's Chromium and its chromedriver: the browser tests drive them headless (Selenium), and
# the report's and browser's screenshots come from them. apt-get as root (CI is); else say how.
CHROMIUM_BINS := /usr/bin/chromium /usr/bin/chromedriver
browser-deps:
	@if ! ls $(CHROMIUM_BINS) >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian's chromium and chromium-driver"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -q && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
		else echo "chromium and chromium-driver are missing: the browser tests need them (apt-get install chromium chromium-driver, as root)"; fi; \
	fi

# On a CUDA machine (`python -m harvest detect-gpu`; ACTCACHE_CUDA=1|0 overrides it) also the
# fast Gated DeltaNet kernels: without them 48 of Qwen3.6-27B's 64 layers run torch's reference
# code. causal-conv1d compiles against the installed torch, hence no build isolation.
GPU_KERNELS ?= flash-linear-attention causal-conv1d
PIP_GPU ?= $(PY) -m pip install -q --no-build-isolation
gpu-kernels:
	@if [ "$$($(PY) -m harvest detect-gpu)" = cuda ]; then \
		echo "CUDA found: installing $(GPU_KERNELS)"; \
		$(PIP_GPU) $(GPU_KERNELS) || echo "could not install $(GPU_KERNELS) (a CUDA compiler or a matching wheel is needed): harvest runs torch's reference kernels"; \
	else echo "no CUDA here: $(GPU_KERNELS) not installed (torch's reference kernels)"; fi

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

harvest_flags = $(if $(SOURCE),--source $(SOURCE)) \
	$(if $(TOKENS),--tokens $(TOKENS)) $(if $(QUESTIONS),--questions $(QUESTIONS)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

# config: the effective configuration each stage would run with (pipeline.toml, PROFILE, SET and
# the variables above merged), as TOML with each key's one-line doc as a comment.
config: install
	$(PY) -m harvest config $(common) $(harvest_flags)
	$(PY) -m train config $(common) $(if $(OUT),--out $(OUT))

harvest: install
	$(PY) -m harvest run $(common) $(harvest_flags)

train: install
	$(PY) -m train run $(common) $(if $(OUT),--out $(OUT))

# report: loss recovered (splices each SAE into the model) and logit effects (decoder rows through
# the model's final norm and unembedding, for the browser), then the model-free feature analysis
# (dask; SCHEDULER=host:port for a cluster) and the one-page HTML report in OUT.
report_args = $(if $(CONFIG),--config $(CONFIG)) $(if $(PROFILE),--profile $(PROFILE)) \
	$(if $(CACHE),--cache $(CACHE)) $(if $(OUT),--out $(OUT)) $(foreach s,$(SET),--set $(s))

report: install
	$(PY) -m harvest loss-recovered $(report_args)
	$(PY) -m harvest logit-effects $(report_args)
	$(PY) -m train analyze $(report_args) $(if $(SCHEDULER),--scheduler $(SCHEDULER))
	$(PY) -m train report $(report_args)

# The feature browser over a run (OUT=dir or URL; PORT, HOST; EXPORT=dir writes a static site).
PORT ?= 8765
HOST ?= 127.0.0.1
EXPORT ?=
browse: install
	$(PY) -m train browse $(if $(CONFIG),--config $(CONFIG)) $(if $(PROFILE),--profile $(PROFILE)) \
		$(if $(OUT),--out $(OUT)) --port $(PORT) --host $(HOST) $(if $(EXPORT),--export $(EXPORT))

# The tiny profile's dead threshold (100k tokens) is sized for its 2M-token planted-feature
# run; the demo trains 60k tokens, so it counts a latent dead after 15k, and AuxK fires.
demo: install
	$(MAKE) --no-print-directory harvest PROFILE=tiny
	$(MAKE) --no-print-directory train PROFILE=tiny SET="train.dead_tokens=15000 $(SET)"
	$(MAKE) --no-print-directory report PROFILE=tiny

# vLLM pins torch 2.14 and transformers <5.21: it lives in its own environment and is
# driven as a subprocess by harvest (supergpqa.backend = "vllm", [supergpqa.vllm] python =
# .venv-vllm/bin/python). harvest/vllm_generate.py imports only vllm, so nothing else goes in.
VLLM ?= vllm
vllm-env:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q '$(VLLM)'
	.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__, 'ready in .venv-vllm')"

# Each script measures one comparison side by side and prints where it wrote its results;
# docs/benchmarks.md records the numbers. The trainer and SAELens-loader comparisons need
# `make bench-peers-env` first.
BENCHES ?= storage harvest loader trainer loader_saelens analysis browse
bench: install
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	set -e; for b in $(BENCHES); do echo "== bench/bench_$$b.py"; $(PY) bench/bench_$$b.py; done

# The peers (SAELens, EleutherAI sparsify) live in their own environment and are driven as
# subprocesses by bench/bench_trainer.py and bench/bench_loader_saelens.py. torch CPU goes in
# first so that neither pulls a CUDA build; on PyPI sparsify is `eai-sparsify`.
bench-peers-env:
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q --upgrade pip
	.venv-peers/bin/pip install -q torch==2.13.0
	.venv-peers/bin/pip install -q torch==2.13.0 sae-lens eai-sparsify

clean:
	rm -rf caches/tiny caches/tiny.rollouts runs/tiny
