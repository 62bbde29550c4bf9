# jaxasr: `make demo` runs the main job, `make test` the test suite. Both create the
# virtual environment and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Parallel test workers; XLA compiles are single-threaded, so two workers use two cores well.
TEST_WORKERS ?= 2

.PHONY: setup test bench demo demo-data demo-transcribe merge-demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,mkl]'
	touch $@

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15

bench: setup
	$(BIN)/python tools/bench_features.py
	$(BIN)/python tools/bench_transcribe.py

# The main job: synthesize a pharmacy-domain speech set from text written for the project, then
# adapt the bundled Whisper tiny.en to it (WER before and after, domain and general sets).
DEMO_SETS := pharmacy_train:1 pharmacy_dev:2 pharmacy_test:3 general_test:4
DEMO_VOICES := en-us en-gb en-us+f3 en-us+m3 en-gb+f2
DEMO_WORKDIR ?= runs/demo

demo: demo-data
	$(BIN)/python -m jaxasr.train --config configs/demo.py --workdir $(DEMO_WORKDIR)

demo-data: build/demo/.done

build/demo/.done: $(VENV)/.installed configs/demo_text/*.txt tools/synthesize.py
	for spec in $(DEMO_SETS); do name=$${spec%%:*}; seed=$${spec##*:}; \
		$(BIN)/python tools/synthesize.py build/demo/$$name --text configs/demo_text/$$name.txt --seed $$seed \
			--workers 2 --arrayrecord --voices $(DEMO_VOICES) || exit 1; done
	touch $@

# Two domain experts (pharmacy, banking) merged four ways vs. joint fine-tuning (tools/merge_demo.py).
merge-demo: setup
	$(BIN)/python tools/merge_demo.py

# Transcribe a few synthesized sentences with the bundled Whisper tiny.en.
demo-transcribe: setup
	$(BIN)/python tools/synthesize.py build/examples
	$(BIN)/python -m jaxasr.transcribe --model bundled:tiny.en --manifest build/examples/manifest.jsonl \
		--output build/examples/transcripts.jsonl

clean:
	rm -rf $(VENV) build runs .pytest_cache
