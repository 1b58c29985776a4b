"""One training step of a config, traced without memory: torch's fake tensors, FLOP counter and memory tracker.

The teacher and the student are built as `fraqat-train` builds them (`train.distillation_module`: quantized
layers, the trainable setting, the optimizer of `conf/optim`, gradient checkpointing), on the meta device,
then given fake storage: every shape, dtype and allocation is real, no byte is. One optimizer step is run as
Lightning runs it (teacher forward, student forward under the configured autocast, backward, optimizer step)
inside `FakeTensorMode`, `FlopCounterMode` and torch's `MemTracker`, so activations, gradients, optimizer state
and FLOPs come from the code that trains, not from a formula per model. The inputs have the shapes the
training loader gives: conditioning from the family's own prompt encoding and latents from its own VAE, run
once on the model's small stand-in parts (`components`, or `rehearsal` for the real models).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from fraqat_cli.models.architecture import block_classes, build_transformer, count_parameters
from fraqat_cli.models.conditioning import conditioning_of
from fraqat_cli.models.loading import LoadedModel, family_of, load_pipeline, model_dtype
from fraqat_cli.train.assembly import TrainingData, distillation_module
from fraqat_cli.train.rng_state import TrainingOrder

TOTAL = "Total"  # MemTracker's key for a device's sum


class PeakTracker(MemTracker):
    """torch's MemTracker with its device-wide peak only. MemTracker also keeps a peak per module, updated on
    every operation for every module seen (operations x modules: minutes for a 28-block model); the plan
    needs the device's peak and its breakdown, which this keeps exactly as MemTracker does."""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[TOTAL]:
                self._peak_mem[device] = snap[TOTAL]
                self._peak_mem_snap[device] = dict(snap)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        """MemTracker hooks every parameter of a module it sees for its gradient, and torch refuses a hook on
        a frozen one (the teacher, a partly trained student): frozen parameters count as hooked already."""
        for param in module.parameters():
            if not param.requires_grad:
                self._param_to_grad_hook_handles.setdefault(param, (_NO_HOOK, _NO_HOOK))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: each gradient it computes (input, weight) costs what the forward costs.
    torch's own formula counts the weight gradient of a grouped convolution as if it were dense, `groups`
    times too much: 32x the forward for Sana's depthwise 3x3 convolutions (5,760 groups)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}


class TotalFlops(FlopCounterMode):
    """torch's FLOP counter, totals only, with `FLOP_FORMULAS`. Its per-module breakdown hooks every module's
    inputs and outputs for the backward pass, and those hooks keep activations alive that training frees
    (gigabytes under gradient checkpointing), which would corrupt the memory traced in the same pass."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=FLOP_FORMULAS)
        self.mod_tracker = _GlobalOnly()


class _GlobalOnly:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class StepFakeMode(FakeTensorMode):
    """torch's fake-tensor mode, asking once whether a device could be initialised. torch asks on every
    operation (`avoid_device_init`), and under Lightning's NVML-based CUDA check (`lightning.fabric` sets
    `PYTORCH_NVML_BASED_CUDA_CHECK=1` at import) each ask loads the NVML library: 7,600 loads in one FLUX twin's
    trace, a fifth of its time. The answer cannot change during a trace."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._avoid_device_init = super().avoid_device_init

    @property
    def avoid_device_init(self) -> bool:
        return self._avoid_device_init


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


@dataclass(frozen=True)
class StepTrace:
    """What one optimizer step of one device holds and computes, for the whole (unsharded) student.

    Bytes are those of the traced device; `peak_breakdown` is MemTracker's categories at the peak
    (Parameter, Buffer, Gradient, Activation, Temp, Optstate).
    """

    teacher_params: int
    student_params: int
    trainable_params: int
    teacher_bytes: int  # weights and buffers
    student_bytes: int  # float32 master weights, quantizer and LoRA state, buffers
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_tensors: int
    peak_bytes: int
    peak_breakdown: dict
    flops: int  # forward of teacher and student, backward (recomputation included), one micro-batch
    largest_block_bytes: int  # the biggest block's student parameters: what FSDP gathers at a time
    outside_blocks_bytes: int  # student parameters outside the blocks (FSDP's root unit)
    student_state_bytes: int  # the student's state dict, as a student-only checkpoint holds it
    student_state_tensors: int
    cond_row_bytes: int  # one row of the conditioning cache
    latent_row_bytes: int  # one row of the latent cache

    @property
    def activation_bytes(self) -> int:
        """Activations and temporaries at the peak: what the step adds to the states it keeps."""
        return self.peak_breakdown.get("Activation", 0) + self.peak_breakdown.get("Temp", 0)


def autocast_dtype(precision) -> torch.dtype | None:
    """The compute dtype Lightning's precision plugin autocasts to, None for full precision."""
    precision = str(precision)
    if precision.endswith("-mixed"):
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    if precision.startswith(("32", "64")):
        return None
    raise ValueError(f"trainer.precision={precision!r} cannot be planned; allowed: 32-true, bf16-mixed, 16-mixed")


def _stand_in_parts(model_cfg: DictConfig) -> dict:
    """The config's small parts with the real output widths: `components` (tiny twins, toy) or `rehearsal`
    (the real models; no download)."""
    parts = model_cfg.get("components") or model_cfg.get("rehearsal")
    if not parts:
        raise ValueError(f"model {model_cfg.name!r} has neither components nor rehearsal parts; the plan needs "
                         f"one of them to know the shapes of its conditioning and latents")
    return OmegaConf.to_container(parts)


def stand_in_pipeline(model_cfg: DictConfig):
    """The family's pipeline without its transformer, built from `_stand_in_parts`."""
    stand_in = OmegaConf.merge(model_cfg, {"components": None})
    with open_dict(stand_in):
        stand_in.components = {**_stand_in_parts(model_cfg), "transformer": None}
    return load_pipeline(stand_in, without=("transformer",))


@torch.no_grad()
def example_row(model_cfg: DictConfig) -> dict[str, torch.Tensor]:
    """One training row as the loader gives it (batch dimension 1): the cached conditioning of a prompt, in
    the text encoders' dtype, and float32 clean latents of an image at the model's resolution, from the
    family's own prompt encoding and VAE on the stand-in parts (the VAE on fake tensors: its shape alone)."""
    family, pipe = family_of(model_cfg), stand_in_pipeline(model_cfg)
    cond = family.encode_prompts(pipe, ["a red circle"], model_cfg.max_sequence_length, device="cpu")
    with StepFakeMode(allow_non_fake_inputs=True):  # only the shape counts: a full-resolution VAE on the
        image = torch.zeros(1, 3, model_cfg.resolution, model_cfg.resolution)  # CPU in bf16 takes minutes
        latents = family.image_latents(pipe, image)  # (1, C, R/f, R/f)
    return {**{k: v.cpu() for k, v in cond.items()}, "latents": torch.zeros(latents.shape)}


def _row_bytes(row: dict[str, torch.Tensor], keys) -> int:
    return sum(row[k].numel() * row[k].element_size() for k in keys)


def stand_in_data(cfg: DictConfig, teacher: nn.Module, batch_size: int):
    """What `train.distillation_module` reads of the training data, `teacher` as the pipeline's transformer and
    the training noise bound to the stand-in parts' scheduler (the real one's settings)."""

    scheduler = instantiate(_stand_in_parts(cfg.model)["scheduler"])
    noise = instantiate(cfg.model.noise)
    noise.bind(scheduler.config)
    model = LoadedModel(SimpleNamespace(transformer=teacher), family_of(cfg.model), cfg.model)
    return TrainingData(model, noise, [], batch_size, 0, None, TrainingOrder(0, cfg.seed))


def _state_bytes(module: nn.Module) -> tuple[int, int]:
    """Bytes and count of the tensors in `module`'s state dict, each storage once (meta tensors: by identity)."""
    seen = {}
    for tensor in module.state_dict().values():
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values()), len(seen)


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _first_optimizer(configured):
    """The optimizer out of whatever `configure_optimizers` returns (an optimizer, a list, a dict)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise ValueError(f"configure_optimizers returned {type(configured).__name__}; the plan needs one optimizer")


def _warm_up_optimizer(optim_cfg: DictConfig) -> None:
    """One real step of the configured optimizer on a small real parameter: tables an optimizer builds from
    values on first use (8-bit quantization maps) cannot be computed from fake tensors, and are cached."""
    param = nn.Parameter(torch.zeros(2, 8192))  # large enough for block-quantized state
    param.grad = torch.zeros_like(param)
    with torch.compiler.set_stance("force_eager"):
        instantiate(optim_cfg)([param]).step()


def _block_bytes(student: nn.Module, blocks) -> tuple[list[int], int]:
    """Bytes of each block of the student's `blocks` classes (FSDP's units), and of the parameters outside them."""
    block_bytes = [_param_bytes(m.parameters()) for m in student.modules() if isinstance(m, blocks)]
    inside = {id(p) for m in student.modules() if isinstance(m, blocks) for p in m.parameters()}
    return block_bytes, _param_bytes(p for p in student.parameters() if id(p) not in inside)


def _fake_step_inputs(module, teacher: nn.Module, row: dict, batch_size: int, accumulating: bool):
    """Inside a fake-tensor mode: the models given storage, a batch of `batch_size` rows, and the optimizer with
    its state (and, `accumulating`, the gradients) already there, as every step after the first finds them."""
    teacher.to_empty(device="cpu")
    module.student.to_empty(device="cpu")
    batch = {k: torch.empty((batch_size, *v.shape[1:]), dtype=v.dtype) for k, v in row.items()}
    if "prompt_attention_mask" in batch:
        batch["prompt_attention_mask"] = torch.ones_like(batch["prompt_attention_mask"])
    optimizer = _first_optimizer(module.configure_optimizers())
    for p in module.student.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    _create_state(optimizer)
    optimizer.zero_grad(set_to_none=not accumulating)
    return batch, optimizer


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """What a first step on zero gradients leaves in the optimizer: every parameter's state. Parameters of one
    group, shape and dtype get states alike, so the step runs on one of each and the others get copies of its
    state (`_copied`): on fake tensors the 8-bit AdamW step costs milliseconds a parameter, and LoRA gives a FLUX
    twin hundreds of them."""
    originals = [group["params"] for group in optimizer.param_groups]
    first_of, copies = {}, []
    for index, group in enumerate(optimizer.param_groups):
        stepped = []
        for p in group["params"]:
            key = (index, tuple(p.shape), p.dtype, p.grad is not None)
            if key in first_of:
                copies.append((p, first_of[key]))
            else:
                first_of[key] = p
                stepped.append(p)
        group["params"] = stepped
    try:
        optimizer.step()
    finally:
        for group, params in zip(optimizer.param_groups, originals):
            group["params"] = params
    for p, source in copies:
        if source in optimizer.state:
            optimizer.state[p] = {key: _copied(value) for key, value in optimizer.state[source].items()}


def _copied(value):
    """A copy with storage of its own: a tensor cloned; a wrapper subclass (torchao's 8-bit state: codes, scales
    and map) rebuilt around clones of its inner tensors, since its own copies may share them."""
    if not isinstance(value, torch.Tensor):
        return copy.copy(value)
    if is_traceable_wrapper_subclass(value):
        names, meta = value.__tensor_flatten__()
        inner = {name: _copied(getattr(value, name)) for name in names}
        return type(value).__tensor_unflatten__(inner, meta, value.size(), value.stride())
    return value.clone()


def _module_to_trace(cfg: DictConfig, teacher: nn.Module, batch_size: int):
    """fraqat-train's own distillation module around `teacher`, built quietly; static activation ranges are
    measured on data and hold no memory of their own in the step, so they are left out."""

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.quantizer.static_activations = False
    with contextlib.redirect_stdout(io.StringIO()):  # the module's build report is fraqat-train's to print
        module, _ = distillation_module(cfg, stand_in_data(cfg, teacher, batch_size), instantiate(cfg.schedule))
    return module


def trace_step(cfg: DictConfig, batch_size: int, accumulating: bool, row: dict | None = None) -> StepTrace:
    """Trace one micro-batch of `cfg`'s run on one device with the whole student (forward and backward of
    `batch_size` rows), then the optimizer step (the optimizer is the same on CUDA: no fused kernel).

    The optimizer's state exists before the traced step (one step on zero gradients creates it), as in every
    step but the first; `accumulating`: the gradients exist too, as in every micro-batch but the first.
    `row`: one training row (`example_row`), when it was computed elsewhere.
    """
    row = row if row is not None else example_row(cfg.model)
    teacher = build_transformer(cfg.model, device="meta", dtype=model_dtype(cfg.model))
    module = _module_to_trace(cfg, teacher, batch_size)
    student = module.student
    block_bytes, outside = _block_bytes(student, block_classes(cfg.model))
    state_bytes, state_tensors = _state_bytes(student)
    counts = (count_parameters(teacher), count_parameters(student),
              sum(p.numel() for p in student.parameters() if p.requires_grad))

    _warm_up_optimizer(cfg.optim)
    # A compiled kernel (torchao's 8-bit AdamW update) would run real code on fake storage: compiled functions
    # run eagerly in the trace, their memory that of the eager ops, one parameter at a time.
    eager = torch.compiler.set_stance("force_eager")
    mode = StepFakeMode(allow_non_fake_inputs=True)
    with eager, mode:
        batch, optimizer = _fake_step_inputs(module, teacher, row, batch_size, accumulating)

    compute = autocast_dtype(cfg.trainer.precision)
    tracker = PeakTracker()
    tracker.track_external(student, teacher, optimizer, *batch.values())
    counter = TotalFlops()
    with eager, mode, tracker, counter, warnings.catch_warnings():
        # The CPU trace feeds bf16 activations to the student's float32 norm weights, and torch notes that its
        # fused CPU norm kernel cannot take the two ("Mismatch dtype between input and weight"): about the speed
        # of a trace that measures memory, not about the run.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        with torch.autocast("cpu", dtype=compute or torch.bfloat16, enabled=compute is not None):
            loss = module.distillation_loss(batch)["loss"]
        loss.backward()
        del loss
        after_backward = tracker.get_tracker_snapshot("current")
        optimizer.step()
        after_step = tracker.get_tracker_snapshot("current")
    peak = tracker.get_tracker_snapshot("peak")
    device = next(iter(peak))
    opt_states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return StepTrace(
        teacher_params=counts[0], student_params=counts[1], trainable_params=counts[2],
        teacher_bytes=_param_bytes(teacher.parameters()) + _param_bytes(teacher.buffers()),
        student_bytes=_param_bytes(student.parameters()) + _param_bytes(student.buffers()),
        gradient_bytes=after_backward[device].get("Gradient", 0),
        optimizer_bytes=after_step[device].get("Optstate", 0), optimizer_tensors=len(opt_states),
        peak_bytes=peak[device][TOTAL], peak_breakdown={str(k.value if hasattr(k, "value") else k): v
                                                         for k, v in peak[device].items()},
        flops=counter.get_total_flops(),
        largest_block_bytes=max(block_bytes, default=0), outside_blocks_bytes=outside,
        student_state_bytes=state_bytes, student_state_tensors=state_tensors,
        cond_row_bytes=_row_bytes(row, conditioning_of(row)),
        latent_row_bytes=_row_bytes(row, ["latents"]),
    )
