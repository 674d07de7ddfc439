# pi0_lightning: every target installs what it needs into .venv first (CPU torch on machines without CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.5.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# OpenMP threads that spin while waiting stall torch on a small machine whose cores are also busy (env workers,
# other jobs): the learning tests took >9.5 min instead of 4.5 with two other busy processes on 2 cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-fast lint format demo demo-learn demo-learn-fast demo-libero-learn libero-proof compare check-physics bench-cpu bench-env bench-gpu clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@# headless MuJoCo rendering (EGL, software Mesa when there is no GPU); installed only if missing
	@ldconfig -p | grep -q 'libEGL.so.1' || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	   libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libopengl0 libgbm1 >/dev/null) || \
	  echo "warning: libEGL.so.1 not found and could not be installed; LIBERO rendering needs EGL (or MUJOCO_GL=osmesa)"; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	@# Triton for its CPU interpreter only (the attention kernel's CPU test), in a folder of its own: CPU torch
	@# does not come with it, and the main environment stays as users install it
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q --no-deps --upgrade --target $(VENV)/triton-interpreter \
	  triton==$(TRITON_VERSION) || echo "warning: triton not installed; the kernel's interpreter test will be skipped"
	@# robosuite warns on every import unless a private macro file exists; its setup script is interactive
	$(PY) -c "import importlib.util, pathlib; pathlib.Path(importlib.util.find_spec('robosuite').origin).with_name('macros_private.py').touch()"
	touch $(STAMP)

# The whole suite (CI runs this): parity, LIBERO, Lightning end to end, the learning proofs
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick tier for iterating: everything not marked slow
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The main job: RIPT-CFG on real LIBERO with a tiny random PI0 on CPU (2 env workers, 2 tasks, short horizon):
# 2 RL iterations of fit, then validate from the last checkpoint; everything is logged to MLflow (runs/mlflow.db).
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m pi0_lightning.cli fit --config configs/demo.yaml
	$(PY) -m pi0_lightning.cli validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
	@echo
	@echo "results: checkpoints runs/demo/checkpoints, exported policy runs/demo/export (PI0.from_pretrained),"
	@echo "         rollout stats runs/demo/rollout_stats.jsonl, videos runs/demo/videos, plot runs/demo/success_rate.png"
	@echo "         MLflow: make compare, or mlflow ui --backend-store-uri sqlite:///$$(pwd)/runs/mlflow.db"

# Learning proof: RL raises the success of a tiny random PI0 on the reach task (same env protocol) within minutes.
demo-learn: $(STAMP)
	rm -rf runs/reach
	$(PY) -m pi0_lightning.cli fit --config configs/reach_learn.yaml
	$(PY) -m pi0_lightning.learning_curve runs/reach

# The same proof for PI0-FAST with LOOP: demonstrations, supervised fine-tuning (a random PI0-FAST never writes a
# decodable action), then RL
demo-learn-fast: $(STAMP)
	rm -rf runs/reach_demos runs/reach_fast_sft runs/reach_fast
	$(PY) -m pi0_lightning.envs.reach_demos --out runs/reach_demos
	$(PY) -m pi0_lightning.cli fit --config configs/reach_sft_fast.yaml
	$(PY) -m pi0_lightning.cli fit --config configs/reach_learn_fast.yaml
	$(PY) -m pi0_lightning.learning_curve runs/reach_fast

# The learning proof on real LIBERO: scripted demonstrations, behaviour cloning of a random PI0, its success before
# RL, then RIPT-CFG and the final validation against it (configs/<proof>/, BENCHMARKS.md "Learning proofs").
# demo-libero-learn: CPU-sized (libero_object task 2 at 128 px, tiny PI0; its behaviour cloning is continued from 1500
# to 4000 steps with the schedule stretched, as measured); libero-proof: one GPU node with LIBERO and 16 env workers
# (three libero_object tasks, pi0_small)
demo-libero-learn: PROOF := libero_learn
demo-libero-learn: SCRIPTED := --tasks 2 --episodes 20 --resolution 128
demo-libero-learn: SFT_MORE := --trainer.max_steps 4000 --model.optim.decay_steps 4000
libero-proof: PROOF := libero_proof
libero-proof: SCRIPTED := --tasks 0,1,2 --episodes 20 --workers 16
demo-libero-learn libero-proof: $(STAMP)
	rm -rf runs/$(PROOF)_demos runs/$(PROOF)_sft runs/$(PROOF)_before runs/$(PROOF)
	$(PY) -m pi0_lightning.envs.scripted --suite libero_object $(SCRIPTED) --out runs/$(PROOF)_demos
	$(PY) -m pi0_lightning.data.norm_stats runs/$(PROOF)_demos --model pi0 --horizon 10 --no-delta-actions
	$(PY) -m pi0_lightning.cli fit --config configs/$(PROOF)/sft.yaml
	$(if $(SFT_MORE),$(PY) -m pi0_lightning.cli fit --config configs/$(PROOF)/sft.yaml --ckpt_path last $(SFT_MORE))
	$(PY) -m pi0_lightning.cli validate --config configs/$(PROOF)/rl.yaml --initial_weights true \
		--trainer.default_root_dir runs/$(PROOF)_before --model.algorithm.eval_guidance '[1.0]'
	$(PY) -m pi0_lightning.cli fit --config configs/$(PROOF)/rl.yaml
	$(PY) -m pi0_lightning.learning_curve runs/$(PROOF) --before runs/$(PROOF)_before

# Table of all MLflow runs (latest metrics)
compare: $(STAMP)
	$(PY) -m pi0_lightning.compare

# Is this the physics of the published LIBERO results? Task-5 bowl settle over its 50 init states, LIBERO-Object
# floor brightness, versions and a verdict (~20 s; see BENCHMARKS.md "LIBERO physics")
check-physics: $(STAMP)
	$(PY) -m pi0_lightning.envs.physics

# CPU timing of sample_actions / a training forward (prints a table; see BENCHMARKS.md)
bench-cpu: $(STAMP)
	$(PY) -m pi0_lightning.benchmarks.cpu

# LIBERO env steps/s through EnvPool, render every step vs only at chunk starts (see BENCHMARKS.md; ~10 min)
bench-env: $(STAMP)
	$(PY) -m pi0_lightning.benchmarks.env

# Real PI0 (3.3B, bf16, random weights) on one CUDA GPU: matmul peak, sample_actions latency/throughput and
# fraction of peak, CFG RL training step time/memory (full vs action expert, checkpointing off/on), the batch-1
# kernel profile (prefix vs denoising steps), PI0-FAST decoding, LIBERO rollouts end to end (see BENCHMARKS.md)
bench-gpu: $(STAMP)
	$(PY) -m pi0_lightning.benchmarks.gpu --infer-modes eager drop-cam graph compile --out runs/bench_gpu.json
	$(PY) -m pi0_lightning.benchmarks.gpu --skip-infer --batches-train 16 --trainables full --compile-train \
		--checkpointing off on llm6 --out runs/bench_gpu_compiled_train.json
	$(PY) -m pi0_lightning.benchmarks.profile --compile --tf32
	$(PY) -m pi0_lightning.benchmarks.fast_decode --out runs/bench_fast.json
	$(PY) -m pi0_lightning.benchmarks.rollout --workers 8 16 --out runs/bench_rollout.json

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .ruff_cache
