#!/usr/bin/env bash
# What the project's CPU machines cannot check, run on a CUDA machine (about 10-15 minutes on one H100):
#   1. every tiny family with trainer=gpu (bf16-mixed): train (sample grid, checkpoints), evaluate, export;
#   2. a real-size PixArt-Sigma XL-2 (0.61 B parameters: the real architecture from conf/model, random weights;
#      text encoder and VAE shrunk but of the real widths) at 512 px: 20 steps with sample grids and
#      checkpoints, killed with SIGKILL mid-run and resumed, evaluated on 8 prompts, exported (safetensors, ONNX);
#   3. the 1-GPU FLUX recipe (experiment=flux_schnell_w4a8_1gpu: LoRA + 8-bit AdamW) at one real-width FLUX block
#      of each kind: fraqat-plan's traced peak against the measured one, with the LoRA base float32 and bf16
#      (benchmarks/plan_accuracy.py --options lora-base; torch.cuda.max_memory_allocated on the GPU).
# It prints, per stage, the wall time and the peak GPU memory (nvidia-smi, every 200 ms), and the training
# step time and peak allocated memory that fraqat-train writes to metrics.json; everything lands in OUT.
#
#   bash scripts/gpu_check.sh [OUT]             # default OUT: gpu-check
#   GPU_CHECK_ACCELERATOR=cpu GPU_CHECK_LAYERS=1 GPU_CHECK_RESOLUTION=256 bash scripts/gpu_check.sh /tmp/x
#                                               # rehearse the script itself without a GPU (1 block, 256 px)
# Further knobs: GPU_CHECK_EVAL=0 skips the fraqat-eval stages (a machine without the FID Inception's package),
# GPU_CHECK_REAL_ONNX=0 the real-size ONNX export, GPU_CHECK_REAL=0 the whole real-size part (2.),
# GPU_CHECK_TINY="tiny_sana tiny_flux" picks the tiny families (GPU_CHECK_TINY= none), GPU_CHECK_FLUX_BLOCK=0 skips 3.;
# GPU_CHECK_REAL_OVERRIDES="callbacks.memory_check=null" adds overrides to the real-size runs;
# FRAQAT_BIN is the folder of the console scripts and python (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-check}")
mkdir -p "$OUT"
BIN=${FRAQAT_BIN:-.venv/bin}
EVAL=${GPU_CHECK_EVAL:-1}
REAL_ONNX=${GPU_CHECK_REAL_ONNX:-1}
TINY=${GPU_CHECK_TINY-tiny_sana tiny_pixart tiny_sd3 tiny_flux}
ACCELERATOR=${GPU_CHECK_ACCELERATOR:-gpu}
LAYERS=${GPU_CHECK_LAYERS:-}                 # empty: every block of the real model
RESOLUTION=${GPU_CHECK_RESOLUTION:-512}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline FRAQAT_CACHE="$OUT/cache"

if [ "$ACCELERATOR" = gpu ]; then
  TRAINER=(trainer=gpu)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu-memory.log" &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null || true' EXIT
else
  TRAINER=(trainer=cpu trainer.precision=32-true)
  : > "$OUT/gpu-memory.log"
fi

# stage NAME COMMAND...: run, log to OUT/NAME.log, print wall time and the GPU memory peak while it ran.
stage() {
  local name=$1; shift
  local before start
  before=$(wc -l < "$OUT/gpu-memory.log"); start=$(date +%s)
  if ! "$@" > "$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (see $OUT/$name.log)"; tail -5 "$OUT/$name.log"; exit 1
  fi
  local peak
  peak=$(tail -n +"$((before + 1))" "$OUT/gpu-memory.log" | sort -n | tail -1)
  printf '%-28s %5ds  peak GPU memory %s MiB\n' "$name" "$(( $(date +%s) - start ))" "${peak:-n/a}"
}

report() {  # the training figures fraqat-train measured itself
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('   ', {k: m.get(k) for k in \
('steps','final_loss','seconds_per_batch','peak_gpu_memory_gib')})" "$1/metrics.json"
}

echo "== 1. tiny families on $ACCELERATOR"
for model in $TINY; do
  run="$OUT/tiny/$model"
  stage "train-$model" "$BIN/fraqat-train" model="$model" "${TRAINER[@]}" trainer.max_steps=6 \
    data.num_prompts=16 data.batch_size=4 checkpoint.every_n_steps=3 sample_every_n_steps=3 logger=csv \
    trainer.enable_progress_bar=false hydra.run.dir="$run"
  report "$run"
  [ "$EVAL" = 1 ] && stage "eval-$model" "$BIN/fraqat-eval" ckpt="$run" prompts=offline prompts.count=8 logger=none \
    hydra.run.dir="$run/eval"
  stage "export-$model" "$BIN/fraqat-export" ckpt="$run" format=safetensors
  stage "export-onnx-$model" "$BIN/fraqat-export" ckpt="$run" format=onnx
done

if [ "${GPU_CHECK_FLUX_BLOCK:-1}" = 1 ]; then
  echo "== 3. the 1-GPU FLUX recipe's memory at one real-width block of each kind, $RESOLUTION px: planned/measured"
  FLUX=(--override model.architecture.num_layers=1 model.architecture.num_single_layers=1)
  if [ "$ACCELERATOR" = gpu ]; then FLUX+=(--device cuda); else FLUX+=(model.max_sequence_length=64 --device cpu); fi
  stage flux-block-plan "$BIN/python" benchmarks/plan_accuracy.py --model flux_schnell --options lora-base \
    --resolution "$RESOLUTION" --batch-size 1 "${FLUX[@]}"
  grep "^|" "$OUT/flux-block-plan.log"
fi

if [ "${GPU_CHECK_REAL:-1}" != 1 ]; then
  echo "gpu_check: the tiny stages passed (real-size part skipped: GPU_CHECK_REAL=0); logs and runs in $OUT"; exit 0
fi
echo "== 2. real-size PixArt-Sigma XL-2 (random weights) at $RESOLUTION px on $ACCELERATOR"
model_dir="$OUT/pixart_sigma_random"
[ -d "$model_dir" ] || stage build-pixart-sigma "$BIN/python" scripts/random_real_model.py --model pixart_sigma \
  --out "$model_dir" --dtype bfloat16 ${LAYERS:+--layers "$LAYERS"}
run="$OUT/real/pixart_sigma"
REAL=(model=pixart_sigma model.path="$model_dir" model.resolution="$RESOLUTION" "${TRAINER[@]}"
      trainer.max_steps=20 data=offline data.num_prompts=64 data.batch_size=4 checkpoint.every_n_steps=5
      sample_every_n_steps=10 gradient_checkpointing=true logger=csv trainer.enable_progress_bar=false
      hydra.run.dir="$run" ${GPU_CHECK_REAL_OVERRIDES:-})
# Kill the first attempt (SIGKILL, as a preempted job dies) once its step-10 checkpoint is on disk.
"$BIN/fraqat-train" "${REAL[@]}" > "$OUT/train-real-killed.log" 2>&1 &
job=$!
while kill -0 "$job" 2>/dev/null && [ ! -f "$run/checkpoints/step-000010.ckpt" ]; do sleep 1; done
kill -9 "$job" 2>/dev/null && echo "killed the first run after its step-10 checkpoint" || {
  echo "FAILED: the first real-size run ended before its step-10 checkpoint"; tail -5 "$OUT/train-real-killed.log"; exit 1; }
wait "$job" 2>/dev/null || true
stage train-real-resumed "$BIN/fraqat-train" "${REAL[@]}"
grep -q "resuming from" "$OUT/train-real-resumed.log" || { echo "FAILED: the second run did not resume"; exit 1; }
report "$run"
ls -l "$run/checkpoints" "$run/samples"
[ "$EVAL" = 1 ] && stage eval-real "$BIN/fraqat-eval" ckpt="$run" prompts=offline prompts.count=8 logger=none hydra.run.dir="$run/eval"
stage export-real "$BIN/fraqat-export" ckpt="$run" format=safetensors
[ "$REAL_ONNX" = 1 ] && stage export-onnx-real "$BIN/fraqat-export" ckpt="$run" format=onnx
grep -h "size:\|check against" "$OUT"/export-real.log "$OUT"/export-onnx-real.log 2>/dev/null || true
echo "gpu_check: all stages passed; logs and runs in $OUT"
