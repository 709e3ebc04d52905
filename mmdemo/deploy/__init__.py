"""Deployment: a classification run (or a captioning / VQA run of the offline composed captioner) exported to ONNX
(fp32, int8, fp16) with the export lab's measurements.

- ``onnx``: the file writers (torch.onnx export, onnxruntime static / dynamic int8, fp16).
- ``lab``: every variant measured by running that file (accuracy, delta, agreement, size, latency), the
  warnings and the best variant.
- ``text``: the composed captioner as ``encoder.onnx`` + ``decoder.onnx`` and its lab (metric, agreement of the
  generated texts, size, latency of one generation).
- ``export``: ``export_onnx_run`` (the PyTorch export folder + ONNX files + export.json + card section).
- ``runtime``: an exported variant run in onnxruntime (the Classify tab), ``RUN_ID/onnx/FILE`` checkpoints;
  ``generate_onnx``, the greedy generation loop over the captioner's two sessions.

Importing this package loads neither torch nor onnxruntime.
"""

from .export import FORMATS, LAB_FILE, QUANTIZE, check_request, export_onnx_run, read_lab
from .runtime import RUN_ONNX_DIR, classify_onnx, onnx_checkpoint, onnx_choices

__all__ = ["FORMATS", "QUANTIZE", "LAB_FILE", "RUN_ONNX_DIR", "check_request", "export_onnx_run", "read_lab",
           "classify_onnx", "onnx_checkpoint", "onnx_choices"]
