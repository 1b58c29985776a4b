"""The student as an ONNX graph that onnxruntime runs with its weights still 4-bit: `MatMulNBits`.

`com.microsoft.MatMulNBits` keeps each weight as packed 4-bit codes in blocks of `block_size` input
columns, one float scale per block, and multiplies without materialising a float weight. With
`accuracy_level=4` it quantizes the activations to int8 per block and runs an int8 kernel: on this CPU
a width-1024 PixArt step in 0.67-0.69x the time of its fp32 graph (benchmarks/deploy_runtime.py). Chosen over
torchao because it runs inside the same ONNX graph the QDQ export already checks, in a runtime with no
PyTorch, and its layout is the codes and scales the student already has (docs/deployment.md).

Each quantized layer becomes
    x -> QuantizeLinear -> DequantizeLinear -> MatMulNBits(packed codes, scales) (-> + bias)
The Q/DQ pair is the student's own 8-bit per-tensor activation quantizer; a 1x1 convolution is the same
product over channels (NCHW -> NHWC -> MatMulNBits -> NCHW). The codes are those of the safetensors file:
signed 4-bit c in [-8, 7] stored as c + 8 (MatMulNBits' default zero point, 8), so `(q - 8) * scale`
is exactly the student's weight. Per-channel and per-tensor scales repeat over a row's blocks; per-group
scales are the blocks themselves (a group size that is a power of two, at least 16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fraqat_cli.export.onnx_graph import QuantizedInput, graph_copy, save_graph, trace
from fraqat_cli.quant import QuantizedLayer

KINDS = ("linear", "pointwise_conv")  # what a matrix product expresses; a depthwise convolution is not one
BITS = 4
ZERO_POINT = 8  # MatMulNBits' default for 4 bits: stored q = code + 8


def block_size_of(record: dict, block_size: int) -> int:
    return record["group_size"] if record["granularity"] == "per_group" else block_size


def check_block_size(block_size: int, what: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"{what}={block_size!r} is not a MatMulNBits block size; allowed: a power of two >= 16")


def check_runtime(block_size: int, accuracy_level: int) -> None:
    check_block_size(block_size, "runtime.block_size")
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"runtime.accuracy_level={accuracy_level!r} is not offered; allowed: 0-4 "
                         f"(4: int8 compute; 0 or 1: float32)")


def pack_blocks(codes: torch.Tensor, block_size: int) -> torch.Tensor:
    """Signed 4-bit `codes` (N, K) as MatMulNBits' B: uint8 (N, ceil(K / block), block / 2), each byte two
    consecutive columns (low nibble first), stored as code + 8; the last block padded with code 0."""
    rows, width = codes.shape
    blocks = -(-width // block_size)
    stored = torch.full((rows, blocks * block_size), ZERO_POINT, dtype=torch.int32)
    stored[:, :width] = codes + ZERO_POINT
    stored = stored.reshape(rows, blocks, block_size).to(torch.uint8)
    return (stored[..., 0::2] | (stored[..., 1::2] << 4)).contiguous()


class NBitsLayer(QuantizedInput):
    """Export-only stand-in for a quantized linear layer or 1x1 convolution: the 8-bit input Q/DQ, then
    MatMulNBits on the packed 4-bit codes."""

    def __init__(self, layer: QuantizedLayer, name: str, block_size: int = 128, accuracy_level: int = 4) -> None:
        super().__init__(layer, name)
        record, spec = self.record, self.spec
        if record["bits"] != BITS or not spec.symmetric:
            raise ValueError(
                f"{name} has {record['bits']}-bit {'symmetric' if spec.symmetric else 'asymmetric'} weights; the "
                f"MatMulNBits runtime takes {BITS}-bit symmetric weights (format=safetensors or onnx take any)")
        block = block_size_of(record, block_size)
        check_block_size(block, "quantizer.group_size" if spec.granularity == "per_group" else "runtime.block_size")
        codes, scale, _ = layer.weight_codes(BITS)
        rows, width = codes.shape
        self.register_buffer("packed", pack_blocks(codes, block))
        blocks = self.packed.shape[1]
        if spec.granularity == "per_group":  # groups of `block` columns: one scale each; padding has code 0
            scales = torch.nn.functional.pad(scale.reshape(rows, -1), (0, blocks - width // block))
        else:
            scales = scale.reshape(-1, 1).expand(rows, blocks)
        self.register_buffer("scales", scales.reshape(-1).float().contiguous())
        self.attrs = {"K": width, "N": rows, "bits": BITS, "block_size": block, "accuracy_level": accuracy_level}
        self.is_conv = isinstance(layer, nn.Conv2d)

    def _product(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        out = torch.onnx.ops.symbolic("com.microsoft::MatMulNBits", [x, self.packed, self.scales], self.attrs,
                                      dtype=x.dtype, shape=(*x.shape[:-1], self.attrs["N"]), version=1)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._activation(x)
        if not self.is_conv:
            return self._product(x)
        return self._product(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W) as (B, H, W, C)


def export_nbits(student: nn.Module, family, example: dict[str, torch.Tensor], path: Path, info: dict,
                 source: str = "the student", block_size: int = 128, accuracy_level: int = 4) -> dict:
    """Write `student` as a graph whose quantized layers are MatMulNBits; ValueError naming the layer kinds
    it expresses when the student has others. Returns the layer records and the input names."""
    check_runtime(block_size, accuracy_level)
    graph_model, records = graph_copy(
        student, source, lambda layer, name: NBitsLayer(layer, name, block_size, accuracy_level), KINDS,
        "the MatMulNBits runtime (format=onnx_nbits)")
    model = trace(graph_model, family, example)
    products = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if len(products) != len(records):
        raise RuntimeError(f"{len(products)} MatMulNBits nodes in the exported graph; expected one per quantized "
                           f"layer ({len(records)})")
    if any(r["activation"]["bits"] for r in records.values()):
        producer = {out: node for node in model.graph.node for out in node.output}
        fed = sum(_fed_by_dequantize(n.input[0], producer) for n in products)
        if fed != len(products):
            raise RuntimeError(f"{fed} of {len(products)} MatMulNBits nodes read a DequantizeLinear'd activation; "
                               f"the student quantizes every quantized layer's input")
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not node.domain:
            node.domain = "com.microsoft"
    return save_graph(model, path, info, "matmul_nbits/1", list(example), records)


def _fed_by_dequantize(name: str, producer: dict) -> bool:
    """Whether `name` comes from a DequantizeLinear, through at most a transpose (a 1x1 convolution's)."""
    for _ in range(3):
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type != "Transpose":
            return False
        name = node.input[0]
    return False


def weight_bytes(path: Path) -> int:
    """Bytes of every initializer the graph holds: what a session keeps resident as weights."""
    import onnx  # format=onnx/onnx_nbits only
    from onnx import numpy_helper  # format=onnx/onnx_nbits only

    model = onnx.load(str(path))
    return sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
