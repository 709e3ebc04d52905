"""The model card text of a retrieval run: its recall figures, example queries and how to load it."""

from __future__ import annotations

RECALLS = (("t2i", "text → image"), ("i2t", "image → text"))


def retrieval_card_lines(repo: str, family: str, meta: dict, report: dict, origin: str, method: str) -> list[str]:
    what = ("A LiT-style dual encoder (EfficientNet-Lite0 image tower, MiniLM-L6 text tower, MLP projections to a "
            "shared space)" if family == "lit" else "A CLIP / SigLIP dual encoder")
    lines = [f"{what} fine-tuned from {origin} with mmdemo (method `{method}`, loss `{meta.get('loss', 'infonce')}`) "
             "for image-text retrieval and zero-shot classification.", "", "## Evaluation", ""]
    if "t2i_recall@1" not in report:
        lines += ["This run has no final evaluation (eval.json).", ""]
    else:
        lines += [f"On {report.get('num_val', '?')} held-out images and their {report.get('num_val_captions', '?')} "
                  "distinct captions (a query is a hit at k when any true match is among its k best):", "",
                  "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {report[f'{d}_recall@1']:.4f} | {report[f'{d}_recall@5']:.4f} | "
                  f"{report[f'{d}_recall@10']:.4f} | {report[f'{d}_median_rank']:g} |" for d, label in RECALLS] + [""]
        for example in report.get("examples", [])[:3]:
            top = ", ".join(f"`{t['file_name']}`{'' if t['match'] else ' (✗)'}" for t in example["top"])
            lines.append(f"- \"{example['query']}\" → {top}")
        lines.append("")
    if family == "lit":
        return lines + _lit_usage(repo, meta)
    return lines + ["## Use it", "", "```python", "from transformers import AutoModel, pipeline", "",
                    f'pipe = pipeline("zero-shot-image-classification", model="{repo}")',
                    'print(pipe("image.jpg", candidate_labels=["a red circle", "a blue triangle"]))',
                    f'model = AutoModel.from_pretrained("{repo}")  # get_image_features / get_text_features', "```", ""]


def _lit_usage(repo: str, meta: dict) -> list[str]:
    pre = meta.get("preprocess", {})
    size, mean, std = pre.get("image_size", "?"), pre.get("mean", "?"), pre.get("std", "?")
    return [
        "## Use it", "",
        "With mmdemo (the `mmdemo/` package of the app that trained it, on the Python path):", "",
        "```python", "from huggingface_hub import snapshot_download", "from PIL import Image",
        "from mmdemo.zeroshot import zero_shot_batch", "",
        f'folder = snapshot_download("{repo}")',
        'print(zero_shot_batch([Image.open("image.jpg")], "red circle, blue triangle", folder, template="a {}"))',
        "```", "",
        "Its parts load with their own libraries:", "",
        "- `vision/`: the image tower, a timm folder (`tf_efficientnet_lite0`, no classifier: pooled 1280-d features);",
        "- `text/`: the text tower, a transformers `BertModel` (MiniLM-L6) and its tokenizer; mean-pool the token "
        "states over the attention mask;",
        "- `projection.safetensors`: `image_proj.*` and `text_proj.*` (LayerNorm, Linear to 512, GELU, Linear to 256), "
        "`logit_scale` (log of the inverse temperature) and `logit_bias`;",
        "- `mmdemo.json`: the loss and the preprocessing.", "",
        "```python", "import timm", "import torch", "from safetensors.torch import load_file",
        "from transformers import BertModel, BertTokenizerFast", "",
        'image_tower = timm.create_model(f"local-dir:{folder}/vision", pretrained=True).eval()',
        'text_tower = BertModel.from_pretrained(f"{folder}/text").eval()',
        'tokenizer = BertTokenizerFast.from_pretrained(f"{folder}/text")',
        'state = load_file(f"{folder}/projection.safetensors")',
        "",
        "def mlp(prefix, x):  # the projection head",
        "    x = torch.nn.functional.layer_norm(x, x.shape[-1:], state[f'{prefix}.0.weight'], state[f'{prefix}.0.bias'])",
        "    x = torch.nn.functional.gelu(x @ state[f'{prefix}.1.weight'].T + state[f'{prefix}.1.bias'])",
        "    return torch.nn.functional.normalize(x @ state[f'{prefix}.3.weight'].T + state[f'{prefix}.3.bias'], dim=-1)",
        "```", "",
        f"Images: the shorter side resized to {size} px (bicubic), centre-cropped to {size} x {size}, scaled to [0, 1] "
        f"and normalised with mean {mean} and std {std}. Texts: at most {meta.get('text_max_length', 64)} tokens.", ""]
