"""Prompt conditioning as the pipelines and transformers take it: dicts of tensors, batch first, keyed as
the pipelines' own arguments (`prompt_embeds`, `pooled_prompt_embeds`, ...), and the pair sampling needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """The conditioning pair a pipeline samples from: `positive` has a row per prompt, `negative` the empty
    negative prompt's single row (classifier-free guidance). Tensors batch first, as the family encodes them."""

    positive: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.positive.values())))

    def rows(self, index) -> Conditioning:
        """Rows `index` (a slice or a list) of the prompts, with the same negative."""
        return Conditioning(select(self.positive, index), self.negative)


def conditioning_of(row: dict) -> dict:
    """A training batch or an export example without its latents and timestep: the conditioning alone."""
    return {k: v for k, v in row.items() if k not in ("latents", "timestep")}


def select(cond: dict, index) -> dict:
    """Rows `index` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}
