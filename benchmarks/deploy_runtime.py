"""Is the deployed 4-bit model really smaller and faster in memory than its teacher? One denoiser step, batch 1, CPU.

Per model it compares (a) the PyTorch float32 teacher, (b) the same teacher as a float32 ONNX graph in
onnxruntime, (c) the fake-quantized PyTorch student (as trained: W4 per-channel, A8, every linear layer and
1x1 convolution) and (d) the packed 4-bit runtime: the student exported with `format=onnx_nbits`
(onnxruntime MatMulNBits, int8 compute). It prints
- latency: the median over `--reps` rounds, each round running a, b, c, d once in turn (interleaved, so a
  busy machine slows all four alike), and each variant's ratio to (b);
- resident weight memory: the bytes of tensors the module or session holds (parameters and buffers; graph
  initializers), and the peak RSS growth of a fresh process that builds the variant and runs one step.
Then a single layer, MatMulNBits against an fp32 MatMul on the same tokens, over widths: the crossover.

Then the runtimes users run (`--section diffusers`): the same transformer in diffusers' own loaders, each in
the same process, against the bfloat16 teacher folder (what the real models ship): (e) the bf16 teacher,
(f) `fraqat-export format=diffusers`'s torchao folder (`from_pretrained`, IntxUnpackedToInt8Tensor weights, bf16
compute) and (g) `format=gguf` (`from_single_file`, GGUFLinear, bf16 compute): one denoiser step (median over
`--reps` interleaved rounds), and from fresh processes that import nothing of fraqat, load time, the weights'
bytes in memory and the peak RSS growth of loading plus one step.

    python benchmarks/deploy_runtime.py           # toy, 7 M PixArt, a width-1024 PixArt, layer sweep, diffusers
    python benchmarks/deploy_runtime.py --smoke   # a tiny PixArt and a tiny FLUX, 3 reps, seconds
    python benchmarks/deploy_runtime.py --section diffusers   # the diffusers runtimes only (toy, a 512-wide FLUX)
    python benchmarks/deploy_runtime.py --section diffusers --model pixart_sigma --layers 28 --resolution 512 \
        --device cuda --compile     # a conf/model preset at its real width (random weights), on a GPU, and the
                                    # torchao folder again under torch.compile (scripts/gpu_check.sh)

With `--model` the transformer is the preset's real architecture (`architecture:`, random weights, `--layers`
blocks of each kind); PixArt has no GGUF loader in diffusers (`format=gguf` refuses it), so its rows have no (g):
measure GGUF on `--model flux_schnell` or `sd35_medium`. On `--device cuda` memory is the peak of
`torch.cuda.max_memory_allocated` over loading plus one step, and times are synchronized.

Targets (issue 13): (d)'s resident weights at most 0.35x (b)'s; at width >= 1024, (d)'s latency at most 0.7x (b)'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("a: torch fp32 teacher", "b: onnx fp32 teacher", "c: torch fake-quant student", "d: onnx 4-bit packed")


def build(name: str, width: int, layers: int):
    """(transformer, family, example inputs) for the toy or a seeded random PixArt of `width` x `layers`."""
    from diffusers import PixArtTransformer2DModel

    from fraqat_cli.models.families import PixArtFamily, SanaFamily

    torch.manual_seed(0)
    if name == "toy":
        from fraqat_cli.models.toy import toy_transformer

        model, family, tokens, channels = toy_transformer(), SanaFamily(), 32, 384
        latents = torch.randn(1, 4, 16, 16)
    else:
        heads = width // 64
        model = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=layers,
            cross_attention_dim=width, sample_size=16, patch_size=2, caption_channels=width)
        family, tokens, channels = PixArtFamily(), 32, width
        latents = torch.randn(1, 4, 16, 16)
    example = {"latents": latents, "timestep": torch.tensor([500.0]),
               "prompt_embeds": torch.randn(1, tokens, channels), "prompt_attention_mask": torch.ones(1, tokens)}
    return model.eval(), family, example


def student_of(model):
    from fraqat_cli.quant import QuantConfig, QuantSpec, quantize_model

    quantize_model(model, QuantConfig(weight=QuantSpec("per_channel"), weight_bits=4, include=("*",),
                                      layers=("linear", "pointwise_conv")))
    return model.eval()


def torch_step(model, family, example):
    from fraqat_cli.export.example_inputs import student_prediction

    with torch.no_grad():
        return student_prediction(model, family, example)


def module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one core each, as the torch side (torch.set_num_threads(1))
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_graphs(name: str, width: int, layers: int, folder: Path) -> tuple[Path, Path]:
    import onnx

    from fraqat_cli.export.onnx_graph import DenoiserGraph, _squeeze_dim
    from fraqat_cli.export.onnx_nbits import export_nbits
    from fraqat_cli.models.conditioning import conditioning_of

    model, family, example = build(name, width, layers)
    wrapper = DenoiserGraph(model, family, list(conditioning_of(example))).eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, tuple(example.values()), dynamo=True, opset_version=21,
                                    input_names=list(example), output_names=["prediction"], verbose=False,
                                    custom_translation_table={torch.ops.aten.squeeze.dim: _squeeze_dim})
    fp32, nbits = folder / f"{name}-fp32.onnx", folder / f"{name}-nbits.onnx"
    onnx.save(program.model_proto, str(fp32))
    export_nbits(student_of(model), family, example, nbits, {})
    return fp32, nbits


def feeds(example) -> dict:
    return {k: v.numpy() for k, v in example.items()}


def peak_rss_growth(variant: int, name: str, width: int, layers: int, graph: Path | None) -> float:
    """MiB: peak RSS of a fresh process after building `variant` and one step, minus its RSS before."""
    command = [sys.executable, __file__, "--child", str(variant), name, str(width), str(layers), str(graph or "")]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def child(variant: int, name: str, width: int, layers: int, graph: str) -> None:
    import diffusers  # noqa: F401  imported before the baseline: only the variant itself is measured
    import onnxruntime  # noqa: F401
    import psutil

    import fraqat_cli.models.families  # noqa: F401
    import fraqat_cli.quant  # noqa: F401

    torch.set_num_threads(1)
    example = build_inputs(name, width)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the RSS now
    before = psutil.Process().memory_info().rss
    if variant in (0, 2):
        model, family, example = build(name, width, layers)
        torch_step(student_of(model) if variant == 2 else model, family, example)
    else:
        session(Path(graph)).run(None, feeds(example))
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024  # KiB
    print(json.dumps({"mib": (peak - before) / 2**20}))


def build_inputs(name: str, width: int) -> dict:
    torch.manual_seed(0)
    tokens, channels = 32, (384 if name == "toy" else width)
    return {"latents": torch.randn(1, 4, 16, 16), "timestep": torch.tensor([500.0]),
            "prompt_embeds": torch.randn(1, tokens, channels), "prompt_attention_mask": torch.ones(1, tokens)}


def compare_model(name: str, width: int, layers: int, reps: int, folder: Path) -> None:
    from fraqat_cli.export.onnx_nbits import weight_bytes

    fp32_graph, nbits_graph = write_graphs(name, width, layers, folder)
    teacher, family, example = build(name, width, layers)
    student = student_of(copy.deepcopy(teacher))
    sessions = {1: session(fp32_graph), 3: session(nbits_graph)}
    run = {0: lambda: torch_step(teacher, family, example), 2: lambda: torch_step(student, family, example),
           1: lambda: sessions[1].run(None, feeds(example)), 3: lambda: sessions[3].run(None, feeds(example))}
    for step in run.values():  # warm-up: first calls allocate and prepack
        step()
    times = {v: [] for v in run}
    for _ in range(reps):
        for v, step in run.items():
            start = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - start)
    weights = {0: module_bytes(teacher), 2: module_bytes(student), 1: weight_bytes(fp32_graph),
               3: weight_bytes(nbits_graph)}
    rss = {v: peak_rss_growth(v, name, width, layers, {1: fp32_graph, 3: nbits_graph}.get(v)) for v in run}
    params = sum(p.numel() for p in teacher.parameters())
    reference = torch_step(teacher, family, example)
    deployed = torch.from_numpy(sessions[3].run(None, feeds(example))[0])
    gap = float((deployed - reference).norm() / reference.norm())
    print(f"\n{name}: {params / 1e6:.2f} M parameters, width {width if name != 'toy' else 128}; "
          f"(d) vs (a) relative output difference {gap:.3f}")
    print("| variant | latency ms (median) | IQR ms | of (b) | weight MiB | of (b) | peak RSS growth MiB | of (b) |")
    print("|---|---|---|---|---|---|---|---|")
    median = {v: statistics.median(t) for v, t in times.items()}
    for v in sorted(run):
        q1, q3 = np.percentile(times[v], [25, 75])
        print(f"| {VARIANTS[v]} | {median[v] * 1e3:.2f} | {(q3 - q1) * 1e3:.2f} | {median[v] / median[1]:.2f} | "
              f"{weights[v] / 2**20:.2f} | {weights[v] / weights[1]:.2f} | {rss[v]:.1f} | {rss[v] / rss[1]:.2f} |",
              flush=True)


def layer_sweep(widths: list[int], tokens: int, reps: int, folder: Path) -> None:
    """One feed-forward layer (width -> 4 x width, a DiT MLP's first, W4 per-channel, A8) as MatMulNBits
    against an fp32 MatMul, on the tokens of one 256x256-latent-patch image."""
    from torch import nn

    from fraqat_cli.export.onnx_nbits import NBitsLayer
    from fraqat_cli.quant import QuantConfig, QuantSpec, quantize_model

    print(f"\nOne feed-forward layer (width -> 4 x width), {tokens} tokens: MatMulNBits (block 128, int8 compute) "
          f"time / fp32 MatMul time")
    print("| width | fp32 ms | 4-bit ms | ratio |")
    print("|---|---|---|---|")
    for width in widths:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(width, 4 * width))
        quantized = copy.deepcopy(plain)
        quantize_model(quantized, QuantConfig(weight=QuantSpec("per_channel"), weight_bits=4, include=("*",)))
        x = torch.randn(1, tokens, width)
        paths = {}
        for kind, module in (("fp32", plain), ("nbits", NBitsLayer(quantized[0], "0"))):
            paths[kind] = folder / f"layer-{kind}-{width}.onnx"
            torch.onnx.export(module.eval(), (x,), str(paths[kind]), dynamo=True, opset_version=21,
                              input_names=["x"], verbose=False)
        sessions = {kind: session(p) for kind, p in paths.items()}
        times = {kind: [] for kind in sessions}
        for s in sessions.values():
            s.run(None, {"x": x.numpy()})
        for _ in range(reps):
            for kind, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"x": x.numpy()})
                times[kind].append(time.perf_counter() - start)
        fp32, nbits = statistics.median(times["fp32"]), statistics.median(times["nbits"])
        print(f"| {width} | {fp32 * 1e3:.3f} | {nbits * 1e3:.3f} | {nbits / fp32:.2f} |", flush=True)


# --- the runtimes users run: diffusers' own loaders -------------------------------------------------------------

DIFFUSERS_VARIANTS = {"bf16": "e: diffusers bf16 teacher", "torchao": "f: torchao folder (format=diffusers)",
                      "torchao-compiled": "f+: torchao folder, torch.compile", "gguf": "g: GGUF (format=gguf)"}


def preset_model(name: str, layers: int, resolution: int):
    """(transformer, family, example) for `conf/model/<name>.yaml`'s real architecture with `layers` blocks of
    each kind (random weights, float32), batch 1 at `resolution` px with the preset's prompt length."""
    from importlib import resources

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fraqat_cli.models.architecture import build_transformer

    cfg = OmegaConf.load(resources.files("fraqat_cli.conf") / "model" / f"{name}.yaml")
    if not cfg.get("architecture"):
        raise ValueError(f"--model {name!r} has no real architecture; allowed: pixart_sigma, flux_schnell, sd35_medium")
    model = build_transformer(cfg, device="cpu", dtype=torch.float32, layers=layers)
    arch, side, tokens = cfg.architecture, resolution // 8, cfg.max_sequence_length  # VAEs downsample 8x
    torch.manual_seed(0)
    if "caption_channels" in arch:  # PixArt: T5 embeddings and their mask
        latents = torch.randn(1, arch.in_channels, side, side)
        cond = {"prompt_embeds": torch.randn(1, tokens, arch.caption_channels),
                "prompt_attention_mask": torch.ones(1, tokens)}
    else:  # FLUX (16 latent channels packed 2x2 into in_channels) and SD3: embeddings and a pooled vector
        channels = arch.in_channels // 4 if arch.get("patch_size", 2) == 1 else arch.in_channels
        latents = torch.randn(1, channels, side, side)
        cond = {"prompt_embeds": torch.randn(1, tokens, arch.joint_attention_dim),
                "pooled_prompt_embeds": torch.randn(1, arch.pooled_projection_dim)}
    example = {"latents": latents, "timestep": torch.tensor([500.0]), **cond}
    return model.eval(), instantiate(cfg.family), example


def has_gguf_loader(model) -> bool:
    from fraqat_cli.export.gguf import ARCHITECTURES

    return type(model).__name__ in ARCHITECTURES


def diffusers_model(name: str, width: int, layers: int):
    """(transformer, family, example) for the toy or a seeded random FLUX of `width` (heads of 64; `layers`
    double-stream and twice as many single-stream blocks), with latents the size the toy's are."""
    from diffusers import FluxTransformer2DModel

    from fraqat_cli.models.families import FluxFamily

    torch.manual_seed(0)
    if name == "toy":
        model, family, example = build(name, width, layers)
        return model, family, {"latents": example["latents"], "timestep": example["timestep"],
                               "prompt_embeds": example["prompt_embeds"],
                               "prompt_attention_mask": example["prompt_attention_mask"]}
    heads = max(width // 64, 1)
    head_dim = width // heads
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                                   attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=width,
                                   pooled_projection_dim=width, axes_dims_rope=rope)
    example = {"latents": torch.randn(1, 16, 32, 32), "timestep": torch.tensor([500.0]),
               "prompt_embeds": torch.randn(1, 32, width), "pooled_prompt_embeds": torch.randn(1, width)}
    return model.eval(), FluxFamily(), example


def write_diffusers_variants(teacher, family, example, folder: Path) -> dict:
    """The files the variants load (the GGUF where diffusers has a loader for the class), and the
    transformer's call arguments in bfloat16."""
    from fraqat_cli.export.diffusers_folder import TRANSFORMER, write_transformer
    from fraqat_cli.export.gguf import write_gguf
    from fraqat_cli.models.conditioning import conditioning_of
    from fraqat_cli.quant import QuantConfig, QuantizedLayer, QuantSpec, quantize_model

    gguf = has_gguf_loader(teacher)
    student = copy.deepcopy(teacher).float()
    teacher.to(torch.bfloat16).save_pretrained(str(folder / "bf16" / TRANSFORMER))
    quantize_model(student, QuantConfig(weight=QuantSpec("per_group", 32), weight_bits=4, include=("*",)))
    quantized = {n: m for n, m in student.named_modules() if isinstance(m, QuantizedLayer)}
    write_transformer(student, quantized, folder / "torchao" / TRANSFORMER, torch.bfloat16, {})
    if gguf:
        write_gguf(student, family, example, folder / "student.gguf", "diffusers", "bfloat16", {}, "the student")
    kwargs = family.transformer_kwargs(example["latents"], example["timestep"], conditioning_of(example))
    low = lambda v: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    torch.save({k: low(v) for k, v in kwargs.items()}, folder / "inputs.pt")
    params = sum(p.numel() for p in teacher.parameters())
    sizes = {"bf16": _folder_bytes(folder / "bf16"), "torchao": _folder_bytes(folder / "torchao")}
    sizes["torchao-compiled"] = sizes["torchao"]
    if gguf:
        sizes["gguf"] = (folder / "student.gguf").stat().st_size
    return {"params": params, "file_bytes": sizes}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def load_variant(variant: str, folder: Path, device: str = "cpu"):
    """`variant`'s transformer through diffusers' own loader, in bfloat16, on `device`; `torchao-compiled` is
    the torchao folder under `torch.compile` (compiled at its first call)."""
    import diffusers

    config = json.loads((folder / "bf16" / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    if variant == "gguf":
        quantization = diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
        return cls.from_single_file(str(folder / "student.gguf"), config=str(folder / "bf16"), subfolder="transformer",
                                    quantization_config=quantization, torch_dtype=torch.bfloat16).to(device).eval()
    source = "torchao" if variant == "torchao-compiled" else variant
    model = cls.from_pretrained(str(folder / source), subfolder="transformer", torch_dtype=torch.bfloat16)
    model = model.to(device).eval()
    return torch.compile(model) if variant == "torchao-compiled" else model


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def diffusers_child(variant: str, folder: str, device: str = "cpu") -> None:
    """In a fresh process: load `variant` and run one step; print its load time, first step's time (with
    compilation, for `torchao-compiled`), weight bytes and peak memory growth (RSS; on CUDA, allocated).
    A variant that fails prints its error instead: the other rows still come."""
    try:
        _diffusers_child(variant, folder, device)
    except Exception as error:  # noqa: BLE001  reported as the row's error
        print(json.dumps({"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"}))


def _diffusers_child(variant: str, folder: str, device: str) -> None:
    import diffusers
    import gguf  # noqa: F401  imported before the baseline: only the variant itself is measured
    import psutil
    import torchao.quantization  # noqa: F401
    from diffusers.quantizers.gguf import GGUFQuantizer  # noqa: F401
    from diffusers.quantizers.torchao import TorchAoHfQuantizer  # noqa: F401

    torch.set_num_threads(1)
    folder = Path(folder)
    config = json.loads((folder / "bf16" / "transformer" / "config.json").read_text())
    getattr(diffusers, config["_class_name"])  # diffusers imports its model classes lazily
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in torch.load(folder / "inputs.pt", weights_only=True).items()}
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the RSS now
    before = psutil.Process().memory_info().rss
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = load_variant(variant, folder, device)
    synchronize(device)
    load = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        model(**kwargs, return_dict=False)
    synchronize(device)
    first = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        status = Path("/proc/self/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024  # KiB
    weights = sum(_tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"load_s": load, "first_step_s": first, "weight_bytes": weights,
                      "peak_mib": (peak - before) / 2**20}))


def diffusers_steps(folder: Path, variants: list[str], reps: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of one denoiser step per variant, the variants loaded side by side in this process and
    run in turn each round (interleaved: a busy machine slows all alike); a variant that fails is left out."""
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in torch.load(folder / "inputs.pt", weights_only=True).items()}
    models = {}
    with torch.no_grad():
        for v in variants:
            try:
                models[v] = load_variant(v, folder, device)
                models[v](**kwargs, return_dict=False)  # warm-up (and compilation)
            except Exception as error:  # noqa: BLE001  its fresh-process row says why
                models.pop(v, None)
                print(f"<!-- {v}: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]} -->")
        times = {v: [] for v in models}
        for _ in range(reps):
            for v, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                model(**kwargs, return_dict=False)
                synchronize(device)
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's parts (codes, scales, zero points), else its own elements."""
    parts = getattr(tensor, "tensor_data_names", None)
    if parts:
        return sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in parts)
    return tensor.numel() * tensor.element_size()


def compare_diffusers(name: str, width: int, layers: int, reps: int, folder: Path, rounds: int = 3,
                      device: str = "cpu", compiled: bool = False, resolution: int = 256) -> None:
    """The diffusers runtimes of `name` (toy, flux: a random FLUX of `width`; or a conf/model preset at its real
    width, `layers` blocks of each kind, at `resolution` px): a markdown table, each variant against (e)."""
    folder = folder / f"diffusers-{name}-{width}-{layers}"
    if name in ("toy", "flux"):
        teacher, family, example = diffusers_model(name, width, layers)
    else:
        teacher, family, example = preset_model(name, layers, resolution)
    gguf = has_gguf_loader(teacher)
    facts = write_diffusers_variants(teacher, family, example, folder)
    variants = ["bf16", "torchao"] + (["torchao-compiled"] if compiled else []) + (["gguf"] if gguf else [])
    runs = {v: [] for v in variants}
    for _ in range(rounds):  # fresh processes for load time and memory, the variants alternating
        for variant in variants:
            command = [sys.executable, __file__, "--diffusers-child", variant, str(folder), device]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    steps = diffusers_steps(folder, variants, reps, device)
    memory = "peak GPU allocated MiB" if device == "cuda" else "peak RSS growth MiB"
    print(f"\n{name}: {facts['params'] / 1e6:.2f} M parameters ({layers} block(s) of each kind), W4 per-group 32 "
          f"(every linear layer), bf16 compute, on {device}; load, first step and memory: medians of {rounds} "
          f"fresh processes; step: median of {reps} interleaved rounds")
    if not gguf:
        print(f"(no (g): diffusers has no GGUF loader for {type(teacher).__name__}; format=gguf refuses it)")
    print(f"| variant | file MiB | of (e) | load s | first step s | step ms | of (e) | weights MiB | of (e) | {memory} "
          f"| of (e) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    medians = {}
    for v in variants:
        ok = [r for r in runs[v] if "error" not in r]
        if not ok or v not in steps:
            reason = runs[v][0].get("error", "its step failed") if runs[v] else "not run"
            print(f"| {DIFFUSERS_VARIANTS[v]} | error: {reason} |||||||||||", flush=True)
            continue
        medians[v] = {k: statistics.median(r[k] for r in ok) for k in ok[0]} | {"step_s": steps[v]}
    base = medians.get("bf16")
    ratio = lambda v, k: f"{medians[v][k] / base[k]:.2f}" if base and base[k] else "-"  # noqa: E731
    for v, m in medians.items():
        size = facts["file_bytes"][v]
        print(f"| {DIFFUSERS_VARIANTS[v]} | {size / 2**20:.2f} | {size / facts['file_bytes']['bf16']:.2f} | "
              f"{m['load_s']:.2f} | {m['first_step_s']:.2f} | {m['step_s'] * 1e3:.1f} | {ratio(v, 'step_s')} | "
              f"{m['weight_bytes'] / 2**20:.2f} | {ratio(v, 'weight_bytes')} | {m['peak_mib']:.1f} | "
              f"{ratio(v, 'peak_mib')} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="a tiny PixArt (width 128, 1 layer), 3 reps")
    parser.add_argument("--section", choices=("all", "onnx", "diffusers"), default="all")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--model", help="diffusers section: a conf/model preset at its real width "
                        "(pixart_sigma, flux_schnell, sd35_medium) instead of the toy and the 512-wide FLUX")
    parser.add_argument("--layers", type=int, default=1, help="with --model: blocks of each kind")
    parser.add_argument("--resolution", type=int, default=256, help="with --model: image side in px")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="also the torchao folder under torch.compile")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (load, memory)")
    parser.add_argument("--diffusers-child", nargs=3, help=argparse.SUPPRESS)  # variant, folder, device
    args = parser.parse_args()
    if args.child:
        variant, name, width, layers, graph = args.child
        child(int(variant), name, int(width), int(layers), graph)
        return
    if args.diffusers_child:
        diffusers_child(*args.diffusers_child)
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    if args.model:
        print(f"one denoiser step, batch 1, {args.device}" + (f" ({torch.cuda.get_device_name()})"
                                                             if args.device == "cuda" else ", one thread"))
        with tempfile.TemporaryDirectory() as tmp:
            compare_diffusers(args.model, 0, args.layers, args.reps, Path(tmp), args.rounds, args.device,
                              args.compile, args.resolution)
        return
    print("one denoiser step, batch 1, one thread; W4 per-channel A8, every linear layer and 1x1 convolution")
    onnx, in_diffusers = args.section in ("all", "onnx"), args.section in ("all", "diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            if onnx:
                compare_model("pixart", 128, 1, 3, Path(tmp))
                layer_sweep([128], 32, 3, Path(tmp))
            if in_diffusers:
                compare_diffusers("flux", 64, 1, 3, Path(tmp), rounds=1, compiled=args.compile)
            return
        if onnx:
            compare_model("toy", 128, 4, args.reps, Path(tmp))
            compare_model("pixart", 256, 6, args.reps, Path(tmp))      # ~7 M parameters
            compare_model("pixart", 1024, 2, max(args.reps // 3, 5), Path(tmp))   # real width, two blocks
            layer_sweep([128, 256, 512, 768, 1024, 2048], 64, args.reps, Path(tmp))
        if in_diffusers:
            compare_diffusers("toy", 128, 4, args.reps, Path(tmp), args.rounds, compiled=args.compile)
            # 2 double + 4 single blocks
            compare_diffusers("flux", 512, 2, max(args.reps // 3, 5), Path(tmp), args.rounds, compiled=args.compile)


if __name__ == "__main__":
    main()
