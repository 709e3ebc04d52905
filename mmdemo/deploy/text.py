"""The offline composed captioner (``efficientnet_lite0+minilm``, captioning and VQA) as two ONNX graphs, and
its export lab.

- ``encoder.onnx``: ``pixel_values`` (B x 3 x S x S, the run's preprocessing) -> ``memory`` (B x cells x hidden:
  ``ComposedCaptioner.encode``, the decoder's cross-attention input).
- ``decoder.onnx``: ``input_ids`` (B x T int64), ``memory`` -> ``logits`` of the last position (B x vocab). A
  prompt-tuned decoder holds its learned prompt vectors in the graph, in front of the input embeddings.

No KV cache: every step runs the whole sequence, which for answers of a few tokens and captions of about ten
costs little and keeps one graph per file. ``runtime.generate_onnx`` is the greedy loop over both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .lab import conclude, latency_ms, machine, session, unrunnable
from .onnx import FILES, INPUT, convert_fp16, export_graph, quantize_int8, static_padding, untie_gathers
from .runtime import generate_onnx

IDS, MEMORY, LOGITS = "input_ids", "memory", "logits"
PARTS = ("encoder", "decoder")


def text_files(kind: str) -> tuple[str, str]:
    """The encoder's and decoder's file names of a variant, named as the classifier's (``FILES``)."""
    return tuple(FILES[kind].replace("model", part) for part in PARTS)


class EncoderGraph(nn.Module):
    """pixel_values -> memory, exactly ``ComposedCaptioner.encode``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode(pixel_values)


class DecoderGraph(nn.Module):
    """(input_ids, memory) -> the next token's logits; the prompt-tuned decoder's prompts in front of the words,
    as ``ComposedCaptioner.generate`` puts them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.prompted = model._prompts() is not None
        self.decoder = model.decoder.get_base_model() if self.prompted else model.decoder

    def forward(self, input_ids, memory):
        if self.prompted:
            words = {"inputs_embeds": self.model._embed(self.decoder, input_ids, self.model._prompts())}
        else:
            words = {"input_ids": input_ids}
        hidden = self.decoder.bert(**words, encoder_hidden_states=memory, use_cache=False).last_hidden_state
        return self.decoder.cls(hidden[:, -1])


def export_text_fp32(model, out: Path) -> tuple[Path, Path]:
    """``encoder.onnx`` and ``decoder.onnx`` of a composed captioner (LoRA merged) in ``out``; batch and
    sequence axes dynamic."""
    model = model.eval().float()
    side = model.preprocess.image_size
    encoder, decoder = (out / name for name in text_files("fp32"))
    graph = static_padding(EncoderGraph(model), side)
    pixels = torch.zeros(2, 3, side, side)
    export_graph(graph, encoder, {INPUT: pixels}, {MEMORY: {0: "batch"}}, {INPUT: {0: "batch"}})
    with torch.no_grad():
        memory = graph(pixels)
    # Two rows of three tokens: no axis of the example has length 1, which the tracer would fold into a constant.
    ids = torch.tensor([[model.tokenizer.cls_token_id, 1996, 2003]] * 2)
    export_graph(DecoderGraph(model), decoder, {IDS: ids, MEMORY: memory}, {LOGITS: {0: "batch"}},
                 {IDS: {0: "batch", 1: "sequence"}, MEMORY: {0: "batch"}})
    return encoder, decoder


def text_model_and_data(run_dir: Path, splits, calibration_images: int, max_val_images: int):
    """The run's captioner (LoRA merged), its validation rows (``tasks.TextRows``) and preprocessed training
    images that calibrate the int8 encoder (None: dynamic)."""
    from ..images import decode_unique, normalize
    from ..tasks import TextRows
    from ..vlm import load_image_text_model

    model = load_image_text_model(run_dir / "model").eval()
    pre, val, train = model.preprocess, splits["validation"], splits["train"]
    if max_val_images and len(val) > max_val_images:
        val = val.shuffle(seed=0).select(range(max_val_images))
    rows = TextRows(val, pre.image_size, model.task, False, 0)
    calibration = None
    if calibration_images:
        picked = train.shuffle(seed=0).select(range(min(calibration_images, len(train))))
        calibration = normalize(decode_unique(picked, pre.image_size)[0], pre.mean, pre.std).numpy()
    return model, rows, calibration


def text_lab(model, out: Path, rows, calibration, quantize, int8_options, latency_runs: int) -> dict:
    """Every variant (torch fp32, onnx fp32 / int8 / fp16) generating for the validation rows: the task's metric,
    its delta to PyTorch, agreement (identical texts), size and the latency of one whole generation at batch 1."""
    from ..images import normalize
    from ..tasks import MAX_NEW_TOKENS, generate_texts

    task, tok, pre = model.task, model.tokenizer, model.preprocess
    new_tokens, threads = MAX_NEW_TOKENS[task], torch.get_num_threads()
    prompts = model.prompt_ids(rows.questions, len(rows))
    pixels, image_of = normalize(rows.pixels, pre.mean, pre.std).numpy(), rows.image_of.numpy()
    reference = generate_texts(model, rows, task, new_tokens)
    first, question = rows.pixels[rows.image_of[:1]], rows.questions[:1] if rows.questions else None
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ref = text_scores(reference, rows)  # PyTorch's own scores, the deltas' zero
    rows_out = [text_row("torch fp32", "vision/ + text/ + projection.safetensors", reference, reference, ref, ref, rows, weights,
                         latency_ms(lambda _: model.generate(first, question, max_new_tokens=new_tokens), None,
                                    latency_runs))]
    files = {"fp32": export_text_fp32(model, out)}
    details = {}
    for kind in quantize:
        files[kind] = tuple(out / name for name in text_files(kind))
        details[kind] = write_variant(kind, files["fp32"], files[kind], calibration, int8_options)
    kind_of = {}
    for kind, (encoder_path, decoder_path) in files.items():
        name, label = f"onnx {kind}", f"{encoder_path.name} + {decoder_path.name}"
        kind_of[name] = kind
        size = encoder_path.stat().st_size + decoder_path.stat().st_size
        try:
            encoder, decoder = session(encoder_path, threads), session(decoder_path, threads)
        except Exception as e:  # noqa: BLE001 - a file this CPU's provider cannot run: say so, keep the others
            rows_out.append(unrunnable(text_row(name, label, reference, reference, ref, ref, rows, size, (0, 0)), e))
            continue

        def generate(idx, encoder=encoder, decoder=decoder):
            ids = generate_onnx(encoder, decoder, pixels[image_of[idx]], [prompts[i] for i in idx],
                                tok.sep_token_id, tok.pad_token_id, new_tokens)
            return [tok.decode(i, skip_special_tokens=True).strip() for i in ids]

        # Chunks of 64 rows in question-length order, as training's evaluation: a few same-length batches each.
        order, texts = sorted(range(len(rows)), key=lambda i: len(prompts[i])), [""] * len(rows)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            for i, text in zip(idx, generate(idx)):
                texts[i] = text
        rows_out.append(text_row(name, label, texts, reference, text_scores(texts, rows), ref, rows, size,
                                 latency_ms(lambda _: generate([0]), None, latency_runs)))
    metric = "vqa_accuracy" if task == "vqa" else "cider"
    return {"task": task, "metric": metric, "image_size": pre.image_size, "num_val": len(rows),
            "input": f"{INPUT} -> {MEMORY}; {IDS}, {MEMORY} -> {LOGITS}", "output": "generated text",
            "max_new_tokens": new_tokens, "kv_cache": False, "prompt_tuned": model._prompts() is not None,
            **machine(threads, latency_runs), "quantization": details, "variants": rows_out,
            **conclude(rows_out, kind_of)}


def write_variant(kind: str, fp32: tuple[Path, Path], paths: tuple[Path, Path], calibration, int8_options) -> dict:
    """The int8 or fp16 encoder and decoder written to ``paths`` from the fp32 files; returns what was done.

    int8: the encoder as the classifier (static, calibrated on training images: dynamic lost 8 points on the VQA
    sample, bench/RESULTS.md); the decoder dynamic, the standard for transformer decoders (activations quantised
    per call, nothing to calibrate), from a copy whose word embeddings no longer share the LM head's initializer.
    """
    if kind == "fp16":
        return {part: convert_fp16(src, dst) for part, src, dst in zip(PARTS, fp32, paths)}
    method, keep_fp32, activations = int8_options
    untied = paths[1].with_name("decoder_untied.onnx")
    try:
        copies = untie_gathers(fp32[1], untied)
        return {"encoder": quantize_int8(fp32[0], paths[0], calibration, method=method, keep_fp32=keep_fp32,
                                         activations=activations),
                "decoder": {**quantize_int8(untied, paths[1], None, keep_fp32=(), pre_process=False),
                            "untied_embeddings": copies}}
    finally:
        untied.unlink(missing_ok=True)


def text_scores(texts: list[str], rows) -> dict:
    """The task's main metric (VQA accuracy, CIDEr-D) and exact match of ``texts`` against the rows' references."""
    from ..metrics import caption_metrics, vqa_metrics

    if not texts:
        return {}
    found = vqa_metrics(texts, rows.references) if rows.questions else caption_metrics(texts, rows.references)
    return {"main": found["vqa_accuracy" if rows.questions else "cider"], "exact_match": found["exact_match"]}


def text_row(name: str, file: str, texts: list[str], reference: list[str], own: dict, ref: dict, rows,
             size_bytes: int, latency: tuple[float, float]) -> dict:
    """One row of the lab table: ``accuracy`` holds the task's main metric (``own``: ``text_scores`` of ``texts``;
    ``ref``: PyTorch's), the column the Deploy table reads; ``agreement`` is the share of rows whose text is
    PyTorch's, character for character."""
    main = own.get("main")
    return {"variant": name, "file": file, "accuracy": None if main is None else round(main, 5),
            "delta_points": None if main is None else round(100 * (main - ref["main"]), 2),
            "exact_match": None if main is None else round(own["exact_match"], 5),
            "agreement": round(float(np.mean([a == b for a, b in zip(texts, reference)])), 5) if texts else None,
            "max_abs_logit_diff": None, "logit_std_ratio": None,
            "size_mb": round(size_bytes / 1e6, 3), "latency_ms_p50": latency[0], "latency_ms_p95": latency[1],
            "best": False, "warning": "", "examples": [{"question": rows.questions[i] if rows.questions else None,
                                                        "text": texts[i]} for i in range(min(3, len(texts)))]}
