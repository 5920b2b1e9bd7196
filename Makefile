# Everything a fresh machine needs: a venv, torch first (the CPU build here), the project, Debian packages.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= serve,onnx,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps test test-slow test-all demo serve bench builtin clean

setup: $(STAMP) system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# espeak-ng (speech with phoneme timings for the corpus), sox (audio conversion), idempotent
system-deps:
	@if ! ldconfig -p | grep -q libespeak-ng.so.1 || ! command -v espeak-ng >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng libespeak-ng1 sox; \
	fi

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# the main job: the WebRTC server with the built-in avatar on http://127.0.0.1:8080/
serve: setup
	$(BIN)/marionette serve --host 127.0.0.1 --port 8080

# a small corpus and its contact sheet
demo: setup
	$(BIN)/marionette corpus --out demo_corpus --identities 4 --clips-per-identity 1 --seconds 3 --seed 0 --overwrite
	$(BIN)/marionette corpus preview demo_corpus --out demo_corpus/preview.png

# The built-in avatar, end to end (needs an NVIDIA GPU: the lite schedule is ~480k steps; about 33 days
# on 2 CPU cores). Each step keeps its output: rerun after an interruption and finished steps are skipped
# (training resumes from its saved state).
BUILTIN_RUN ?= runs/builtin
DEVICE ?= cuda
BUILTIN_IDS ?= 400
LOOKAHEAD_MS ?=
builtin: setup
	test -f $(BUILTIN_RUN)/corpus/manifest.json || $(BIN)/marionette corpus --out $(BUILTIN_RUN)/corpus \
		--identities $(BUILTIN_IDS) --clips-per-identity 4 --seconds 8 --seed 1 --device $(DEVICE)
	test -f $(BUILTIN_RUN)/oracle/oracle.json || $(BIN)/marionette oracle --data $(BUILTIN_RUN)/corpus \
		--out $(BUILTIN_RUN)/oracle --steps 20000 --batch 64 --device $(DEVICE)
	$(BIN)/marionette train --stage all --data $(BUILTIN_RUN)/corpus --config lite --out $(BUILTIN_RUN)/lite \
		--device $(DEVICE) --oracle $(BUILTIN_RUN)/oracle $(if $(LOOKAHEAD_MS),--lookahead-ms $(LOOKAHEAD_MS)) \
		$$(test -d $(BUILTIN_RUN)/lite/state && echo --resume)
	$(BIN)/marionette install-builtin --checkpoint $(BUILTIN_RUN)/lite/checkpoint --oracle $(BUILTIN_RUN)/oracle
	$(BIN)/marionette evaluate --data $(BUILTIN_RUN)/corpus --split test --max-clips 40 --device $(DEVICE) \
		--out benchmarks/results/quality.json
	$(BIN)/python benchmarks/lookahead_curve.py --data $(BUILTIN_RUN)/corpus --device $(DEVICE)

clean:
	rm -rf $(VENV) .pytest_cache demo_corpus
