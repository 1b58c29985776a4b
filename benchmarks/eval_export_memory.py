"""Peak host memory of `fraqat-eval` and `fraqat-export format=safetensors` on a real-size student.

The model is PixArt-Sigma's real transformer (0.61 B parameters) with random weights, in a pipeline folder
written by `scripts/random_real_model.py` (shrunken T5, narrow VAE). The student checkpoint is written
through `StudentCheckpoint` (the student-only kind, as a step checkpoint is) from a freshly quantized
student, so no real-size training run is needed; `--train` makes it with `fraqat-train` instead (one step,
`last.ckpt`: the resumable kind, optimizer state included; needs about 3x the memory of the eval).

Each command runs as a child process; its peak resident memory is the kernel's high-water mark (VmHWM of
/proc/<pid>/status, read every 20 ms; `wait4`'s ru_maxrss would also count the parent's image from before
the exec), with the peaks of its anonymous and file-backed parts (file-backed: memory-mapped files, the
checkpoint's pages among them). Baseline: a child that imports the same modules and exits. Ratios are to
the transformer's bfloat16 size (2 bytes a parameter).

    python benchmarks/eval_export_memory.py                     # real size: ~10 min on 2 cores, < 6 GB
    python benchmarks/eval_export_memory.py --layers 2          # real width, 2 blocks: a quick rehearsal
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_IMPORTS = (
    "import torch, numpy, PIL, scipy, safetensors.torch, diffusers, transformers, hydra, omegaconf, lightning;"
    "from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel, AutoencoderKL;"
    "from transformers import T5EncoderModel;"
    "import fraqat_cli.evaluate.command, fraqat_cli.evaluate.evaluator, fraqat_cli.evaluate.targets,"
    " fraqat_cli.evaluate.metrics, fraqat_cli.evaluate.fid_features, fraqat_cli.export.command,"
    " fraqat_cli.export.safetensors_file, fraqat_cli.student.rebuild, fraqat_cli.models.loading"
)


def measure(command: list[str], env: dict, cwd: Path) -> dict:
    """Run `command`; its peak RSS, peak anonymous and file-backed RSS (sampled), wall time."""
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    started = time.perf_counter()
    log = open(cwd / f"{Path(command[0]).name}-{int(started)}.log", "w")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    process.wait()
    done.set()
    sampler.join()
    log.close()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log.name}")
    return {"peak": peaks["VmHWM"], "anon": peaks["RssAnon"], "file": peaks["RssFile"],
            "seconds": time.perf_counter() - started}


def write_student_checkpoint(model_dir: Path, path: Path, resolution: int, steps: int) -> int:
    """A 4-bit per-channel student of the folder's transformer, written through StudentCheckpoint; returns
    the transformer's parameter count. The stored config makes eval sample at `resolution` px, `steps` steps."""
    import gc

    from hydra import compose, initialize_config_module

    from fraqat_cli.models.loading import load_pipeline
    from fraqat_cli.student.build import build_student
    from fraqat_cli.student.checkpoint import StudentCheckpoint

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=pixart_sigma", f"model.path={model_dir}", f"model.resolution={resolution}",
            f"model.sampler.num_inference_steps={steps}", "quantizer=per_channel", "logger=none"])
    pipe = load_pipeline(cfg.model, without=("tokenizer", "text_encoder"))
    params = sum(p.numel() for p in pipe.transformer.parameters())
    student, _ = build_student(pipe.transformer, cfg.quantizer, cfg.selection, start_bits=4)
    del pipe
    StudentCheckpoint.of_student(student, cfg, step=0).write(path)
    del student
    gc.collect()
    return params


def train_one_step(model_dir: Path, work: Path, resolution: int, steps: int, env: dict) -> Path:
    """`fraqat-train` one step on the folder's model: its `last.ckpt` holds the optimizer state too."""
    command = [str(Path(sys.executable).parent / "fraqat-train"), "model=pixart_sigma", f"model.path={model_dir}",
               f"model.resolution={resolution}", f"model.sampler.num_inference_steps={steps}",
               "quantizer=per_channel", "schedule=standard", "trainer.max_steps=1", "data.num_prompts=2",
               "data.batch_size=1", "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={work}/run"]
    subprocess.run(command, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    return work / "run" / "checkpoints" / "last.ckpt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fraqat-memory-bench"), help="scratch folder")
    parser.add_argument("--layers", type=int, default=None, help="real width, N blocks (default: all 28)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="sampler steps of the eval")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="checkpoint from one fraqat-train step (resumable)")
    parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)  # the child that writes it
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from fraqat_cli.student.checkpoint import StudentCheckpoint

    args = parse_args(argv)
    if args.write_checkpoint:  # in a child, so that this process stays small
        print(write_student_checkpoint(args.model_dir, args.write_checkpoint, args.resolution, args.steps))
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", FRAQAT_CACHE=str(work / "cache"))
    env.setdefault("OMP_NUM_THREADS", "2")
    bin_dir = Path(sys.executable).parent
    model_dir = work / f"pixart-{args.layers or 'full'}"
    if not model_dir.is_dir():
        layers = ["--layers", str(args.layers)] if args.layers else []
        subprocess.run([sys.executable, str(REPO / "scripts" / "random_real_model.py"), "--model", "pixart_sigma",
                        "--out", str(model_dir), *layers], env=env, check=True)
    if args.train:
        checkpoint = train_one_step(model_dir, work, args.resolution, args.steps, env)
        stored = StudentCheckpoint.read(checkpoint)  # mapped: only the shapes are read
        params = sum(t.numel() for k, t in stored.state.items() if "quantizer" not in k)
        del stored
    else:
        checkpoint = work / f"student-{args.layers or 'full'}.ckpt"
        written = subprocess.run([sys.executable, __file__, "--write-checkpoint", str(checkpoint), "--model-dir",
                                  str(model_dir), "--resolution", str(args.resolution), "--steps", str(args.steps)],
                                 env=env, check=True, capture_output=True, text=True)
        params = int(written.stdout.split()[-1])
    bf16 = 2 * params
    for done in (work / "cache" / "teacher-images", StudentCheckpoint.run_folder(checkpoint) / "eval"):
        shutil.rmtree(done, ignore_errors=True)  # so that the eval samples both models

    runs = {
        "baseline (imports only)": [sys.executable, "-c", BASELINE_IMPORTS],
        f"fraqat-eval ({args.prompts} prompts, {args.steps} steps, {args.resolution} px)": [
            str(bin_dir / "fraqat-eval"), f"ckpt={checkpoint}", "prompts=offline", f"prompts.count={args.prompts}",
            f"batch_size={args.prompts}", "clip.model=null", "logger=none", f"results_csv={work}/results.csv",
            f"hydra.run.dir={work}/eval"],
        "fraqat-export format=safetensors": [
            str(bin_dir / "fraqat-export"), f"ckpt={checkpoint}", "format=safetensors",
            f"out={work}/export/student.safetensors"],
    }
    results = {name: measure(command, env, work) for name, command in runs.items()}
    base = results.pop("baseline (imports only)")
    gib = 2**30
    print(f"\nPixArt-Sigma transformer, {params / 1e9:.3f} B parameters: bf16 {bf16 / gib:.2f} GiB; checkpoint "
          f"{checkpoint.stat().st_size / gib:.2f} GiB ({'resumable' if args.train else 'student-only'}); "
          f"baseline process {base['peak'] / gib:.2f} GiB\n")
    print("| command | peak RSS GiB | above baseline GiB | / bf16 size (target <= 4) | peak anon GiB | "
          "peak file-backed GiB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        above = r["peak"] - base["peak"]
        print(f"| {name} | {r['peak'] / gib:.2f} | {above / gib:.2f} | {above / bf16:.2f} | {r['anon'] / gib:.2f} | "
              f"{r['file'] / gib:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
