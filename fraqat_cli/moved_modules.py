"""Where the package's modules moved when it became layer folders, for configs stored before that.

A checkpoint's record and an export's metadata keep the resolved config, `_target_`s included
(`fraqat_cli.families.SanaFamily`); read back after the move, those names must still resolve. Each stored
`fraqat_cli.<old module>...` string is rewritten to the module's place now, once, where the config is read.
"""

from __future__ import annotations

import importlib.util
import re

LAYERS = {"quant", "models", "data", "train", "export", "evaluate"}

# old top-level module -> its module now (under fraqat_cli.)
MOVED = {
    "architecture": "models.architecture",
    "attention_backends": "train.attention_backends",
    "callbacks": "train.callbacks",
    "checkpointing": "train.checkpointing",
    "clip_score": "evaluate.clip_score",
    "comparison": "evaluate.comparison",
    "conditioning": "data.conditioning",
    "data": "data.sources",
    "deployable": "export.deployable",
    "deployed": "export.deployed",
    "distill": "train.distill",
    "divergence": "train.divergence",
    "embeddings": "models.embeddings",
    "eval_targets": "evaluate.targets",
    "evaluate": "evaluate.command",
    "evaluation": "evaluate.evaluator",
    "export": "export.command",
    "export_example": "export.example_inputs",
    "families": "models.families",
    "fid_features": "evaluate.fid_features",
    "ground_truth": "evaluate.ground_truth",
    "lora": "train.lora",
    "metrics": "evaluate.metrics",
    "models": "models.loading",
    "noise": "models.noise",
    "onnx_export": "export.onnx_graph",
    "onnx_nbits": "export.onnx_nbits",
    "optimizers": "train.optimizers",
    "packed": "export.packed",
    "plan": "train.plan",
    "plan_trace": "train.plan_trace",
    "prompt_sets": "data.prompt_sets",
    "prompts": "data.captions",
    "run_length": "train.run_length",
    "sampling": "models.generation",
    "schedules": "quant.schedules",
    "shapes": "data.shapes",
    "sharding": "train.sharding",
    "student": "train.student",
    "sweep": "train.sweep",
    "tiny_parts": "models.tiny_parts",
    "toy": "models.toy",
    "train": "train.command",
    "validation": "train.validation",
}
_OLD = re.compile(rf"^fraqat_cli\.({'|'.join(sorted(MOVED, key=len, reverse=True))})(?=$|\.)")


def current_name(name: str) -> str:
    """`name` (a dotted path into fraqat_cli) as it resolves now; other strings come back unchanged. A name that
    already points into a layer folder's module is left alone, so the rewrite is safe to repeat."""
    if not name.startswith("fraqat_cli.") or _is_current(name):
        return name
    return _OLD.sub(lambda m: "fraqat_cli." + MOVED[m.group(1)], name)


def _is_current(name: str) -> bool:
    parts = name.split(".")
    if len(parts) < 3 or parts[1] not in LAYERS:
        return False
    return importlib.util.find_spec(".".join(parts[:3])) is not None  # imports only the layer's tiny __init__


def upgrade_stored_config(config):
    """`config` (plain dicts and lists, as stored) with every moved `fraqat_cli` name rewritten."""
    if isinstance(config, dict):
        return {key: upgrade_stored_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [upgrade_stored_config(value) for value in config]
    return current_name(config) if isinstance(config, str) else config
