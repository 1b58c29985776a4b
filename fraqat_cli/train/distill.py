"""The distillation module: a frozen teacher, its fake-quantized student, an MSE between their outputs.

It wires the pieces and knows nothing of how quantization, schedules or data
work inside. Only the student is a registered submodule, so only the student
is trained, wrapped by DDP/FSDP, and saved in checkpoints; the teacher is
rebuilt from the model config.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fraqat_cli.models.conditioning import conditioning_of
from fraqat_cli.quant import ActivationQuantizer, calibrate_activations
from fraqat_cli.student.checkpoint import stamp_record
from fraqat_cli.train.attention_backends import restricted_attention


class DistillationModule(L.LightningModule):
    """Train `student` to reproduce `teacher` on the same noisy latents, timesteps and prompts.

    family: adapter giving the transformer's keyword arguments (`fraqat_cli.models.families`).
    noise: callable (clean latents, noise) -> (noisy latents, timesteps) (`fraqat_cli.models.noise`).
    optimizer: a factory taking the trainable parameters (`conf/optim`, a Hydra partial).
    trainable: fnmatch patterns over parameter names; the rest of the student stays frozen
    (the paper's selective training).
    feature_loss_weight: > 0 adds an MSE between the outputs of matching transformer blocks.
    record: plain data stored in every checkpoint under "fraqat" (the resolved config).
    calibration_batches: batches that static activation quantizers are calibrated on before the first step.
    attention_backends: the SDPA kernels teacher and student may use (`fraqat_cli.train.attention_backends`);
    None: torch's choice.
    compile_student: called with the student once it is sharded (`fraqat_cli.train.compiled.compile_blocks`,
    bound to its options); None: the student runs eagerly.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        family,
        noise,
        *,
        optimizer,
        trainable=("*",),
        feature_loss_weight: float = 0.0,
        block_pattern: str = "*transformer_blocks.[0-9]*",
        record: dict | None = None,
        calibration_batches: list[dict] | None = None,
        attention_backends=None,
        compile_student=None,
    ) -> None:
        super().__init__()
        self.student = student
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list hides it from nn.Module registration
        self.family, self.noise = family, noise
        self.optimizer_factory = optimizer  # (params) -> Optimizer: conf/optim's partial
        self.feature_loss_weight, self.block_pattern = feature_loss_weight, block_pattern
        self.trainable_params = freeze_all_but(student, trainable)
        self.record = record or {}  # plain containers (resolved config, schedule) saved in checkpoints
        self.calibration_batches = calibration_batches or []  # static activation ranges are measured on these
        self.attention_backends = attention_backends
        self.compile_student = compile_student

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def configure_model(self) -> None:
        """A sharding strategy (`fraqat_cli.train.sharding`) splits the student here; the others need nothing.
        Then the student's blocks are compiled, when asked: around the shards, so their hooks stay eager."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self.student)
        if self.compile_student is not None:
            self.compile_student(self.student)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_train_start(self) -> None:
        """Static activation ranges are measured once, before the first step (after a resume they are
        restored from the checkpoint instead)."""
        if self.calibration_batches and not all(q.calibrated for q in _static_quantizers(self.student)):
            self.calibrate(self.calibration_batches)

    @torch.no_grad()
    def calibrate(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Measure each static activation quantizer's range (mean +- 3 std, the paper's) on `batches`.

        Every rank runs the same batches with the same noise, so the ranges agree; rank 0's are broadcast
        all the same, so that GPU arithmetic cannot leave two ranks with different students.
        """
        generator = torch.Generator().manual_seed(0)
        student_dtype = _dtype_of(self.student)
        with calibrate_activations(self.student):
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                latents, cond = batch["latents"], conditioning_of(batch)
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                noisy, timesteps = self.noise(latents, noise, generator=generator)
                self.student(**self.family.transformer_kwargs(
                    noisy.to(student_dtype), timesteps.to(self.device), _cast(cond, student_dtype)), return_dict=False)
        quantizers = _static_quantizers(self.student)
        ranges = torch.stack([torch.stack([q.range_min, q.range_max]) for q in quantizers]).cpu()  # (layers, 2)
        ranges = self.trainer.strategy.broadcast(ranges) if self._trainer is not None else ranges
        for q, (low, high) in zip(quantizers, ranges):
            q.range_min.fill_(float(low))
            q.range_max.fill_(float(high))

    def distillation_loss(self, batch: dict[str, torch.Tensor], generators=None) -> dict[str, torch.Tensor]:
        """Output MSE (and feature MSE) to the teacher; `generators`, one per row, fix each row's noise and
        timestep (the held-out loss, `fraqat_cli.train.validation`), else they are drawn afresh."""
        latents, cond = batch["latents"], conditioning_of(batch)
        noisy, timesteps = self._noised(latents, generators)
        # Each model sees its inputs in its own parameters' dtype (cached conditioning is stored in the text
        # encoders' dtype, e.g. bf16, while the student keeps float32 master weights); autocast, when on,
        # then chooses the compute dtype.
        teacher_dtype, student_dtype = _dtype_of(self.teacher), _dtype_of(self.student)
        with restricted_attention(self.attention_backends):
            return self._losses(noisy, timesteps, cond, teacher_dtype, student_dtype)

    def _losses(self, noisy, timesteps, cond, teacher_dtype, student_dtype) -> dict[str, torch.Tensor]:
        with torch.no_grad(), _block_outputs(self.teacher, self.block_pattern, self.feature_loss_weight > 0) as t_feats:
            target = self.teacher(**self.family.transformer_kwargs(
                noisy.to(teacher_dtype), timesteps, _cast(cond, teacher_dtype)), return_dict=False)[0]
        with _block_outputs(self.student, self.block_pattern, self.feature_loss_weight > 0) as s_feats:
            prediction = self.student(**self.family.transformer_kwargs(
                noisy.to(student_dtype), timesteps, _cast(cond, student_dtype)), return_dict=False)[0]
        losses = {"output_loss": F.mse_loss(prediction.float(), target.float())}
        if self.feature_loss_weight > 0:
            losses["feature_loss"] = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(s_feats, t_feats)) / len(
                s_feats
            )
            losses["loss"] = losses["output_loss"] + self.feature_loss_weight * losses["feature_loss"]
        else:
            losses["loss"] = losses["output_loss"]
        return losses

    def _noised(self, latents: torch.Tensor, generators) -> tuple[torch.Tensor, torch.Tensor]:
        if generators is None:
            return self.noise(latents, torch.randn_like(latents))
        rows = [self.noise(latents[i:i + 1], torch.randn(latents[i:i + 1].shape, generator=g).to(latents), generator=g)
                for i, g in enumerate(generators)]
        return torch.cat([noisy for noisy, _ in rows]), torch.cat([t for _, t in rows])

    def training_step(self, batch, batch_idx):
        losses = self.distillation_loss(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()},
            prog_bar=True,
            batch_size=len(batch["latents"]),
            sync_dist=self.trainer.world_size > 1,
        )
        return losses["loss"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep what `fraqat-eval` needs to rebuild the model from the checkpoint alone (bits: in the buffers)."""
        stamp_record(checkpoint, self.record)

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])


def _static_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.static]


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype`; masks and ids keep theirs."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def freeze_all_but(model: nn.Module, patterns) -> int:
    """Leave gradients on only for parameters whose names match a pattern; returns how many remain."""
    patterns = tuple(patterns)
    names = [name for name, _ in model.named_parameters()]
    if not any(fnmatchcase(name, p) for name in names for p in patterns):
        raise ValueError(
            f"trainable patterns {list(patterns)} match no parameter of {type(model).__name__}; "
            f"allowed: fnmatch patterns over names such as {', '.join(names[:4])}"
        )
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatchcase(name, p) for p in patterns))
        count += param.numel() if param.requires_grad else 0
    return count


class _block_outputs:
    """Collect the first tensor output of every block matching `pattern` during one forward pass."""

    def __init__(self, model: nn.Module, pattern: str, enabled: bool) -> None:
        self.blocks = [m for n, m in model.named_modules() if enabled and fnmatchcase(n, pattern) and n.count(".") == 1]
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def _hook(self, module, args, output):
        self.outputs.append(output[-1] if isinstance(output, tuple) else output)

    def __enter__(self) -> list[torch.Tensor]:
        self.handles = [b.register_forward_hook(self._hook) for b in self.blocks]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
