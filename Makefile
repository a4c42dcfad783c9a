# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed FIRST: it resolves to the local CPU wheel. Any other torch
# spec would pull several GB of CUDA packages.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= demo_out

.PHONY: venv demo demo-quick test test-slow catalog test-s3prl s3prl-venv bench bench-s3prl bench-takeoff clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,tensorboard]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/aviary demo --out $(OUT)

demo-quick: $(STAMP)
	$(BIN)/aviary demo --quick --out $(OUT)-quick

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout 3600

# aviary/models/catalog.json, what `aviary models` lists without importing torch: regenerate it
# after changing a preset, a model or anything below models/ (tests/models/test_catalog.py says so).
catalog: $(STAMP)
	$(BIN)/python -m aviary.models.catalog

# s3prl 0.4.18 in its own venv (.s3prl-venv, or S3PRL_VENV=...), built once: torch==2.13.0 first,
# s3prl without its declared dependencies, a torchaudio stub (benchmarks/s3prl_env.py).
S3PRL_VENV ?= .s3prl-venv

s3prl-venv: $(STAMP)
	$(BIN)/python -m benchmarks.s3prl_env $(S3PRL_VENV)

# Exported upstream packages in s3prl's own runner and featurizer == aviary's hidden states.
test-s3prl: s3prl-venv
	AVIARY_S3PRL_VENV=$(S3PRL_VENV) $(BIN)/python -m pytest -q -s -m slow tests/interop/test_s3prl_upstream_slow.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# aviary vs s3prl 0.4.18's own Mockingjay pretraining step and Mockingjay / Audio ALBERT upstream
# forwards, alternately in separate processes, one thread each (benchmarks/bench_vs_s3prl.py;
# tens of minutes on 2 cores).
bench-s3prl: s3prl-venv
	OMP_NUM_THREADS=1 AVIARY_S3PRL_VENV=$(S3PRL_VENV) $(BIN)/python -m benchmarks.bench_vs_s3prl --threads 1

# Every CPU recipe x 3 seeds x (fp32, and bf16 where native): hours on 2 cores (BENCHMARKS.md).
bench-takeoff: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_takeoff --threads 1

clean:
	rm -rf $(VENV) build *.egg-info
