"""The model card of a run (Hub metadata and text) and its loss curve.

Metadata the Hub reads: library_name, pipeline_tag, base_model and datasets (only when Hub ids), license,
tags, and a model-index built from eval.json. Classification runs are ``image-classification`` (timm or
transformers); captioning and VQA runs are ``image-text-to-text``, the transformers 5 task that replaced
image-to-text and visual-question-answering.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..runs import meta_labels
from ..taskspec import TASK_SPECS
from .rundir import CONFIG_FILE, hub_base_model, hub_dataset, public_base_model, public_config, read_json, read_run

PIPELINE_TAGS = {name: spec.pipeline_tag for name, spec in TASK_SPECS.items()}
TASK_TAGS = {name: spec.hub_tag for name, spec in TASK_SPECS.items()}
TASK_NAMES = {name: spec.title for name, spec in TASK_SPECS.items()}
# eval.json key -> (model-index metric type, the name shown); the first ones go to the model-index.
TEXT_METRICS = {"captioning": {"bleu4": ("bleu", "BLEU-4"), "rouge_l": ("rouge", "ROUGE-L"),
                               "cider": ("cider", "CIDEr"), "exact_match": (None, "exact match")},
                "vqa": {"vqa_accuracy": ("accuracy", "VQA accuracy"), "exact_match": ("exact_match", "exact match")}}
# The composed family is two ecosystem models plus a projection: no single library loads it.
LIBRARIES = {"composed": "mmdemo", "fused": "mmdemo", "blip": "transformers", "git": "transformers",
             "vlm": "transformers", "lit": "mmdemo", "clip": "transformers", "answer-head": "mmdemo"}
FAMILY_NAMES = {"blip": "BLIP", "git": "GIT", "vlm": "chat VLM",
                "answer-head": "a classifier over the answers of its training questions"}
CHAT_CAPTION_PROMPT = "Describe this image in a few words."  # vlm.hf.ChatImageText._prompt's, for captioning
MAX_EXAMPLES = 10
# The fused heads (mmdemo/fusion.py's FUSION_HEADS), as the cards of image + text classifiers and closed-answer VQA
# runs describe them.
FUSIONS = {"late": "late fusion: the pooled image feature and the mean-pooled text embedding, each projected to 256, "
                   "concatenated with their product, then an MLP",
           "cross": "cross-attention: the text tokens attend to the image feature map's cells (one attention block), "
                    "then the pooled text and image go through an MLP"}


def build_model_card(run_dir, repo_id: str | None = None, merged: bool = False):
    """The model card of a run: Hub metadata (library_name, pipeline_tag, base_model and datasets only when
    Hub ids, license, tags, model-index from eval.json) and a text with the metrics, examples (captioning,
    VQA) or per-class metrics (classification), usage, the training config, the loss curve and the
    confusion matrix.

    Args:
        run_dir: the run directory.
        repo_id: the repo named in the usage snippets (default: a placeholder).
        merged: LoRA runs: the card describes a push without ``adapter/``.

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    model_dir, meta, cfg = read_run(run_dir)
    report = read_json(run_dir / "eval.json")
    family, task = meta.get("family", "timm"), meta.get("task", "classification")
    base, dataset = hub_base_model(cfg, meta), hub_dataset(cfg)
    if family == "fused" and "+" in str(cfg.get("base_model") or ""):  # Hub encoders: each part's own id
        parts = [hub_base_model({**cfg, "base_model": part}, {}) for part in str(cfg["base_model"]).split("+")]
        base = [part for part in parts if part] or None
    name = (repo_id or "").split("/")[-1] or f"mmdemo-{run_dir.name}"
    repo = repo_id or f"your-name/{name}"
    adapter = (model_dir / "adapter" / "adapter_config.json").is_file() and not merged  # a peft adapter
    results = _eval_results(report, task, dataset)
    peft_tag = "prompt-tuning" if meta.get("prompt_tuning") else "lora"
    tags = [TASK_TAGS[task], "mmdemo", family, cfg.get("method", "full")] + (["peft", peft_tag] if adapter else [])
    data = ModelCardData(library_name=LIBRARIES.get(family, family), pipeline_tag=PIPELINE_TAGS[task],
                         base_model=base, datasets=[dataset] if dataset else None,
                         license=_license(model_dir, family), tags=tags,
                         metrics=list(dict.fromkeys(r.metric_type for r in results)) or None, model_name=name,
                         eval_results=results or None)
    lines = [f"# {name}", ""]
    if task == "retrieval":
        from .retrieval_card import retrieval_card_lines

        lines += retrieval_card_lines(repo, family, meta, report, _origin(cfg, meta, base), cfg.get("method", ""))
    elif task in ("classification", "image_text_classification"):
        lines += [_card_intro(meta, cfg, base), "", *_card_metrics(report)]
        if (run_dir / "confusion_matrix.png").is_file():
            lines += ["![confusion matrix](confusion_matrix.png)", ""]
        if task == "classification":
            if meta.get("added_modules"):  # the plain loaders would give other predictions: say so first
                lines += _added_usage(repo, meta["added_modules"]["method"])
            lines += _card_usage(repo, family, adapter, model_dir, len(meta.get("id2label", {})),
                                 heading=not meta.get("added_modules"))
        else:
            lines += _fused_usage(repo, meta, report)
    else:
        lines += [_text_intro(meta, cfg, base), "", *_text_metrics(report, task), *_text_examples(report, task)]
        lines += _text_usage(repo, family, task, meta, adapter)
    lines += ["## Training", ""]
    if any(_losses(run_dir / "metrics.jsonl")):  # exactly when export_run draws loss_curve.png
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += [f"The configuration (`{CONFIG_FILE}`, local paths removed):", "", "```yaml",
              yaml.safe_dump(public_config(cfg), sort_keys=False).strip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def _eval_results(report: dict, task: str, dataset: str | None) -> list:
    from huggingface_hub import EvalResult

    local = {"classification": "local image folder", "captioning": "local image-caption dataset",
             "vqa": "local visual question answering dataset",
             "image_text_classification": "local image + text dataset",
             "retrieval": "local image-caption dataset"}[task]
    where = {"task_type": PIPELINE_TAGS[task], "task_name": TASK_NAMES[task], "dataset_split": "validation",
             "dataset_type": dataset or "imagefolder", "dataset_name": dataset or local}
    if task == "retrieval":
        return [EvalResult(metric_type="recall", metric_name=f"{label} R@{k}", metric_value=report[f"{d}_recall@{k}"],
                           **where) for d, label in (("t2i", "text-to-image"), ("i2t", "image-to-text"))
                for k in (1, 5) if f"{d}_recall@{k}" in report]
    if task not in ("classification", "image_text_classification"):
        return [EvalResult(metric_type=kind, metric_name=label, metric_value=report[key], **where)
                for key, (kind, label) in TEXT_METRICS[task].items() if kind and key in report]
    if "accuracy" not in report:
        return []
    results = [EvalResult(metric_type="accuracy", metric_value=report["accuracy"], **where)]
    if f1 := [c["f1"] for c in report.get("per_class", {}).values()]:
        results.append(EvalResult(metric_type="f1", metric_name="macro F1", metric_value=round(sum(f1) / len(f1), 4),
                                  **where))
    return results


def _origin(cfg: dict, meta: dict, base: str | list[str] | None) -> str:
    public = public_base_model(cfg.get("base_model") or meta.get("base_model", ""))
    if isinstance(base, list):
        return " + ".join(f"[{b}](https://huggingface.co/{b})" for b in base)
    return f"[{base}](https://huggingface.co/{base})" if base else f"`{public or 'a local model'}`"


def _license(model_dir: Path, family: str) -> str:
    # timm configs carry their weights' licence (the composed family's encoder is a timm folder);
    # otherwise the base model's own card decides: "other".
    config = {"timm": model_dir / "config.json", "composed": model_dir / "vision/config.json",
              "fused": model_dir / "vision/config.json", "lit": model_dir / "vision/config.json",
              "answer-head": model_dir / "vision/config.json"}.get(family)
    return (read_json(config).get("pretrained_cfg", {}) if config else {}).get("license") or "other"


# --- classification ------------------------------------------------------------------------------


def _card_intro(meta: dict, cfg: dict, base: str | None) -> str:
    labels = meta_labels(meta)
    kind = "An image + text classifier (an image and a text in, one label out)" \
        if meta.get("task") == "image_text_classification" else "An image classifier"
    return (f"{kind} fine-tuned from {_origin(cfg, meta, base)} with mmdemo (method "
            f"`{cfg.get('method', 'full')}`) on {len(labels)} classes: {', '.join(f'`{label}`' for label in labels)}.")


def _card_metrics(report: dict) -> list[str]:
    if "accuracy" not in report:
        return ["## Evaluation", "", "This run has no final evaluation (eval.json).", ""]
    summary = (f"On {report.get('num_val', '?')} validation images: accuracy **{report['accuracy']:.4f}**, "
               f"validation loss {report.get('val_loss', float('nan')):.4f}.")
    lines = ["## Evaluation", "", summary, "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    return lines + [f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                    for c, m in report.get("per_class", {}).items()] + [""]


def _card_usage(repo_id: str, family: str, adapter: bool, model_dir: Path, num_labels: int,
                heading: bool = True) -> list[str]:
    lines = ["## Use it", ""] * heading + ["```python", "from transformers import pipeline", "",
             f'pipe = pipeline("image-classification", model="{repo_id}")', 'print(pipe("image.jpg"))', "```", ""]
    if family == "timm":
        lines += ["```python", "import timm", "", f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
                  "```", ""]
    if adapter:
        arch = read_json(model_dir / "config.json").get("architecture", "BASE_MODEL")
        base = (f'timm.create_model("{arch}", num_classes={num_labels})' if family == "timm"
                else "the base model with the same classes")
        lines += [_ADAPTER_NOTE, "", "```python", "from peft import PeftModel", "",
                  f"base = {base}", f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="adapter")',
                  "```", ""]
    return lines


def _added_usage(repo_id: str, method: str) -> list[str]:
    """The card's warning for a method that adds modules timm and transformers cannot express."""
    return ["## Use it", "", _ADDED_NOTE.format(method=method), "", "```python",
            "from huggingface_hub import snapshot_download", "from mmdemo.models import load_classifier", "",
            f'model = load_classifier(snapshot_download("{repo_id}")).eval()  # the network with its {method} modules',
            "```", "", "Without them (the base network and its trained head only; **not** this model's predictions):", ""]


_ADDED_NOTE = ("**Trained with `{method}`, which adds modules that timm and transformers cannot express and that "
               "cannot be merged into the weights.** The top-level weights are the base network with its trained head "
               "only: `timm.create_model` and the `image-classification` pipeline load them, but they do **not** "
               "reproduce this model's predictions. `adapter/added.safetensors` holds the added modules and "
               "`adapter/mmdemo_added.json` where they go; mmdemo puts them back:")
_ADAPTER_NOTE = ("`adapter/` holds the peft adapter (LoRA, DoRA, IA3, LoHa, LoKr or OFT); the top-level weights are that adapter merged into the "
                 "base model, so they load without peft.")


# --- captioning and VQA --------------------------------------------------------------------------


def _text_intro(meta: dict, cfg: dict, base: str | None) -> str:
    what = "An image captioning model" if meta.get("task") == "captioning" else "A visual question answering model"
    method, size = cfg.get("method", "full"), meta.get("preprocess", {}).get("image_size", "?")
    if meta.get("family") != "composed":
        kind = FAMILY_NAMES.get(meta.get("family"), meta.get("family"))
        return (f"{what} ({kind}) fine-tuned from {_origin(cfg, meta, base)} with mmdemo (method `{method}`, "
                f"{size} px images).")
    start = "pretrained" if cfg.get("pretrained", True) else "randomly initialised"
    return (f"{what} that mmdemo composes from two {start} parts, trained together (method `{method}`, {size} px "
            "images): an EfficientNet-Lite0 image encoder (timm) whose feature map a small projection turns into "
            "the memory of a MiniLM-L6 text decoder (BERT, initialised from sentence-transformers/all-MiniLM-L6-v2), "
            "which reads it through cross-attention.")


def _text_metrics(report: dict, task: str) -> list[str]:
    if "val_loss" not in report:
        return ["## Evaluation", "", "This run has no final evaluation (eval.json).", ""]
    lines = ["## Evaluation", "", f"On {report.get('num_val', '?')} validation images, greedy decoding:", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {report[key]:.4f} |" for key, (_, label) in TEXT_METRICS[task].items() if key in report]
    return lines + [f"| validation loss | {report['val_loss']:.4f} |", ""]


def _text_examples(report: dict, task: str) -> list[str]:
    examples = report.get("examples") or []
    if not examples:
        return []
    vqa = task == "vqa"
    lines = ["### Examples", "", f"The first {min(len(examples), MAX_EXAMPLES)} validation images: the reference "
             f"{'answers' if vqa else 'captions'} against the model's.", "",
             "| row | question | reference | predicted |" if vqa else "| row | reference | predicted |",
             "|---|---|---|---|" if vqa else "|---|---|---|"]
    for ex in examples[:MAX_EXAMPLES]:
        refs = list(dict.fromkeys(ex.get("references") or []))
        cells = [str(ex.get("row", "")), *([_cell(ex.get("question"))] if vqa else []),
                 _cell(" / ".join(refs[:3]) + (" / ..." if len(refs) > 3 else "")), _cell(ex.get("predicted"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _cell(text) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def _text_usage(repo: str, family: str, task: str, meta: dict, adapter: bool) -> list[str]:
    lines = ["## Use it", ""]
    question = "what color is it?"
    if family == "composed":
        return lines + _composed_usage(repo, task, meta)
    if family == "answer-head":
        return lines + _answer_head_usage(repo, meta)
    if family == "blip" and task == "vqa":
        lines += ["```python", "from PIL import Image",
                  "from transformers import BlipForQuestionAnswering, BlipProcessor", "",
                  f'processor = BlipProcessor.from_pretrained("{repo}")',
                  f'model = BlipForQuestionAnswering.from_pretrained("{repo}")',
                  f'inputs = processor(images=Image.open("image.jpg").convert("RGB"), text="{question}", '
                  'return_tensors="pt")',
                  "print(processor.decode(model.generate(**inputs, max_new_tokens=10)[0], skip_special_tokens=True))",
                  "```", ""]
    else:
        lines += ["```python", "from transformers import pipeline", "",
                  f'pipe = pipeline("image-text-to-text", model="{repo}")']
        if family == "blip":
            lines += ['print(pipe(images="image.jpg", text="", max_new_tokens=30)[0]["generated_text"])']
        elif family == "git":
            # GIT was fine-tuned to continue "[CLS]" (VQA: "[CLS] question"), the [SEP] a plain call adds
            # would start it elsewhere.
            prompt = "[CLS]" if task == "captioning" else f"[CLS] {question}"
            lines += [f"# GIT continues \"{prompt}\", as in fine-tuning: no [SEP] after the prompt",
                      f'out = pipe(images="image.jpg", text="{prompt}", add_special_tokens=False, '
                      "return_full_text=False, max_new_tokens=30)", 'print(out[0]["generated_text"].strip())']
        else:
            text = CHAT_CAPTION_PROMPT if task == "captioning" else question
            lines += ['messages = [{"role": "user", "content": [{"type": "image", "url": "image.jpg"},',
                      f'{" " * 41}{{"type": "text", "text": "{text}"}}]}}]',
                      'out = pipe(text=messages, return_full_text=False, max_new_tokens=30)',
                      'print(out[0]["generated_text"].strip())']
        lines += ["```", ""]
    if adapter:
        lines += [_ADAPTER_NOTE + " Load it with `PeftModel.from_pretrained(base_model, repo_id, "
                  "subfolder=\"adapter\")`.", ""]
    return lines


def _with_mmdemo(repo: str, parts: str, function: str, call: list[str]) -> list[str]:
    """How the mmdemo-only families load: the sentence (``parts`` completes "two ecosystem models and ..."), the
    snippet that calls ``mmdemo.inference.function`` (``call``: its last lines), and the parts list's heading."""
    return [f"No single library class loads this model: it is two ecosystem models and {parts}. With mmdemo "
            "(the `mmdemo/` package of the app that trained it, on the Python path):", "",
            "```python", "from huggingface_hub import snapshot_download", "from PIL import Image",
            f"from mmdemo.inference import {function}", "", f'folder = snapshot_download("{repo}")', *call, "```", "",
            "Its parts load with their own libraries:", ""]


def _images_sentence(meta: dict) -> str:
    """The preprocessing of ``meta`` (mmdemo.json) in words."""
    pre = meta.get("preprocess", {})
    size, mean, std = pre.get("image_size", "?"), pre.get("mean", "?"), pre.get("std", "?")
    return (f"Images: the shorter side resized to {size} px (bicubic), centre-cropped to {size} x {size}, scaled to "
            f"[0, 1] and normalised with mean {mean} and std {std}.")


def _composed_usage(repo: str, task: str, meta: dict) -> list[str]:
    call = "caption(image, folder)" if task == "captioning" else 'answer(image, "what color is it?", folder)'
    layout = ("`[CLS] caption [SEP]`, generated from `[CLS]`" if task == "captioning"
              else "`[CLS] question [SEP] answer [SEP]`, the answer generated after the question's `[SEP]`")
    return [
        *_with_mmdemo(repo, "a projection", call.split("(")[0], ['image = Image.open("image.jpg")', f"print({call})"]),
        "- `vision/`: the image encoder, a timm folder (`tf_efficientnet_lite0`, no classifier);",
        "- `text/`: the decoder, a `BertLMHeadModel` with cross-attention, and its tokenizer;",
        "- `projection.safetensors`: `proj.*` (Linear from the encoder's 1280 channels to the decoder's width, "
        "then LayerNorm) and `pos` (a learned position per feature-map cell), which turn the encoder's feature "
        "map into the decoder's `encoder_hidden_states`;",
        "- `mmdemo.json`: the task and the preprocessing.", "",
        "```python", "import timm", "from transformers import BertLMHeadModel, BertTokenizerFast", "",
        'encoder = timm.create_model(f"local-dir:{folder}/vision", pretrained=True)',
        'decoder = BertLMHeadModel.from_pretrained(f"{folder}/text")',
        'tokenizer = BertTokenizerFast.from_pretrained(f"{folder}/text")', "```", "",
        f"{_images_sentence(meta)} Sequences: {layout}.", ""]


def _answer_head_usage(repo: str, meta: dict) -> list[str]:
    answers = meta_labels(meta)
    shown = ", ".join(f"`{a}`" for a in answers[:20]) + (f" and {len(answers) - 20} more" if len(answers) > 20 else "")
    return [
        f"It answers with one of the {len(answers)} answers of its training questions: {shown}. A question whose "
        "answer is not among them gets the closest of these.", "",
        *_with_mmdemo(repo, "a fusion head over the question and the image", "answer",
                      ['print(answer(Image.open("image.jpg"), "what color is it?", folder))']),
        *_fused_parts_and_loaders(meta, "the question is its text, its outputs are the answers",
                                  "the answers (`id2label`), the task, the fusion, the preprocessing", "Questions")]


def _fused_parts(meta: dict) -> list[str]:
    if meta.get("base_model", "").startswith("efficientnet_lite0+minilm"):
        return ["- `vision/`: the image encoder, a timm folder (`tf_efficientnet_lite0`, no classifier);",
                "- `text/`: the text encoder, a transformers `BertModel` (MiniLM-L6), and its tokenizer;"]
    vision = "a timm folder (no classifier)" if meta.get("vision_library", "timm") == "timm" else \
        f"a transformers `{meta.get('vision_class', 'AutoModel')}` with its image processor"
    return [f"- `vision/`: the image encoder, {vision};",
            f"- `text/`: the text encoder, a transformers `{meta.get('text_class', 'AutoModel')}`, and its tokenizer;"]


def _fused_parts_and_loaders(meta: dict, head_use: str, json_holds: str, texts: str) -> list[str]:
    """A fused model's parts (``mmdemo.fusion``: image and text encoders, fusion head) with their loaders and
    preprocessing: ``head_use`` says what the head takes or gives, ``json_holds`` what mmdemo.json holds,
    ``texts`` what its texts are called."""
    timm_vision = meta.get("vision_library", "timm") == "timm"
    vision_class, text_class = meta.get("vision_class") or "AutoModel", meta.get("text_class") or "BertModel"
    return [
        *_fused_parts(meta),
        f"- `fusion.safetensors`: the fusion head ({FUSIONS.get(meta.get('fusion'), '')}), `FUSION_HEADS[fusion]` in "
        f"`mmdemo/fusion.py`; {head_use};",
        f"- `mmdemo.json`: {json_holds}.", "",
        "```python", "import timm" if timm_vision else f"from transformers import {vision_class}",
        "from safetensors.torch import load_file", f"from transformers import {text_class}, AutoTokenizer", "",
        'image_encoder = timm.create_model(f"local-dir:{folder}/vision", pretrained=True)' if timm_vision else
        f'image_encoder = {vision_class}.from_pretrained(f"{{folder}}/vision")',
        f'text_encoder = {text_class}.from_pretrained(f"{{folder}}/text")',
        'tokenizer = AutoTokenizer.from_pretrained(f"{folder}/text")',
        'head_state = load_file(f"{folder}/fusion.safetensors")', "```", "",
        f"{_images_sentence(meta)} {texts}: tokenised to at most {meta.get('text_max_length', 64)} tokens.", ""]


def _fused_usage(repo: str, meta: dict, report: dict) -> list[str]:
    ablation = report.get("ablation", {})
    lines = []
    if ablation:
        lines += ["### What each input contributes", "",
                  "Validation accuracy with both inputs and with one of them replaced by the learned null embedding "
                  "the model was trained with (modality dropout):", "",
                  "| inputs | accuracy |", "|---|---|"]
        lines += [f"| {label} | {ablation[key]:.4f} |" for key, label in
                  (("both", "image + text"), ("image_only", "image only"), ("text_only", "text only"),
                   ("majority_class", "the most frequent label (no model)")) if key in ablation] + [""]
    return lines + [
        "## Use it", "",
        *_with_mmdemo(repo, "a fusion head", "classify",
                      ['print(classify(Image.open("image.jpg"), folder, top_k=5, text="what color is the shape?"))']),
        *_fused_parts_and_loaders(meta, "it takes the encoder's feature map and the text's token states",
                                  "the labels (`id2label`), the fusion, the preprocessing", "Texts")]


# --- loss curve ----------------------------------------------------------------------------------


def plot_loss_curve(metrics_path, out_path) -> bool:
    """Draws the training loss (logged steps) and the validation loss (epochs) of a metrics.jsonl.

    Returns:
        False when there was nothing to draw (then no picture is written).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = _losses(metrics_path)
    if not train and not val:
        return False
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no global backend state, safe in the server's threads
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for series, label, style in ((train, "training loss", ".-"), (val, "validation loss", "o-")):
        if series:
            ax.plot(sorted(series), [series[s] for s in sorted(series)], style, label=label, markersize=4)
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    return True


def _losses(metrics_path) -> tuple[dict, dict]:
    """``({step: training loss}, {step: validation loss})`` of a metrics.jsonl (empty when there is none)."""
    train, val, path = {}, {}, Path(metrics_path)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if r.get("type") == "train" and "loss" in r:
            train[r["step"]] = r["loss"]  # a resumed run repeats steps: the last value wins
        elif r.get("type") == "eval" and "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return train, val
