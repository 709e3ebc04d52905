"""``export RUN_DIR OUT_DIR --format onnx``: the PyTorch export folder plus ONNX variants, each measured.

The folder is self-contained: ``model.onnx`` (and ``model_int8.onnx`` / ``model_fp16.onnx``), the PyTorch
export's files (``mmdemo.json`` with the label names and preprocessing, ``config.json``, weights, card),
``export.json`` (the lab table) and a README section with an onnxruntime snippet that needs neither mmdemo
nor torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from ..runs import read_json
from .lab import conclude, latency_ms, machine, onnx_logits, session, torch_logits, unrunnable, variant_row
from .onnx import ACTIVATIONS, CALIBRATION_METHODS, FILES, KEEP_FP32, convert_fp16, export_fp32, quantize_int8

FORMATS = ("pytorch", "onnx")
QUANTIZE = ("int8", "fp16")
ONNX_TASKS = ("classification",)
TEXT_TASKS, TEXT_FAMILIES = ("captioning", "vqa"), ("composed",)  # deploy/text.py: encoder.onnx + decoder.onnx
LAB_FILE = "export.json"
DEFAULT_CALIBRATION_IMAGES = 100
IMPORTS = "import json, numpy as np, onnxruntime as ort\nfrom PIL import Image\n"
PREPROCESS = '''meta = json.load(open("mmdemo.json"))  # preprocessing (and labels), the same file the PyTorch export reads
pre, s = meta["preprocess"], meta["preprocess"]["image_size"]
img = Image.open("image.jpg").convert("RGB")
k = s / pre["crop_pct"] / min(img.size)
w, h = max(s, round(img.width * k)), max(s, round(img.height * k))
left, top = (w - s) // 2, (h - s) // 2
img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + s, top + s))
x = ((np.asarray(img, np.float32) / 255 - pre["mean"]) / pre["std"]).transpose(2, 0, 1)[None].astype(np.float32)
'''
SNIPPET = IMPORTS + PREPROCESS + '''logits = ort.InferenceSession("model.onnx").run(None, {"pixel_values": x})[0][0]
print(meta["id2label"][str(int(logits.argmax()))])
'''
EXAMPLE_QUESTION = "what color is the shape?"
TEXT_SNIPPET = IMPORTS + "from tokenizers import Tokenizer\n" + PREPROCESS + '''tok = Tokenizer.from_file("text/tokenizer.json")
tok.enable_truncation({question_tokens})
question = {question}
ids = tok.encode(question).ids if question else [tok.token_to_id("[CLS]")]  # VQA: the question; captions: [CLS]
memory = ort.InferenceSession("encoder.onnx").run(None, {{"pixel_values": x}})[0]
decoder, new = ort.InferenceSession("decoder.onnx"), []
for _ in range(20):  # greedy: the most likely next token until [SEP]
    token = int(decoder.run(None, {{"input_ids": np.array([ids + new], np.int64), "memory": memory}})[0][0].argmax())
    if token == tok.token_to_id("[SEP]"):
        break
    new.append(token)
print(tok.decode(new))
'''


def check_request(fmt: str, quantize) -> list[str]:
    """The variants asked for, checked: ``fmt`` one of FORMATS, each of ``quantize`` one of QUANTIZE."""
    fmt = (fmt or "pytorch").strip().lower()
    if fmt not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}').")
    if isinstance(quantize, str):
        quantize = [quantize]
    asked = [q.strip().lower() for item in (quantize or []) for q in str(item).split(",") if q.strip()]
    wrong = [q for q in asked if q not in QUANTIZE]
    if wrong:
        raise UserInputError(f"--quantize takes {' or '.join(QUANTIZE)} (got '{wrong[0]}').")
    if asked and fmt != "onnx":
        raise UserInputError("--quantize applies to --format onnx; add --format onnx.")
    return list(dict.fromkeys(asked))


def onnx_families() -> tuple[str, ...]:
    """The classifier families (mmdemo.json "family") that export to ONNX: every registered one."""
    from ..families import families

    return tuple(families("classifier"))


def check_exportable(meta: dict) -> None:
    """Refuses (UserInputError, naming what is supported) a run that is neither a classifier of a registered
    family nor a captioning / VQA run of the composed captioner."""
    from ..taskspec import TASK_SPECS

    task, family = meta.get("task", "classification"), meta.get("family", "")
    supported = onnx_families()
    offline = TASK_SPECS["captioning"].base_models[0]  # the composed captioner: the text tasks' default base model
    what = (f"ONNX export supports classification runs (families {', '.join(supported)}) and captioning / VQA runs "
            f"of the offline composed captioner ({offline})")
    if task not in (*ONNX_TASKS, *TEXT_TASKS):
        raise UserInputError(f"{what}; this run is {task}: export it with --format pytorch.")
    if task in TEXT_TASKS and family not in TEXT_FAMILIES:
        raise UserInputError(f"{what}; this {task} run is of the {family} family: export it with --format pytorch.")
    if task in ONNX_TASKS and family not in supported:
        raise UserInputError(f"ONNX export supports the {', '.join(supported)} classifier families (this run: "
                             f"{family}); export it with --format pytorch.")


def export_onnx_run(run_dir, out_dir, *, quantize=(), calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                    calibration: str = "minmax", keep_fp32=("last",), latency_runs: int = 30,
                    max_val_images: int = 0, calibration_pixels: np.ndarray | None = None,
                    activations: str = "int8") -> dict:
    """The PyTorch export of a classification run (or a captioning / VQA run of the composed captioner: encoder and
    decoder files, see ``deploy.text``) into ``out_dir``, plus its ONNX variants and the lab.

    Args:
        run_dir: a finished (or stopped) classification, or composed captioning / VQA, run.
        out_dir: a new or empty folder.
        quantize: any of "int8", "fp16" (fp32 ``model.onnx``, or ``encoder.onnx`` + ``decoder.onnx``, is always
            written).
        calibration_images: training images that calibrate int8 (0: dynamic quantisation).
        calibration: "minmax", "entropy" or "percentile".
        keep_fp32: layers int8 keeps in fp32: "first" (Conv), "last" (Gemm / MatMul).
        latency_runs: timed batch-1 calls per variant.
        max_val_images: measure on at most this many validation images / items (0: all).
        activations: int8 activations "int8" (symmetric) or "uint8" (asymmetric).
        calibration_pixels: preprocessed images (N x 3 x S x S float32) that calibrate int8 instead of the
            training split's.

    Returns:
        export.json's content: ``{"variants": [rows], "best", "warnings", ...}`` plus ``"files"``.
    """
    from ..hub import export_run
    from ..hub.rundir import read_run

    run_dir, out = Path(run_dir), Path(out_dir)
    quantize = check_request("onnx", quantize)
    _, meta, cfg = read_run(run_dir)
    check_exportable(meta)
    calibration = (calibration or "minmax").lower()
    if calibration not in CALIBRATION_METHODS:
        raise UserInputError(f"--calibration must be one of {', '.join(CALIBRATION_METHODS)} (got '{calibration}').")
    if activations not in ACTIVATIONS:
        raise UserInputError(f"--activations must be one of {', '.join(ACTIVATIONS)} (got '{activations}').")
    keep_fp32 = [k.strip() for item in ([keep_fp32] if isinstance(keep_fp32, str) else keep_fp32 or [])
                 for k in str(item).split(",") if k.strip() and k.strip() != "none"]
    if any(k not in KEEP_FP32 for k in keep_fp32):
        raise UserInputError(f"--keep-fp32 takes {', '.join(KEEP_FP32)} or none (got '{','.join(keep_fp32)}').")
    if int(max_val_images or 0) < 0:
        raise UserInputError(f"--max-val-images must be 0 (all) or more (got {max_val_images}).")
    int8_options = (calibration, keep_fp32, activations)
    if meta["task"] in TEXT_TASKS:
        from .text import text_lab, text_model_and_data

        model, val, train_pixels = text_model_and_data(run_dir, _splits(cfg), calibration_images, max_val_images)

        def measure():
            return text_lab(model, out, val, train_pixels, quantize, int8_options, latency_runs)
    else:
        clf, val, train_pixels = _model_and_data(run_dir, cfg, calibration_images, max_val_images)

        def measure():
            return _lab(clf, out, val, train_pixels, quantize, int8_options, latency_runs)
    if calibration_pixels is not None:
        train_pixels = np.asarray(calibration_pixels, np.float32)
    # The ONNX files hold the whole network; the PyTorch files beside them keep adapter / vpt modules and
    # learned prompts in adapter/, as those methods cannot merge into timm / transformers weights.
    export_run(run_dir, out, merged=not (meta.get("added_modules") or meta.get("prompt_tuning")))
    try:
        lab = measure()
        lab.update(run=run_dir.name, family=meta.get("family"), base_model=meta.get("base_model"))
        (out / LAB_FILE).write_text(json.dumps(lab, indent=2))
        with open(out / "README.md", "a") as card:
            card.write(card_section(lab))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {**lab, "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())}


def _model_and_data(run_dir: Path, cfg: dict, calibration_images: int, max_val_images: int):
    """The run's classifier (merged) and its preprocessed validation / calibration images."""
    from ..images import normalize, resize_center_crop
    from ..models import load_classifier

    import torch

    clf = load_classifier(run_dir / "model").eval()
    splits = _splits(cfg)
    pre = clf.preprocess

    def pixels(images) -> np.ndarray:
        if not len(images):
            return np.zeros((0, 3, pre.image_size, pre.image_size), np.float32)
        x = torch.stack([resize_center_crop(im, pre.image_size, pre.crop_pct) for im in images])
        return normalize(x, pre.mean, pre.std).numpy()

    val = splits["validation"]
    if max_val_images and len(val) > max_val_images:
        val = val.shuffle(seed=0).select(range(max_val_images))
    names = val.features["label"].names
    index = {label: i for i, label in enumerate(clf.labels)}
    targets = np.array([index.get(names[y], -1) for y in val["label"]], dtype=np.int64)
    train = splits["train"]
    picked = train.shuffle(seed=0).select(range(min(calibration_images, len(train)))) if calibration_images else None
    return clf, (pixels(val["image"]), targets), (pixels(picked["image"]) if picked is not None else None)


def _splits(cfg: dict):
    """The run's dataset splits (the lab measures on its validation split)."""
    from ..data import load_splits

    data = Path(str(cfg.get("data") or ""))
    if not (data / "data").is_dir():
        raise UserInputError(f"The export lab measures every variant on the run's validation images, and the run's "
                             f"dataset '{data.name}' is gone: ingest it again, or export with --format pytorch.")
    return load_splits(data)


def _lab(clf, out: Path, val, train_pixels, quantize, int8_options, latency_runs) -> dict:
    import torch

    pixels, targets = val
    threads = torch.get_num_threads()
    side = clf.preprocess.image_size
    one = pixels[:1] if len(pixels) else np.zeros((1, 3, side, side), np.float32)
    reference = torch_logits(clf, pixels)
    weights = sum(p.numel() * p.element_size() for p in clf.parameters()) + sum(
        b.numel() * b.element_size() for b in clf.buffers())
    rows = [variant_row("torch fp32", "model.safetensors", reference, reference, targets, weights,
                        latency_ms(lambda x: torch_logits(clf, x), one, latency_runs))]
    steps = {"fp32": export_fp32(clf, out / FILES["fp32"], clf.preprocess.image_size)}
    details = {}
    for kind in quantize:
        if kind == "int8":
            calibration, keep_fp32, activations = int8_options
            details["int8"] = quantize_int8(steps["fp32"], out / FILES["int8"], train_pixels, method=calibration,
                                            keep_fp32=keep_fp32, activations=activations)
        else:
            details["fp16"] = convert_fp16(steps["fp32"], out / FILES["fp16"])
        steps[kind] = out / FILES[kind]
    kind_of = {}
    for kind, path in steps.items():
        name = f"onnx {kind}"
        kind_of[name] = kind
        try:
            sess = session(path, threads)
        except Exception as e:  # noqa: BLE001 - a file this CPU's provider cannot run: say so, keep the others
            rows.append(unrunnable(variant_row(name, path.name, reference, reference, targets, path.stat().st_size,
                                               (0, 0)), e))
            continue
        logits = onnx_logits(sess, pixels)
        rows.append(variant_row(name, path.name, logits, reference, targets, path.stat().st_size,
                                latency_ms(lambda x: sess.run(None, {"pixel_values": x}), one, latency_runs)))
    return {"task": "classification", "image_size": clf.preprocess.image_size, "num_val": int(len(targets)),
            "input": "pixel_values", "output": "logits", **machine(threads, latency_runs), "quantization": details,
            "variants": rows, **conclude(rows, kind_of)}


def card_section(lab: dict) -> str:
    """The README's ONNX section: the lab table, its warnings, and the onnxruntime snippet."""
    text = lab["task"] in TEXT_TASKS
    metric = {"vqa_accuracy": "VQA accuracy", "cider": "CIDEr-D"}.get(lab.get("metric"), "accuracy")
    head = f"| variant | file | {metric} | delta (points) | agreement | size (MB) | latency p50 / p95 (ms) |"
    what = ("validation items (agreement: identical generated text; latency: one whole greedy generation)" if text
            else "validation images")
    lines = ["", "## ONNX (onnxruntime)", "",
             f"Measured on {lab['num_val']} {what} and this machine's CPU ({lab['cpu'] or 'unknown'}, "
             f"{lab['threads']} threads, batch 1, {lab['latency_runs']} runs); the best variant (fastest within 1 "
             "point of PyTorch) is in bold.", "", head, "|---|---|---|---|---|---|---|"]
    for r in lab["variants"]:
        cells = [r["variant"], f"`{r['file']}`", _num(r["accuracy"]), _num(r["delta_points"]), _num(r["agreement"]),
                 _num(r["size_mb"]), f"{_num(r['latency_ms_p50'])} / {_num(r['latency_ms_p95'])}"]
        if r["best"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- ⚠️ {w}" for w in lab["warnings"]] + (["" ] if lab["warnings"] else [])
    if text:
        from ..vlm.composed import QUESTION_TOKENS

        question = repr(EXAMPLE_QUESTION) if lab["task"] == "vqa" else "None"
        lines += ["Run it with numpy, Pillow, onnxruntime and tokenizers only (`pip install onnxruntime pillow numpy "
                  "tokenizers`): `encoder.onnx` turns `pixel_values` (N x 3 x S x S, float32) into `memory`; "
                  "`decoder.onnx` takes `input_ids` (N x T, int64) and `memory` and returns the next token's "
                  "`logits` (N x vocabulary). There is no KV cache: each step runs the whole sequence, cheap for "
                  "answers and captions this short.", "", "```python",
                  TEXT_SNIPPET.format(question=question, question_tokens=QUESTION_TOKENS).rstrip(), "```", ""]
    else:
        lines += ["Run it with numpy, Pillow and onnxruntime only (`pip install onnxruntime pillow numpy`); the "
                  "input is `pixel_values` (N x 3 x S x S, float32), the output `logits`:", "", "```python",
                  SNIPPET.rstrip(), "```", ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else str(value)


def read_lab(folder) -> dict:
    """A folder's export.json ({} when there is none)."""
    return read_json(Path(folder) / LAB_FILE)
