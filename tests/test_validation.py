"""The held-out validation loss: which rows are held out, and that its draws are fixed."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from train_support import FAST, fraqat_train, quantizer_preset

from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.student.build import build_student
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.optimizers import adamw
from fraqat_cli.train.validation import HeldOutLoss, held_out_rows, split_rows


class Rows(Dataset):
    def __init__(self, n: int, latents: torch.Tensor | None = None) -> None:
        self.n, self.latents = n, latents

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if self.latents is None:
            return i
        g = torch.Generator().manual_seed(i)
        return {"latents": self.latents[i], "prompt_embeds": torch.randn(16, 32, generator=g),
                "prompt_attention_mask": torch.ones(16, dtype=torch.long)}


@pytest.mark.parametrize("rows,share,expected", [(256, 0.025, 7), (64, 0.025, 2), (8, 0.025, 1), (1, 0.5, 0),
                                                 (10, 0.0, 0), (3, 0.9, 2)])
def test_held_out_share_rounds_up_and_never_takes_every_row(rows, share, expected):
    assert len(held_out_rows(rows, share, seed=0)) == expected


def test_held_out_rows_are_disjoint_from_training_rows_and_the_same_every_time():
    train, held = split_rows(Rows(200), share=0.1, seed=3)
    train_ids, held_ids = [train[i] for i in range(len(train))], [held[i] for i in range(len(held))]
    assert not set(train_ids) & set(held_ids)
    assert sorted(train_ids + held_ids) == list(range(200))
    again = split_rows(Rows(200), share=0.1, seed=3)[1]
    assert [again[i] for i in range(len(again))] == held_ids
    other = split_rows(Rows(200), share=0.1, seed=4)[1]
    assert [other[i] for i in range(len(other))] != held_ids, "the seed picks the rows"


def test_no_share_holds_nothing_out():
    rows = Rows(10)
    assert split_rows(rows, share=0.0, seed=0) == (rows, None)


@pytest.mark.parametrize("share", [-0.1, 1.0, 2])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match=r"validation.share must be in \[0, 1\)"):
        held_out_rows(10, share, seed=0)


class _Trainer:  # what HeldOutLoss.measure reads of the trainer: its precision's forward context
    class precision_plugin:  # noqa: N801
        forward_context = staticmethod(torch.no_grad)


def test_validation_draws_are_fixed_so_the_loss_moves_only_with_the_student():
    model_cfg = OmegaConf.load("conf/model/tiny_sana.yaml")
    pipe = load_pipeline(model_cfg, without=("tokenizer", "text_encoder"))
    student, _ = build_student(pipe.transformer, quantizer_preset("per_channel"), None, 4)
    noise = instantiate(model_cfg.noise).bind(pipe.scheduler.config)
    module = DistillationModule(pipe.transformer, student, instantiate(model_cfg.family), noise,
                                optimizer=partial(adamw, lr=1e-5))
    module.trainer = _Trainer()
    rows = Rows(5, torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    first = HeldOutLoss(rows, every_n_steps=1, batch_size=2, seed=0).measure(module)
    # (the same batching: dynamic per-tensor activation scales depend on which rows share a batch)
    assert first > 0 and HeldOutLoss(rows, every_n_steps=1, batch_size=2, seed=0).measure(module) == first
    assert HeldOutLoss(rows, every_n_steps=1, batch_size=2, seed=1).measure(module) != pytest.approx(first)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert HeldOutLoss(rows, every_n_steps=1, batch_size=2, seed=0).measure(module) != pytest.approx(first)


def test_a_run_writes_its_validation_curve_to_metrics(tmp_path, cache_dir):
    run = tmp_path / "run"
    result = fraqat_train([*FAST, "model=toy", "data.num_prompts=40", "validation.share=0.1",
                           "validation.every_n_steps=2", "trainer.max_steps=5", f"hydra.run.dir={run}"],
                          tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation_rows"] == 4
    assert [step for step, _ in metrics["validation_curve"]] == [2, 4, 5]
    assert metrics["validation_loss"] == metrics["validation_curve"][-1][1] > 0
