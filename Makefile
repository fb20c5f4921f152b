# latentd developer tasks. Every target builds .venv first if it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= all
TORCH_VERSION ?= 2.13.0
# Machines without an NVIDIA GPU get PyTorch's CPU build, never the multi-GB CUDA wheels.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
STAMP := $(VENV)/.latentd-installed
# Kodak and the training sets (../shared/datasets/README.md says where each comes from); DATASETS=DIR elsewhere.
SHARED ?= ../shared
DATASETS ?= $(SHARED)/datasets
REFERENCE ?= $(SHARED)/reference/compressai_kodak_rd.csv
DEMO_MODEL ?= default
DEMO_OUT ?= out/demo
EVAL_MODEL ?= default
PYTEST_ARGS ?=

.PHONY: kodak install test test-fast serve demo eval eval-rd learning-curve bench protos clean gpu-pack gpu-run gpu-dry-run

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
ifeq ($(HAS_NVIDIA),yes)
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
else
	$(BIN)/python deploy/install/torch_cpu.py $(TORCH_VERSION) $(TORCH_CPU_INDEX)
	$(BIN)/python -c "import torch, sys; sys.exit('a CUDA build of torch was installed on a machine without an NVIDIA GPU' if torch.version.cuda else 0)"
endif
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job: the gRPC service on the default model at localhost:50051 (Ctrl-C or SIGTERM drains and stops).
serve: $(STAMP)
	$(BIN)/latentd serve --host 127.0.0.1 --port 50051 --model default=$(DEMO_MODEL)

demo: $(STAMP) kodak
	$(BIN)/latentd roundtrip $(DATASETS)/kodak/*.png -o $(DEMO_OUT) --model $(DEMO_MODEL)

eval: $(STAMP) kodak
	$(BIN)/latentd eval --model $(EVAL_MODEL) --images $(DATASETS)/kodak --grid out/eval-$(EVAL_MODEL)-kodak.png

# Rate-distortion of the latent formats vs JPEG/WebP/AVIF and CompressAI's published Kodak points (out/eval-rd).
eval-rd: $(STAMP) kodak
	$(BIN)/latentd eval-rd --model $(EVAL_MODEL) --images $(DATASETS)/kodak -o out/eval-rd \
		$(if $(wildcard $(REFERENCE)),--reference $(REFERENCE))

# The default model's learning curve on Kodak: its weights at every commit that shipped new ones since the
# squared-error fine-tune (CURVE_FROM, 12,400 steps: the long schedule's step 0), fitted against log2(steps).
CURVE_FROM := e897820
CURVE_DIR := build/learning-curve
learning-curve: $(STAMP) kodak
	rm -rf $(CURVE_DIR)
	set -e; for rev in $$(git log --format=%h $(CURVE_FROM)^.. -- vae/weights/default/diffusion_pytorch_model.safetensors); do \
		mkdir -p $(CURVE_DIR)/$$rev; \
		for file in config.json diffusion_pytorch_model.safetensors training_state.json; do \
			git show $$rev:vae/weights/default/$$file > $(CURVE_DIR)/$$rev/$$file 2>/dev/null || rm $(CURVE_DIR)/$$rev/$$file; \
		done; \
	done
	$(BIN)/latentd eval-curve $(CURVE_DIR)/$$(git rev-parse --short $(CURVE_FROM))@0 \
		$$(ls -d $(CURVE_DIR)/*/training_state.json | xargs -n1 dirname) \
		--step-offset 12400 --images $(DATASETS)/kodak --goal-psnr 27 --goal-ms-ssim 0.95 -o out/learning-curve

kodak:
	@test -d $(DATASETS)/kodak || { echo "no Kodak images in $(DATASETS)/kodak: put the 24 PNGs of the Kodak Lossless True Color Image Suite there, or point DATASETS= at a folder that has kodak/" >&2; exit 2; }

# The wire contract's Python code; tests/test_protos.py fails when it is out of date.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		protos/latentd/v1/latentd.proto

bench: $(STAMP)
	$(BIN)/latentd bench codec --model sd --size 512 --batch 1

# The one prepared device run (docs/gpu.md): pack what it carries (.whl, .gpu-data), then, on the device,
# `bash deploy/gpu/run.sh` (what gpu-run runs); gpu-dry-run is the same script on this CPU with tiny settings.
gpu-pack: $(STAMP)
	DATASETS=$(DATASETS) PYTHON=$(BIN)/python bash deploy/gpu/pack.sh

gpu-run:
	bash deploy/gpu/run.sh

gpu-dry-run: $(STAMP)
	DEVICE=cpu BUDGET_S=$${BUDGET_S:-300} OUT=out/gpu-dry-run PY=$(BIN)/python bash deploy/gpu/run.sh

clean:
	rm -rf $(VENV) build *.egg-info out .pytest_cache .whl .gpu-data
