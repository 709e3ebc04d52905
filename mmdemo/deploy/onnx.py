"""A classifier to ONNX files: fp32 (torch.onnx, dynamic batch axis), int8 (onnxruntime static quantisation
calibrated on real images, or dynamic where static does not apply) and fp16."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

OPSET = 18  # the legacy exporter's newest well-trodden opset; QDQ per-channel needs 13 or more
INPUT, OUTPUT = "pixel_values", "logits"
FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("int8", "uint8")  # int8: symmetric (S8S8, the default); uint8: asymmetric (U8S8)
KEEP_FP32 = ("first", "last")  # layers an int8 model may keep in fp32: the first Conv, the last Gemm / MatMul


def export_fp32(clf, path: Path, image_size: int) -> Path:
    """``clf`` (a ``models.Classifier``, merged) as ONNX: input ``pixel_values`` N x 3 x S x S (normalised
    float), output ``logits`` N x classes; the batch axis is dynamic.

    The legacy (TorchScript) exporter: with torch 2.14 it writes EfficientNet-Lite0 in about 10 s as one file;
    the dynamo exporter took 53 s and splits the weights into an external ``.data`` file.
    """
    import torch

    clf = static_vit_size(static_padding(clf.eval().float(), image_size), image_size)
    x = torch.zeros(1, 3, image_size, image_size)
    return export_graph(clf, path, {INPUT: x}, {OUTPUT: {0: "batch"}}, {INPUT: {0: "batch"}})


def export_graph(module, path: Path, inputs: dict, outputs: dict, dynamic: dict) -> Path:
    """``module(*inputs.values())`` traced into ``path`` with the legacy exporter at ``OPSET``: ``inputs`` maps
    each input name to its example tensor, ``outputs`` each output name to its dynamic axes, ``dynamic`` the
    inputs' dynamic axes."""
    import torch

    from ..errors import UserInputError

    # In eval mode before the export: the exporter puts a module back in the mode it found it in, and a wrapper
    # left in training mode would switch dropout on in the model it wraps.
    module.eval()
    with warnings.catch_warnings(), torch.no_grad(), _pos_embed_as_is():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                              output_names=list(outputs), opset_version=OPSET,
                              dynamic_axes={**dynamic, **outputs}, dynamo=False)
        except torch.onnx.errors.UnsupportedOperatorError as e:
            raise UserInputError(f"This model has an operation ONNX opset {OPSET} cannot represent ({e}); export it "
                                 f"in the PyTorch format (--format pytorch) instead.") from e
    return path


def static_vit_size(clf, image_size: int):
    """A copy of ``clf`` whose timm ViTs with ``dynamic_img_size`` hold position embeddings resampled once for
    ``image_size``: traced as they are, they resample every call with an antialiased bicubic ONNX cannot
    express."""
    import copy

    def dynamic(m):
        return getattr(m, "dynamic_img_size", False) is True and hasattr(m, "set_input_size")

    if not any(dynamic(m) for m in clf.modules()):
        return clf
    clf = copy.deepcopy(clf)
    for m in clf.modules():
        if dynamic(m):
            m.set_input_size(img_size=(image_size, image_size))
    return clf


class _pos_embed_as_is:
    """While exporting, timm resamples position embeddings even to their own size (``is_exporting()``);
    after ``static_vit_size`` that resampling is the identity, so it is skipped and the embedding is traced
    as a constant."""

    def __enter__(self):
        try:
            import timm.layers.pos_embed as pos_embed
        except ImportError:
            self.module = None
            return self
        self.module, self.saved = pos_embed, pos_embed.is_exporting
        pos_embed.is_exporting = lambda: False
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.is_exporting = self.saved
        return False


def static_padding(clf, image_size: int):
    """A copy of ``clf`` whose TensorFlow-style "same" convolutions (timm's ``Conv2dSame``: the tf_ EfficientNets,
    Lite0 included) pad by constants computed for ``image_size``. Traced as they are, they compute their pads
    from the input's shape at run time (Shape, Cast, Ceil, Pad nodes): int8 calibration quantises that
    arithmetic (the collapsed int8 Lite0) and the fp16 converter mistypes its Casts."""
    import copy

    import torch

    try:
        from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    except ImportError:  # no timm: nothing of the kind to replace
        return clf
    same = [m for m in clf.modules() if type(m) is Conv2dSame]
    if not same:
        return clf
    clf = copy.deepcopy(clf)
    for m in clf.modules():
        if type(m) is Conv2dSame:
            m.__class__, m.pad, m.pad_input_size = Conv2dSameExport, None, (0, 0)
    with torch.no_grad():
        clf(torch.zeros(1, 3, image_size, image_size))  # each layer fixes its padding for this input size
    return clf


class ArrayReader:
    """onnxruntime's CalibrationDataReader over preprocessed images (N x 3 x S x S float32), a few at a time."""

    def __init__(self, pixels: np.ndarray, batch: int = 1):  # batch 1: the histogram calibrators need equal batches
        self.batches = iter([pixels[i:i + batch] for i in range(0, len(pixels), batch)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self):  # not needed by the calibrators used here
        raise NotImplementedError


def excluded_nodes(model_path: Path, keep_fp32) -> list[str]:
    """The node names of the layers kept in fp32: ``first`` the first Conv, ``last`` the last Gemm / MatMul."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    names = []
    if "first" in keep_fp32:
        names += [n.name for n in nodes if n.op_type == "Conv"][:1]
    if "last" in keep_fp32:
        names += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    return names


def lacks_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this is an x86 CPU without VNNI (``avx512_vnni`` / ``avx_vnni`` absent from /proc/cpuinfo's flags).

    Its int8 kernels multiply pairs into int16 (``vpmaddubsw``), which saturates with 8-bit weights: on an
    AVX2-only CPU the digits model lost 32.9 points at int8, 5.3 with 7-bit weights (``reduce_range``), where a
    VNNI CPU lost 0.6 with 8-bit ones (bench/RESULTS.md). False where the flags cannot be read or are not x86's.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray | None, *, method: str = "minmax",
                  keep_fp32=("last",), per_channel: bool = True, activations: str = "int8",
                  reduce_range: bool | None = None, pre_process: bool = True) -> dict:
    """``fp32`` quantised to int8 into ``out``; returns what was done (written to export.json).

    Static quantisation (QDQ, int8 weights per channel; activations ``int8`` symmetric, onnxruntime's recommended
    S8S8, or ``uint8`` asymmetric) calibrated on ``calibration``
    after onnxruntime's pre-processing (shape inference, graph optimisation); dynamic quantisation (weights
    only, activations quantised at run time) where there are no calibration images or static fails.
    ``reduce_range`` (7-bit weights) None = on where this CPU ``lacks_vnni``: the lab measures each file on the
    machine that exports it, so the file is quantised for that machine's kernels. ``pre_process`` False: quantise
    the graph as exported, without onnxruntime's pre-processing (shape inference, graph optimisation).
    """
    if reduce_range is None:
        reduce_range = lacks_vnni()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + "_prep.onnx")
    prepared_done = False
    if pre_process:
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            prepared_done = True
        except Exception:  # noqa: BLE001 - the pre-processing only helps; quantise the model as exported
            pass
    if not prepared_done:
        prepared.write_bytes(fp32.read_bytes())
    excluded = excluded_nodes(prepared, keep_fp32)
    info = {"per_channel": per_channel, "keep_fp32": list(keep_fp32), "excluded_nodes": excluded, "pre_process": pre_process,
            "activations": activations, "reduce_range": reduce_range}
    try:
        if calibration is None or not len(calibration):
            raise ValueError("no calibration images")
        calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
        quantize_static(str(prepared), str(out), ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate,
                        activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                        nodes_to_exclude=excluded,
                        extra_options={"CalibMovingAverage": False, "ActivationSymmetric": activations == "int8"})
        info.update(mode="static", calibration_images=int(len(calibration)), calibration_method=method)
    except Exception as e:  # noqa: BLE001 - static does not apply: weights-only int8 still shrinks the file
        quantize_dynamic(str(prepared), str(out), per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        info.update(mode="dynamic", reason=f"static quantisation did not apply: {e}"[:300])
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in out.parent.glob("*augmented_model*.onnx"):
            leftover.unlink(missing_ok=True)
    return info


def convert_fp16(fp32: Path, out: Path) -> dict:
    """``fp32`` with fp16 weights and activations (onnxconverter-common); input and output stay float32, so a
    caller feeds the same arrays."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning per weight below fp16's smallest step (set to that step)
        model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    fixed = _fix_float_casts(model)
    onnx.save(model, str(out))
    return {"keep_io_types": True, "casts_retyped": fixed}


def _fix_float_casts(model) -> int:
    """The converter types every float tensor fp16 but leaves ``Cast(to=float)`` nodes as they are (timm's
    "same" padding computes its pads from the input shape in float): such a Cast now casts to fp16."""
    from onnx import TensorProto

    fp16 = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    fixed = 0
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i, fixed = TensorProto.FLOAT16, fixed + 1
    return fixed


def untie_gathers(fp32: Path, out: Path) -> int:
    """``fp32`` into ``out`` with each Gather's weight its own copy where another node reads the same initializer
    (a decoder's word embeddings tied to its LM head): quantising the head's Gemm transposes that shared
    initializer, which the embedding Gather then reads (onnxruntime refuses the file). Returns the copies made."""
    import onnx

    model = onnx.load(str(fp32))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    copies = 0
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in weights and readers[node.input[0]] > 1:
            own = onnx.TensorProto()
            own.CopyFrom(weights[node.input[0]])
            own.name = f"{node.input[0]}.{node.name}"
            graph.initializer.append(own)
            node.input[0], copies = own.name, copies + 1
    onnx.save(model, str(out))
    return copies
