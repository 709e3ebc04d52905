"""The parameter-efficient methods beyond LoRA and BitFit, for classifiers.

- through peft: ``dora`` (LoRA with a learned magnitude), ``ia3`` (learned per-channel scales),
  ``loha`` / ``lokr`` (Hadamard / Kronecker low-rank updates), ``oft`` (orthogonal block rotations).
  They touch the same layers as LoRA (``lora_targets``: linear layers and ungrouped 1x1 convolutions,
  the head excluded), the head trains in full (``modules_to_save``); the adapter is saved with
  ``save_pretrained`` (loadable with ``PeftModel.from_pretrained``) and merged into the saved model.
- here, as small modules (peft has neither for vision models): ``adapter`` (Houlsby bottleneck adapters
  after each attention and MLP output projection of a vision transformer) and ``vpt`` (visual prompt
  tuning: learned tokens inserted after the class token, before the first block). Neither can be
  merged: the saved model folder holds the base network with its trained head, ``adapter/`` the added
  weights, and mmdemo.json the recipe that puts them back (``load_added``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError

PEFT_METHODS = ("dora", "ia3", "loha", "lokr", "oft")
ADDED_METHODS = ("adapter", "vpt")
METHODS = PEFT_METHODS + ADDED_METHODS
# Visual prompt tuning: the shallow variant's usual length.
PROMPT_TOKENS = 10
# OFT rotates blocks of this many input channels; peft picks a smaller divisor where a layer needs one.
OFT_BLOCK = 8
ADDED_FILE, ADDED_CONFIG = "added.safetensors", "mmdemo_added.json"
# The output projections of attention and MLP: timm ViTs, transformers ViT / DeiT / BEiT.
ADAPTER_SUFFIXES = ("attn.proj", "mlp.fc2", "attention.output.dense", "output.dense")


def apply_peft_method(clf, method: str, r: int, alpha: int, targets: list[str]) -> None:
    """Wraps ``clf.net`` for ``method``: a peft model, or the network with added modules."""
    if method in PEFT_METHODS:
        from peft import get_peft_model

        clf.net = get_peft_model(clf.net, peft_config(method, r, alpha, targets, clf.head_name))
        return
    sites = added_sites(clf.net, method)
    if not sites:
        raise UserInputError(f"Method '{method}' applies to vision transformers (e.g. a timm vit_* model or "
                             f"google/vit-base-patch16-224-in21k); '{clf.base_model}' has no transformer blocks. "
                             "Use lora, dora, ia3, loha, lokr, oft or bitfit for it.")
    wrap_sites(clf.net, method, sites, r if method == "adapter" else PROMPT_TOKENS)
    clf.net.get_submodule(clf.head_name).requires_grad_(True)


def peft_config(method: str, r: int, alpha: int, targets: list[str], head: str):
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    common = dict(target_modules=targets, modules_to_save=[head])
    if method == "dora":
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=True, **common)
    if method == "ia3":  # scales the outputs of every target (no layer treated as feed-forward input)
        return IA3Config(feedforward_modules=[], **common)
    if method == "loha":
        return LoHaConfig(r=r, alpha=alpha, **common)
    if method == "lokr":
        return LoKrConfig(r=r, alpha=alpha, **common)
    return OFTConfig(oft_block_size=OFT_BLOCK, **common)


def applicable(net: nn.Module, method: str) -> bool:
    """Whether ``method`` can adapt this network (the peft methods need a linear or 1x1-conv layer)."""
    return bool(added_sites(net, method)) if method in ADDED_METHODS else True


# ---------------------------------------------------------------------------------------------
# Added modules: bottleneck adapters and visual prompts


class Bottleneck(nn.Module):
    """Houlsby adapter: x + up(gelu(down(x))), ``up`` zero-initialised so training starts at the base model."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, size), nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(nn.functional.gelu(self.down(x)))


class Prompts(nn.Module):
    """Learned tokens inserted after the ``prefix`` tokens (class / distillation) of a token sequence."""

    def __init__(self, dim: int, tokens: int, prefix: int):
        super().__init__()
        self.prefix = prefix
        self.tokens = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def forward(self, x):
        p = self.tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :self.prefix], p, x[:, self.prefix:]], dim=1)


class Added(nn.Module):
    """A module followed by an added one: ``extra(base(...))``."""

    def __init__(self, base: nn.Module, extra: nn.Module):
        super().__init__()
        self.base, self.extra = base, extra

    def forward(self, *args, **kwargs):
        return self.extra(self.base(*args, **kwargs))


def added_sites(net: nn.Module, method: str) -> dict[str, dict]:
    """Where ``method`` adds modules: {module name: what to build there}."""
    if method == "adapter":
        return {name: {"dim": m.out_features} for name, m in net.named_modules()
                if isinstance(m, nn.Linear) and name.endswith(ADAPTER_SUFFIXES) and ".base" not in name}
    if method == "vpt":
        if hasattr(net, "patch_embed") and hasattr(net, "norm_pre") and hasattr(net, "num_prefix_tokens"):
            return {"norm_pre": {"dim": net.embed_dim, "prefix": int(net.num_prefix_tokens)}}  # timm ViT
        for name, m in net.named_modules():  # transformers ViT-like: the embeddings module
            if hasattr(m, "cls_token") and hasattr(m, "patch_embeddings"):
                prefix = 1 + int(getattr(m, "distillation_token", None) is not None)
                return {name: {"dim": m.cls_token.shape[-1], "prefix": prefix}}
    return {}


def wrap_sites(net: nn.Module, method: str, sites: dict, size: int) -> None:
    for name, site in sites.items():
        extra = Bottleneck(site["dim"], size) if method == "adapter" else \
            Prompts(site["dim"], size, site["prefix"])
        net.set_submodule(name, Added(net.get_submodule(name), extra))


def added_modules(net: nn.Module) -> dict[str, Added]:
    return {name: m for name, m in net.named_modules() if isinstance(m, Added)}


def strip_added(net: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``net`` without the added modules, and their state {module name: state_dict}."""
    found = added_modules(net)
    if not found:
        return net, {}
    net = copy.deepcopy(net)
    states = {}
    for name in found:
        wrapper = net.get_submodule(name)
        states[name] = {k: v.detach().float().contiguous() for k, v in wrapper.extra.state_dict().items()}
        net.set_submodule(name, wrapper.base)
    return net, states


def save_added(method: str, sites: dict, size: int, states: dict, folder: Path) -> dict:
    """Writes the added weights and their recipe into ``folder``; returns the recipe (for mmdemo.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}, str(folder / ADDED_FILE))
    recipe = {"method": method, "size": size, "sites": sites, "file": f"{folder.name}/{ADDED_FILE}"}
    (folder / ADDED_CONFIG).write_text(json.dumps(recipe, indent=2))
    return recipe


def load_added(net: nn.Module, recipe: dict, model_dir: Path) -> None:
    """Puts the added modules of a saved model back (``recipe``: what ``save_added`` returned)."""
    from safetensors.torch import load_file

    wrap_sites(net, recipe["method"], recipe["sites"], recipe["size"])
    weights = load_file(str(Path(model_dir) / recipe["file"]))
    for name, wrapper in added_modules(net).items():
        wrapper.extra.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})


def recipe_of(net: nn.Module) -> tuple[str, dict, int] | None:
    """(method, sites, size) of a network with added modules, else None."""
    found = added_modules(net)
    if not found:
        return None
    first = next(iter(found.values())).extra
    if isinstance(first, Bottleneck):
        sites = {name: {"dim": m.extra.up.out_features} for name, m in found.items()}
        return "adapter", sites, first.down.out_features
    sites = {name: {"dim": m.extra.tokens.shape[-1], "prefix": m.extra.prefix} for name, m in found.items()}
    return "vpt", sites, first.tokens.shape[1]


def touched_layers(clf, method: str) -> list[str]:
    """The modules ``method`` adapts (besides the head, which trains in every method but full)."""

    net = clf.net.get_base_model() if hasattr(clf.net, "get_base_model") else clf.net
    if method in ADDED_METHODS:
        return sorted(added_sites(net, method)) or sorted(added_modules(net))
    if method in PEFT_METHODS or method == "lora":
        return clf.family_spec.lora_targets(net, clf.head_name)
    if method == "bitfit":
        return sorted({n.rsplit(".", 1)[0] for n, p in net.named_parameters() if n.endswith("bias")})
    return []
