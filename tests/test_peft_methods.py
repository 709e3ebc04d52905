"""The PEFT methods of mmdemo.peft_methods on tiny timm networks (a ViT and an EfficientNet): what trains,
save / reload with equal outputs, merging, the adapter loadable with peft itself."""

import copy

import pytest
import torch

from mmdemo.errors import UserInputError
from mmdemo.models import apply_method, build_classifier, count_parameters, load_classifier, save_classifier
from mmdemo.peft_methods import ADDED_METHODS, PEFT_METHODS, PROMPT_TOKENS, touched_layers

LABELS = ["a", "b", "c"]
# The parameter names each peft method adds.
PEFT_PARAMS = {"dora": ("lora_",), "ia3": ("ia3_l",), "loha": ("hada_",), "lokr": ("lokr_",), "oft": ("oft_",)}


def classifier(name):
    torch.manual_seed(0)
    clf, _ = build_classifier(name, LABELS, pretrained=False)
    return clf.eval()


def perturb(clf):
    """Moves every trainable tensor off its initial value (several methods start as the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def outputs(clf):
    x = torch.randn(2, 3, clf.preprocess.image_size, clf.preprocess.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return clf.eval()(x)


def head_params(clf):
    return sum(p.numel() for p in clf.net.get_classifier().parameters())


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_method_trains_adapter_and_head_saves_merged_and_loads_with_peft(tmp_path, name, method):
    from peft import PeftModel

    clf = classifier(name)
    base = copy.deepcopy(clf.net)
    head = head_params(clf)
    apply_method(clf, method, lora_r=4, lora_alpha=8)
    trainable = [n for n, p in clf.named_parameters() if p.requires_grad]
    # Only the method's own tensors and the head's trainable copy: no base weight trains.
    assert trainable and all(any(k in n for k in PEFT_PARAMS[method]) or "modules_to_save" in n for n in trainable)
    added = sum(p.numel() for n, p in clf.named_parameters() if p.requires_grad and "modules_to_save" not in n)
    assert count_parameters(clf)[0] == added + head and added > 0
    assert len(touched_layers(clf, method)) >= 2
    perturb(clf)
    expected = outputs(clf)

    save_classifier(clf, tmp_path / "model")
    clf.net.save_pretrained(tmp_path / "adapter")
    # The saved folder holds the merged network: it loads without peft and gives the same outputs.
    merged = load_classifier(tmp_path / "model")
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(outputs(merged), expected, atol=1e-3, rtol=1e-3)  # merging rounds
    # The adapter alone, on the original base, loads with peft's own loader.
    clf.net = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(outputs(clf), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ADDED_METHODS)
def test_added_method_trains_only_its_modules_and_reloads_equal(tmp_path, method):
    clf = classifier("test_vit")
    dim, blocks, head = clf.net.embed_dim, len(clf.net.blocks), head_params(clf)
    apply_method(clf, method, lora_r=4, lora_alpha=8)
    # Counted by hand: two bottlenecks (attention and MLP outputs) per block, or the prompt tokens.
    added = blocks * 2 * (dim * 4 + 4 + 4 * dim + dim) if method == "adapter" else PROMPT_TOKENS * dim
    assert count_parameters(clf)[0] == added + head
    assert all(".extra." in n or n.startswith("net.head.") for n, p in clf.named_parameters() if p.requires_grad)
    assert len(touched_layers(clf, method)) == (2 * blocks if method == "adapter" else 1)
    perturb(clf)
    expected = outputs(clf)

    save_classifier(clf, tmp_path / "model")
    assert (tmp_path / "model" / "adapter" / "added.safetensors").is_file()
    reloaded = load_classifier(tmp_path / "model")
    assert sum(p.numel() for n, p in reloaded.named_parameters() if ".extra." in n) == added
    # config.json's model_args rebuild the ViT at its own size: the position embedding is not resampled
    torch.testing.assert_close(outputs(reloaded), expected, atol=1e-5, rtol=1e-5)
    # Not mergeable: the timm folder alone is the base network with the trained head, which differs.
    import timm

    bare = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, clf.preprocess.image_size, clf.preprocess.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(bare(x), expected, atol=1e-2)


def test_added_method_on_a_cnn_names_the_methods_that_apply():
    clf = classifier("test_efficientnet")
    with pytest.raises(UserInputError, match="vision transformers.*Use lora, dora"):
        apply_method(clf, "vpt")
