"""Where QAT starts: how far each weight scale puts the quantized toy teachers' output from the teacher's, before
any training. A cheap first look at the quality levers (no seeds to train; the spread is over input batches).

For each toy family and each (quantizer.scale, granularity) arm: the teacher's transformer with its blocks'
linear layers quantized at W4A8 (standard QAT's first step), its output on `--batches` example batches (offline
captions, noise latents, timesteps over the schedule) against the teacher's own: relative L2 difference per
batch; the table gives the mean and, paired batch by batch, the gap to the `max` per-tensor arm (mean ratio - 1,
95% t interval over the batches). `learned` starts where `mse` does (its initialisation is the MSE search), so
it is not a separate arm here: what learning adds needs training (`scripts/compare_scales.py`).

    python scripts/scale_error_at_start.py --out docs/results/scale_error_at_start.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from paired_seeds import paired_interval

from fraqat_cli.export.example_inputs import example_inputs, relative_difference, student_prediction
from fraqat_cli.models.loading import family_of, load_model
from fraqat_cli.student.build import build_student

CONF = Path(__file__).resolve().parents[1] / "conf"
ARMS = [("max", "per_tensor"), ("mse", "per_tensor"), ("max", "per_channel"), ("mse", "per_channel")]


def quantizer(scale: str, granularity: str):
    base = OmegaConf.load(CONF / "quantizer" / "_base.yaml")
    return OmegaConf.merge(base, {"granularity": granularity, "scale": scale})


def family_errors(model: str, batches: int, batch_size: int, bits: float, cache_dir: str) -> dict[str, list[float]]:
    """Per arm, the relative output difference to the teacher on each example batch."""
    model_cfg = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    pipe = load_model(model_cfg).pipe
    teacher = pipe.transformer.float().eval()
    family = family_of(model_cfg)
    examples = [example_inputs(model_cfg, pipe, OmegaConf.create({"batch_size": batch_size, "seed": seed}),
                               cache_dir) for seed in range(batches)]
    with torch.no_grad():
        expected = [student_prediction(teacher, family, ex) for ex in examples]
        errors = {}
        for scale, granularity in ARMS:
            student, _ = build_student(teacher, quantizer(scale, granularity), None, bits)
            student.eval()
            errors[f"{scale}:{granularity}"] = [relative_difference(student_prediction(student, family, ex), ref)
                                                for ex, ref in zip(examples, expected)]
    return errors


def table(results: dict) -> str:
    lines = ["| family | scale | granularity | output error (mean, min-max) | gap to `max` per_tensor [95% interval] |",
             "|---|---|---|---|---|"]
    for model, errors in results.items():
        base = errors["max:per_tensor"]
        for arm, values in errors.items():
            scale, granularity = arm.split(":")
            ratios = [v / b - 1 for v, b in zip(values, base)]
            mean, _, low, high = paired_interval(ratios)
            gap = "-" if arm == "max:per_tensor" else f"{mean:+.1%} [{low:+.1%}, {high:+.1%}]"
            lines.append(f"| {model} | `{scale}` | {granularity} | {sum(values) / len(values):.4f} "
                         f"({min(values):.4f}-{max(values):.4f}) | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,toy_pixart,toy_flux")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "fraqat"))
    parser.add_argument("--out", type=Path, default=None, help="where to keep the per-batch numbers (JSON)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {m: family_errors(m, args.batches, args.batch_size, args.bits, args.cache_dir)
               for m in args.models.split(",")}
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"command": "python scripts/scale_error_at_start.py --out " + str(args.out),
                                        "bits": args.bits, "batches": args.batches, "batch_size": args.batch_size,
                                        "seconds": round(time.perf_counter() - started, 1),
                                        "relative_output_error": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
