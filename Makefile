# jaxasr: `make demo` runs the main job, `make test` the test suite. Both create the
# virtual environment and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Parallel test workers; XLA compiles are single-threaded, so two workers use two cores well.
TEST_WORKERS ?= 2

.PHONY: setup test bench demo-transcribe clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15

bench: setup
	$(BIN)/python tools/bench_features.py
	$(BIN)/python tools/bench_transcribe.py

# Transcribe a few synthesized sentences with the bundled Whisper tiny.en.
demo-transcribe: setup
	$(BIN)/python tools/synthesize.py build/examples
	$(BIN)/python -m jaxasr.transcribe --model bundled:tiny.en --manifest build/examples/manifest.jsonl \
		--output build/examples/transcripts.jsonl

clean:
	rm -rf $(VENV) build .pytest_cache
