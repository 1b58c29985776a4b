"""SDPA kernels on a GPU: forward + backward time at FLUX.1's real attention shape in bf16, each kernel against
flash: what `attention_backends` (which leaves cuDNN out, docs/real-models.md) costs.

Random inputs do not reproduce cuDNN's NaN gradients (they come with FLUX's own normalised, rotated
queries and keys); `attention_backends=null` on tiny FLUX at bf16-mixed does, and `scripts/gpu_check.sh`'s
`flux-nan` stage trains one real-width FLUX block of each kind that way to learn whether the real width does.

    python benchmarks/attention_backends.py            # CUDA only; prints times and ratios measured in one run
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.nn.attention import sdpa_kernel

from fraqat_cli.train.attention_backends import BACKENDS


def step(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.float().square().mean().backward()
    return out, q.grad


def timed(backend, shape, reps: int) -> float:
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([backend]):
        for _ in range(3):
            step(q, k, v)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(q, k, v)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_backends.py needs CUDA")
    real = (1, 24, 4096 + 512, 128)  # FLUX.1 at 1024 px: 4096 image + 512 text tokens, 24 heads of 128
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| kernel | fwd+bwd ms at FLUX's shape | / flash |")
    print("|---|---|---|")
    times = {}
    for name, backend in BACKENDS.items():
        if name == "math":  # the reference kernel: minutes at this shape, and never the fast one
            times[name] = None
        else:
            try:
                times[name] = timed(backend, real, args.reps)
            except RuntimeError as error:
                times[name] = None
                print(f"<!-- {name} at {real}: {str(error).splitlines()[0][:120]} -->")
        ms = "-" if times[name] is None else f"{times[name]:.2f}"
        ratio = "-" if times[name] is None or not times.get("flash") else f"{times[name] / times['flash']:.2f}"
        print(f"| {name} | {ms} | {ratio} |")


if __name__ == "__main__":
    main()
