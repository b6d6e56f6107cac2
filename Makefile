# dynamictrl: make help lists the targets.
PY := .venv/bin/python
ARGS ?=
# make setup GPU=1: onnxruntime-gpu in place of the CPU build (DWPose on the GPU)
GPU ?= 0
# make setup CUDA=cu126: torch and torchvision from PyTorch's index for that CUDA version instead of PyPI's
# CUDA 13 build (README: the driver each needs); TORCH_INDEX=URL: from another index (a mirror). The choice
# is kept in .venv/torch-index.txt, so later makes keep it; CUDA=pypi goes back to PyPI's build.
CUDA ?=
TORCH_RECORDED := $(shell cat .venv/torch-index.txt 2>/dev/null)
TORCH_INDEX ?= $(if $(filter pypi,$(CUDA)),,$(if $(CUDA),https://download.pytorch.org/whl/$(CUDA),$(TORCH_RECORDED)))
TORCH_SWITCH := $(filter-out $(TORCH_RECORDED),$(TORCH_INDEX))$(filter-out $(TORCH_INDEX),$(TORCH_RECORDED))
export GLOG_minloglevel ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: help setup demo ablation test preprocess precompute train animate eval bench lint clean torch-switch rehearse gpu-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# another torch build than the installed one: set up again, replacing torch and torchvision
.venv.stamp: pyproject.toml constraints.txt $(if $(TORCH_SWITCH),torch-switch)
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	$(if $(and $(TORCH_SWITCH),$(wildcard .venv.stamp)),.venv/bin/pip uninstall -q -y torch torchvision)
	$(if $(TORCH_INDEX),.venv/bin/pip install -q -c constraints.txt --index-url $(TORCH_INDEX) torch torchvision)
	.venv/bin/pip install -q -c constraints.txt -e ".[backends,dev]"
	@# SAM 2 ships as an sdist whose build wants torch: build it against ours, without its CUDA extension
	@# (only a post-processing kernel; sam2 runs without it).
	SAM2_BUILD_CUDA=0 .venv/bin/pip install -q -c constraints.txt --no-build-isolation "sam2==1.1.0"
	@# DeepSpeed is an sdist too; DS_BUILD_OPS=0 builds no kernels ahead of time (they JIT on a GPU node),
	@# so its strategy is built and tested here on CPU.
	DS_BUILD_OPS=0 .venv/bin/pip install -q -c constraints.txt --no-build-isolation \
		"deepspeed==0.19.8" hjson msgpack ninja py-cpuinfo einops
	echo "$(TORCH_INDEX)" > .venv/torch-index.txt
	touch .venv.stamp

# rtmlib pulls the CPU onnxruntime; both builds provide the same module, so the CPU one goes first.
.venv-gpu.stamp: .venv.stamp
	.venv/bin/pip uninstall -q -y onnxruntime
	.venv/bin/pip install -q -c constraints.txt --force-reinstall --no-deps onnxruntime-gpu
	touch .venv-gpu.stamp

setup: .venv.stamp $(if $(filter 1,$(GPU)),.venv-gpu.stamp) ## create .venv with the pinned stack (no-op when up to date)

demo: setup ## the whole chain on embedded defaults: data, shards, training, animation, report
	$(PY) pipelines/demo/main.py $(ARGS)

ablation: setup ## the paper's Tables 3 and 4 in miniature: PadaLN, UVT, cross-attention, no text -> outputs/ablation/
	$(PY) pipelines/ablation/main.py $(ARGS)

test: setup ## the test suite
	$(PY) -m pytest -q $(ARGS)

preprocess: setup ## raw videos -> shards: ARGS="input=DIR output=DIR"
	$(PY) pipelines/preprocess/main.py $(ARGS)

precompute: setup ## VAE latents + T5 embeddings of shards: ARGS="input=SHARDS output=DIR"
	$(PY) pipelines/precompute/main.py $(ARGS)

train: setup ## train: ARGS="experiment=demo output=DIR"
	$(PY) pipelines/train/main.py $(ARGS)

animate: setup ## ARGS="image=PATH pose=PATH prompt='...' output=PATH.mp4"
	$(PY) pipelines/animate/main.py $(ARGS)

eval: setup ## ARGS="generated=DIR reference=DIR output=DIR"
	$(PY) pipelines/eval/main.py $(ARGS)

lint: setup ## ruff
	$(PY) -m ruff check src tests pipelines

rehearse: setup ## every trainer config on 2 CPU processes, as launched on a cluster: kill, resume, export (ARGS="fsdp slurm ...")
	$(PY) -m dynamictrl.train.rehearse $(ARGS)

gpu-check: setup ## on one GPU: 5B at full width and clip, as many blocks as fit, per-block figures vs the plan -> docs/gpu-check.md
	PYTHON=.venv/bin/python scripts/gpu_check.sh $(ARGS)

clean: ## remove outputs (keeps .venv and data/)
	rm -rf outputs

bench: setup ## speed and memory benchmarks -> outputs/bench/ (ARGS="model eval preprocess train" picks sections)
	$(PY) -m dynamictrl.bench $(ARGS)
