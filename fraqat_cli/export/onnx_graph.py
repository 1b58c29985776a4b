"""The student as an ONNX graph in QDQ form: what mobile toolchains (Qualcomm QNN, others) import.

Each quantized linear layer becomes
    x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- weight codes (int4)
(a quantized convolution: the same into a Conv, its weight codes reshaped to the kernel's shape)
with 8- or 4-bit activations (int8, or opset 21's INT4; a per-tensor scale computed in the graph from max|x|
for a dynamic quantizer, a constant for a calibrated static one; per token: blocked quantization along the
last axis, one block per row) and the weight's
integer codes as an initializer: INT4/UINT4 for codes of at most 4 bits (opset
21), int8 otherwise; per-channel scales on axis 0, per-group scales as opset 21
blocked quantization. `torch.onnx.ops.symbolic` places the Q/DQ nodes; the codes
of 4-bit layers are narrowed to INT4 after export, because torch has no int4
tensors to export them from.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fraqat_cli.export.deploy_checks import deployable_layers, layer_record
from fraqat_cli.files import atomic_write
from fraqat_cli.models.conditioning import conditioning_of
from fraqat_cli.quant import QuantizedLayer
from fraqat_cli.quant.fake_quant import SMALLEST_SPAN

OPSET = 21  # the first opset with INT4 and blocked (per-group) DequantizeLinear
INT8, UINT8, INT4, UINT4 = 3, 2, 22, 21  # onnx.TensorProto element types
# activation bits -> (symmetric code type, asymmetric code type, torch dtype the symbolic op claims)
ACTIVATION_TYPES = {8: (INT8, UINT8), 4: (INT4, UINT4)}
SINGLE_FILE_LIMIT = 2**31 - 2**27  # tensor bytes a single-file graph may hold: protobuf stops at 2 GiB


def _symbolic(op: str, inputs: list, attrs: dict | None, dtype, shape) -> torch.Tensor:
    return torch.onnx.ops.symbolic(op, inputs, attrs or {}, dtype=dtype, shape=shape, version=OPSET)


class QuantizedInput(nn.Module):
    """The 8-bit input-activation quantizer of one exported layer as QuantizeLinear -> DequantizeLinear
    (`_activation`); subclasses add the weight and the product."""

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__()
        record = layer_record(layer)
        act = record["activation"]
        # QuantizeLinear rounds to nearest and saturates at its integer type's own bounds: `nearest` (clipped to the
        # narrow range first, below) and `nearest_int_range` (whose bounds those are); `floor` has no QDQ form.
        # 8-bit codes are int8/uint8, 4-bit ones INT4/UINT4 (opset 21); per-token scales are blocked quantization
        # along the last axis, one block per row.
        if act["bits"] is not None and (act["bits"] not in ACTIVATION_TYPES
                                        or act["granularity"] not in ("per_tensor", "per_channel")
                                        or act["rounding"] not in ("nearest", "nearest_int_range")):
            raise ValueError(
                f"{name}: activations at {act['bits']} bits, {act['granularity']}, rounding {act['rounding']} have "
                f"no QDQ form; ONNX export takes 8- or 4-bit activations, per_tensor or per_channel (per token), "
                f"rounded to nearest (quantizer.activation_bits=8 or 4, activation_granularity=per_tensor or "
                f"per_channel, activation_rounding=nearest or nearest_int_range)")
        self.record, self.spec = record, layer.weight_quantizer.spec
        self.bias = layer.bias
        if act["static"] and act["range"] is not None:
            low, high = act["range"]
            span = max(abs(low), abs(high)) if act["symmetric"] else high - low
            top = 2 ** (act["bits"] - 1) - 1  # 127 at 8 bits, 7 at 4
            levels = top if act["symmetric"] else 2 ** act["bits"]
            self.register_buffer("act_scale", torch.tensor(max(span, SMALLEST_SPAN) / levels))
            self.register_buffer("act_low", torch.tensor(float(low)))
            self.act_bound = top * float(self.act_scale)  # a constant: the graph clips to it
        else:
            self.act_scale = None

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        act = self.record["activation"]
        if act["bits"] is None:
            return x
        symmetric, bits = act["symmetric"], act["bits"]
        signed, unsigned = ACTIVATION_TYPES[bits]
        attrs = {}
        if self.act_scale is not None:
            scale, low = self.act_scale, self.act_low
            if symmetric and act["rounding"] == "nearest":  # int8 saturates at -128; `nearest` stops at -127
                x = x.clamp(-self.act_bound, self.act_bound)  # (a static range can be exceeded)
        else:
            per_token = act["granularity"] == "per_channel"
            dims = -1 if per_token else tuple(range(x.dim()))
            if per_token:  # one scale per row of the last axis: blocked quantization, one block per row
                attrs = {"axis": -1, "block_size": int(x.shape[-1])}
            if symmetric:
                top = 2 ** (bits - 1) - 1  # 127 at 8 bits, 7 at 4
                scale, low = x.abs().amax(dim=dims, keepdim=per_token).clamp_min(SMALLEST_SPAN) / top, None
            else:
                low = x.amin(dim=dims, keepdim=per_token)
                scale = (x.amax(dim=dims, keepdim=per_token) - low).clamp_min(SMALLEST_SPAN) / 2**bits
        # No zero-point inputs (they are 0): the exporter merges equal-bytes constants across dtypes, so an int8
        # and a uint8 zero could become one; `output_dtype` says which type instead.
        if symmetric:
            codes = _symbolic("QuantizeLinear", [x, scale], {"output_dtype": signed, **attrs}, torch.int8, x.shape)
            return _symbolic("DequantizeLinear", [codes, scale], attrs or None, torch.float32, x.shape)
        # The wide range starts at min(x): shift it to zero, quantize to unsigned codes, shift back.
        codes = _symbolic("QuantizeLinear", [x - low, scale], {"output_dtype": unsigned, **attrs}, torch.uint8,
                          x.shape)
        return _symbolic("DequantizeLinear", [codes, scale], attrs or None, torch.float32, x.shape) + low


class QDQLayer(QuantizedInput):
    """Export-only stand-in for a quantized layer (linear, 1x1 or depthwise convolution): integer weight
    codes and Q/DQ pairs in the graph."""

    def __init__(self, layer: QuantizedLayer, name: str) -> None:
        super().__init__(layer, name)
        record, spec = self.record, self.spec
        codes, scale, offset = layer.weight_codes(record["bits"])
        code_dtype = (torch.int8 if spec.symmetric else torch.uint8) if record["bits"] <= 8 else torch.int16
        if not spec.symmetric and record["bits"] > 8:
            raise ValueError(f"{name}: asymmetric {record['bits']}-bit weight codes have no ONNX integer type here")
        self.register_buffer("codes", codes.to(code_dtype))
        self.register_buffer("scale", scale.reshape(()) if spec.granularity == "per_tensor" else scale)
        self.register_buffer("offset", offset)
        self.conv = (dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
                     if isinstance(layer, nn.Conv2d) else None)

    def _weight(self) -> torch.Tensor:
        attrs = {"per_tensor": {}, "per_channel": {"axis": 0},
                 "per_group": {"axis": 1, "block_size": self.spec.group_size}}[self.spec.granularity]
        weight = _symbolic("DequantizeLinear", [self.codes, self.scale], attrs, torch.float32, self.codes.shape)
        if self.offset is None:
            return weight
        rows = weight.shape[0]
        grouped = weight.reshape(rows, self.offset.shape[-1] if self.offset.dim() == 2 else 1, -1)
        offset = self.offset.reshape(rows, -1, 1) if self.offset.dim() == 2 else self.offset.reshape(-1, 1, 1)
        return (grouped + offset).reshape(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight().reshape(self.record["shape"])
        if self.conv is None:
            return F.linear(self._activation(x), weight, self.bias)
        return F.conv2d(self._activation(x), weight, self.bias, **self.conv)


def _squeeze_dim(self, dim: int):
    """aten.squeeze.dim as torch means it: a no-op when the dimension is not 1 (PixArt squeezes a
    token dimension that way; the stock translation emits a Squeeze that onnxruntime rejects)."""
    from onnxscript import opset21 as op  # format=onnx only

    size = self.shape[dim] if self.shape is not None and len(self.shape) else None
    if self.shape is not None and (len(self.shape) == 0 or (isinstance(size, int) and size != 1)):
        return op.Identity(self)
    return op.Squeeze(self, op.Constant(value_ints=[dim]))


class DenoiserGraph(nn.Module):
    """The graph's signature: (latents, timestep, conditioning...) -> prediction, in the family's own terms
    (FLUX packs latents inside the graph), the same inputs for every family."""

    def __init__(self, transformer: nn.Module, family, cond_names: list[str]) -> None:
        super().__init__()
        self.transformer, self.family, self.cond_names = transformer, family, cond_names

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        kwargs = self.family.transformer_kwargs(latents, timestep, dict(zip(self.cond_names, cond)))
        return self.transformer(**kwargs, return_dict=False)[0]


def graph_copy(student: nn.Module, source: str, stand_in=None, kinds=None, target: str = "ONNX QDQ"
               ) -> tuple[nn.Module, dict[str, dict]]:
    """A copy of `student` whose quantized layers are `stand_in(layer, name)` (default `QDQLayer`); the
    layer records by name. `kinds`: the layer kinds the stand-in expresses (default: all)."""
    stand_in = stand_in or QDQLayer
    layers = deployable_layers(student, source, **({"kinds": kinds, "target": target} if kinds else {}))
    graph_model = copy.deepcopy(student).eval()
    records = {}
    for name in layers:
        replacement = stand_in(graph_model.get_submodule(name), name)
        graph_model.set_submodule(name, replacement)
        records[name] = replacement.record
    return graph_model, records


def trace(graph_model: nn.Module, family, example: dict[str, torch.Tensor]):
    """The ONNX model proto of `graph_model` called as a denoiser on `example` (inputs in its order)."""

    for noisy in ("onnx_ir", "onnxscript"):  # a line per merged constant or folded slice otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cond_names = list(conditioning_of(example))
    wrapper = DenoiserGraph(graph_model, family, cond_names).eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, tuple(example.values()), dynamo=True, opset_version=OPSET,
                                    input_names=list(example), output_names=["prediction"], verbose=False,
                                    custom_translation_table={torch.ops.aten.squeeze.dim: _squeeze_dim})
    return program.model_proto


def export_onnx(student: nn.Module, family, example: dict[str, torch.Tensor], path: Path, info: dict,
                source: str = "the student", single_file_limit: int = SINGLE_FILE_LIMIT) -> dict:
    """Write the QDQ graph of `student` to `path`; `example` holds latents, timestep and the conditioning
    tensors, in the graph's input order. Returns the layer records, the input names and the side file of
    tensors (None when the graph fits one file, which is then written atomically)."""
    graph_model, records = graph_copy(student, source)
    model = trace(graph_model, family, example)
    expected = sum(r["bits"] <= 4 for r in records.values())
    narrowed = _narrow_codes(model, records)
    if narrowed != expected:
        raise RuntimeError(f"{narrowed} DequantizeLinear nodes read 4-bit weight codes in the exported graph; "
                           f"expected one per 4-bit layer ({expected})")
    paired = _quantized_matmuls(model, activations=any(r["activation"]["bits"] for r in records.values()))
    if paired != len(records):
        raise RuntimeError(f"{paired} matrix products in the exported graph multiply dequantized weights by "
                           f"dequantized activations; expected one per quantized layer ({len(records)})")
    return save_graph(model, path, info, "qdq/1", list(example), records, single_file_limit)


def save_graph(model, path: Path, info: dict, kind: str, inputs: list[str], records: dict,
               single_file_limit: int = SINGLE_FILE_LIMIT) -> dict:
    """Strip the exporter's stack traces, stamp fraqat's metadata and write `model` (one file, atomically,
    or with a side file of tensors past protobuf's 2 GiB)."""
    import onnx  # format=onnx/onnx_nbits only

    for node in model.graph.node:  # the exporter's per-node stack traces: a fifth of a small model's file
        del node.metadata_props[:]
        node.doc_string = ""
    for key, value in {"fraqat_format": kind, "fraqat_info": json.dumps(info, default=str)}.items():
        model.metadata_props.add(key=key, value=value)
    if sum(len(t.raw_data) for t in model.graph.initializer) <= single_file_limit:
        onnx.checker.check_model(model)
        atomic_write(Path(path), lambda tmp: onnx.save(model, tmp))
        return {"layers": records, "inputs": inputs, "data_file": None}
    # Past protobuf's 2 GiB a graph keeps its tensors in a side file (`<path>.data`), which is written in
    # place: stage the export in a fresh folder (as fraqat-export does).
    data_file = Path(path).name + ".data"
    Path(path).with_name(data_file).unlink(missing_ok=True)  # onnx appends to an existing one
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file,
              size_threshold=1024)
    onnx.checker.check_model(str(path))
    return {"layers": records, "inputs": inputs, "data_file": data_file}


def _narrow_codes(model, records: dict[str, dict]) -> int:
    """Store the codes of layers at <= 4 bits as INT4/UINT4 initializers; returns how many DequantizeLinear
    nodes read narrowed codes (the exporter may merge identical initializers, so count readers, not tensors)."""
    import ml_dtypes  # format=onnx only
    from onnx import TensorProto, numpy_helper  # format=onnx/onnx_nbits only

    four_bit = {f"{name}.codes": r for name, r in records.items() if r["bits"] <= 4}
    readers = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    read = {n.input[0] for n in readers}
    narrowed = set()
    for tensor in model.graph.initializer:
        name = next((k for k in four_bit if tensor.name.endswith(k)), None)
        if name is None or tensor.name not in read:
            continue
        symmetric = four_bit[name]["symmetric"]
        values = numpy_helper.to_array(tensor).astype(np.int32)
        tensor.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4),
                                                tensor.name))
        for info in model.graph.value_info:
            if info.name == tensor.name:
                info.type.tensor_type.elem_type = TensorProto.INT4 if symmetric else TensorProto.UINT4
        narrowed.add(tensor.name)
    return sum(n.input[0] in narrowed for n in readers)


def _quantized_matmuls(model, activations: bool) -> int:
    """How many MatMul/Gemm/Conv nodes take a weight from a DequantizeLinear of an initializer and (when the
    student quantizes activations) their other operand from a DequantizeLinear too: the QDQ form, checked
    on the graph because an output comparison cannot see a missing 8-bit activation quantizer."""
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    passthrough = ("Transpose", "Reshape", "Add", "Squeeze", "Unsqueeze", "Identity", "Cast")

    def dequantized(name: str, of_initializer: bool) -> bool:
        for _ in range(8):  # a few reshapes/transposes (and the asymmetric range's offset) may sit in between
            node = producer.get(name)
            if node is None:
                return False
            if node.op_type == "DequantizeLinear":
                return (node.input[0] in initializers) == of_initializer
            if node.op_type not in passthrough:
                return False
            name = next((i for i in node.input if i in producer), node.input[0])
        return False

    count = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) >= 2:
            x, w = node.input[0], node.input[1]
            if dequantized(w, True) and (not activations or dequantized(x, False)):
                count += 1
    return count


def run_onnxruntime(path: Path, example: dict[str, torch.Tensor]) -> torch.Tensor:
    """The graph's prediction for `example`, computed by onnxruntime on the CPU."""
    import onnxruntime  # format=onnx/onnx_nbits only

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: example[name].detach().cpu().numpy() for name in names}
    return torch.from_numpy(session.run(None, feeds)[0])
