"""How many parameters low-rank QAT trains on the real models, against full QAT of the transformer blocks.

Each real transformer is built on the meta device (no memory, `fraqat_cli.models.architecture`), quantized as the
paper's recipes do (every linear layer, per-tensor), then given a LoRA update of each rank in every quantized
layer (`fraqat_cli.student.lora.add_lora`). Prints trained parameters and their share; the memory they cost under each
optimizer is `fraqat-plan`'s to say.

    python benchmarks/lora_params.py
    python benchmarks/lora_params.py --models sana --ranks 4,16   # a subset
"""

from __future__ import annotations

import argparse
import copy
from fnmatch import fnmatchcase
from pathlib import Path

from hydra import compose, initialize_config_module

from fraqat_cli.models.architecture import build_transformer
from fraqat_cli.student.build import quantize_student
from fraqat_cli.student.lora import add_lora

CONF = Path(__file__).resolve().parents[1] / "conf"


def counts(model_name: str, ranks: list[int]) -> list[str]:
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):  # as fraqat-train composes
        cfg = compose(config_name="train", overrides=[f"model={model_name}", "quantizer=per_tensor",
                                                      "selection=all_linear", "trainable=transformer_blocks"])
    model_cfg, quantizer, selection, blocks = cfg.model, cfg.quantizer, cfg.selection, cfg.trainable.patterns
    student = build_transformer(model_cfg)  # meta device
    quantize_student(student, quantizer, selection, 4)
    total = sum(p.numel() for p in student.parameters())
    full = sum(p.numel() for n, p in student.named_parameters() if any(fnmatchcase(n, b) for b in blocks))
    rows = [f"| {model_name} | {total / 1e9:.3f} B | full QAT (transformer blocks) | {full / 1e6:,.1f} M | "
            f"{full / total:.1%} |"]
    for rank in ranks:
        summary = add_lora(copy.deepcopy(student), rank, rank)
        rows.append(f"| {model_name} | {total / 1e9:.3f} B | LoRA rank {rank} ({summary.layers} layers) | "
                    f"{summary.trainable_params / 1e6:,.1f} M | {summary.trainable_params / total:.2%} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sana,pixart_sigma,sd35_medium,flux_schnell")
    parser.add_argument("--ranks", default="16,32")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print("| model | parameters | trained | trained parameters | share |\n|---|---|---|---|---|")
    for name in args.models.split(","):
        print("\n".join(counts(name, ranks)), flush=True)


if __name__ == "__main__":
    main()
