# Everything a fresh machine needs: a venv, torch first (the CPU build here), the project, Debian packages.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= serve,onnx,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps test test-slow test-all demo serve bench oracle builtin builtin-time quality clean

setup: $(STAMP) system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# espeak-ng (speech with phoneme timings for the corpus), sox (audio conversion), pocketsphinx-testdata (real
# recorded human speech, CMU test utterances and LibriVox readings, BSD-2: tests and benchmarks), nginx-light +
# libnginx-mod-rtmp (a local RTMP ingest the `live` tests and benchmarks/live_soak.py start on 127.0.0.1; never
# the system service), libportaudio2 (the microphone of `marionette live`), idempotent
REAL_SPEECH := /usr/share/pocketsphinx/test/data/librivox
RTMP_MODULE := /usr/lib/nginx/modules/ngx_rtmp_module.so
system-deps:
	@if ! ldconfig -p | grep -q libespeak-ng.so.1 || ! command -v espeak-ng >/dev/null || ! test -d $(REAL_SPEECH) \
		|| ! test -f $(RTMP_MODULE) || ! ldconfig -p | grep -q libportaudio.so.2; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng libespeak-ng1 sox pocketsphinx-testdata \
			nginx-light libnginx-mod-rtmp libportaudio2; \
	fi

test: setup
	$(BIN)/python -m pytest -q --durations=25

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

# The built-in avatar, end to end, from nothing: <= 2.5 h on 2 CPU cores (DEVICE=cpu, the default here), minutes
# on one NVIDIA GPU (DEVICE=cuda). Every step keeps its output: rerun after an interruption and finished steps
# are skipped, training resumes from its last checkpoint (every 250 steps). `make builtin-time` records the wall
# time and load of a run in benchmarks/results/builtin_time.json, then evaluates what it installed (`make
# quality`: ~7 min more, not part of the training's budget).
BUILTIN_RUN ?= runs/builtin
DEVICE ?= cpu
LOOKAHEAD_MS ?=
# The factor oracle is the instrument that measures every model (`evaluate`, the jaw calibration), not part of the
# model: the committed one (engine/assets/builtin/oracle) is used, so every model is read by the same yardstick. It
# also ships with the built-in: the runtimes read each avatar's mouth with it once (engine/jaw_map.py).
# `make oracle` trains one from nothing (~27 min on the slower 2-core machine) and `make builtin ORACLE=...` uses it;
# where none is found, `make builtin` trains it first.
ORACLE ?= engine/assets/builtin/oracle
oracle: setup
	@# rendered frames only: global 96 px + eye/mouth crops at 256 px
	$(BIN)/marionette oracle --out $(BUILTIN_RUN)/oracle \
		--steps 3000 --batch 32 --size 96 --regions --render-pool 10000 --device $(DEVICE)

# The polish (trainer/polish.py, README "The polish"): G's stages once more from the first pass's model at lr 3e-4,
# into $(BUILTIN_RUN)/polish, where it fits BUILTIN_BUDGET_MIN of wall time since the run started (projected from
# the first pass's own stage times); POLISH=on|off decides instead. The installed model is the polished one if
# the polish completed, else the first pass's.
POLISH ?= auto
BUILTIN_BUDGET_MIN ?= 150
builtin: setup
	mkdir -p $(BUILTIN_RUN) && (test -f $(BUILTIN_RUN)/started || date +%s > $(BUILTIN_RUN)/started)
	@# speech corpus (audio + idle-motion stages; 64 px: their frames are not used)
	test -f $(BUILTIN_RUN)/corpus/manifest.json || $(BIN)/marionette corpus --out $(BUILTIN_RUN)/corpus \
		--identities 120 --clips-per-identity 2 --seconds 8 --size 64 --seed 1 --device $(DEVICE)
	test -f $(ORACLE)/oracle.json || $(BIN)/marionette oracle --out $(ORACLE) \
		--steps 3000 --batch 32 --size 96 --regions --render-pool 10000 --device $(DEVICE)
	@# render (E_app, E_mot + heads, G on pairs rendered on the fly) -> state -> patch (mouth/eye nets) -> audio -> idle
	$(BIN)/marionette train --config talk --stage all --data $(BUILTIN_RUN)/corpus --out $(BUILTIN_RUN)/talk \
		--device $(DEVICE) --workers 1 --ckpt-every 250 $(if $(LOOKAHEAD_MS),--lookahead-ms $(LOOKAHEAD_MS)) \
		$$(test -d $(BUILTIN_RUN)/talk/state && echo --resume)
	$(BIN)/python -m trainer.polish --run $(BUILTIN_RUN) --budget-min $(BUILTIN_BUDGET_MIN) --force $(POLISH) \
		--device $(DEVICE)
	@# the jaw calibration: G's small openings read against the renderer's by the oracle (idempotent); install
	CK=$(BUILTIN_RUN)/talk/checkpoint; \
	grep -qs '"patch"' $(BUILTIN_RUN)/polish/state/progress.json && CK=$(BUILTIN_RUN)/polish/checkpoint; \
	$(BIN)/python benchmarks/mouth_opening.py --checkpoint $$CK --oracle $(ORACLE) \
		--calibrate --install --out $(BUILTIN_RUN)/mouth_opening.json && \
	$(BIN)/marionette install-builtin --checkpoint $$CK --oracle $(ORACLE)

# the installed built-in on a held-out 256 px corpus (seed 2) -> benchmarks/results/quality.{json,md} and its PNG grids
quality: setup
	test -f $(BUILTIN_RUN)/eval256/manifest.json || $(BIN)/marionette corpus --out $(BUILTIN_RUN)/eval256 \
		--identities 10 --clips-per-identity 2 --seconds 6 --size 256 --seed 2 --device $(DEVICE)
	$(BIN)/marionette evaluate --data $(BUILTIN_RUN)/eval256 --split all --max-clips 6 --max-frames 75 --device $(DEVICE) \
		--out benchmarks/results/quality.json

builtin-time: setup
	$(BIN)/python benchmarks/time_command.py --out benchmarks/results/builtin_time.json -- $(MAKE) builtin
	$(MAKE) quality

clean:
	rm -rf $(VENV) .pytest_cache demo_corpus
