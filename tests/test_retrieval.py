"""Image-text retrieval: R@k, the losses, ingest, the LiT default and tiny CLIP / SigLIP models end to end
(train -> save -> load -> search -> zero-shot), the offline zero-shot classifier and the CLI."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from mmdemo.errors import UserInputError
from mmdemo.metrics import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"


# --- R@k and the losses ---------------------------------------------------------------------------


def test_recall_at_k_and_median_rank_by_hand():
    # 3 images x 2 captions. Image 0's caption "a" ranks 2nd (behind "b"), image 1's "b" ranks 2nd, image 2's
    # "a" 1st. Text "a" (images 0 and 2): best true image 2 at 0.7 is behind image 1's 0.8 -> rank 2; text
    # "b" (image 1): 0.2 is behind 0.9 and 0.6 -> rank 3.
    m = retrieval_metrics([[0.1, 0.9], [0.8, 0.2], [0.7, 0.6]], [["a"], ["b"], ["a"]], ["a", "b"], ks=(1, 2))
    assert m["i2t_recall@1"] == pytest.approx(1 / 3) and m["i2t_recall@2"] == 1.0 and m["i2t_median_rank"] == 2
    assert m["t2i_recall@1"] == 0.0 and m["t2i_recall@2"] == 0.5 and m["t2i_median_rank"] == 2.5
    assert m["mean_recall"] == pytest.approx((1 / 3 + 1 + 0 + 0.5) / 4)


def test_recall_counts_a_duplicate_caption_as_one_candidate_and_any_true_match_as_a_hit():
    # "a red circle" is the caption of images 0 and 1 and appears twice as a column. Image 1 scores its
    # duplicate column highest, the other image's own caption "a blue square" second.
    sim = [[0.9, 0.1, 0.9], [0.5, 0.6, 0.5], [0.1, 0.8, 0.1]]
    m = retrieval_metrics(sim, [["a red circle"], ["a red circle"], ["a blue square"]],
                          ["a red circle", "a blue square", "a red circle"], ks=(1,))
    # Image 1's true caption (0.5) is behind "a blue square" (0.6): rank 2, not 3 (the duplicate is one column).
    assert m["i2t_recall@1"] == pytest.approx(2 / 3) and m["i2t_median_rank"] == 1
    # Text "a red circle" is a hit at 1 through image 0, though image 1 is below image 2; counted once.
    assert m["t2i_recall@1"] == 1.0 and m["t2i_median_rank"] == 1


def test_a_tie_with_a_wrong_candidate_counts_against_the_query():
    m = retrieval_metrics([[0.5, 0.5]], [["a"]], ["a", "b"], ks=(1,))
    assert m["i2t_recall@1"] == 0.0 and m["i2t_median_rank"] == 2


def test_duplicate_captions_of_a_batch_are_not_negatives():
    from mmdemo.dualenc import contrastive_loss

    # Pairs 0 and 1 share their caption: their texts embed identically, and their images are alike.
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(20.0)
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    plain = torch.eye(3, dtype=torch.bool)
    masked, unmasked = contrastive_loss(image, text, same, scale, None), contrastive_loss(image, text, plain, scale, None)
    assert masked < 0.05 < unmasked  # without the mask the duplicate is a hard negative: about log 2 each
    sig_same = contrastive_loss(image, text, same, scale, torch.tensor(-5.0), "sigmoid")
    sig_plain = contrastive_loss(image, text, plain, scale, torch.tensor(-5.0), "sigmoid")
    assert sig_same < sig_plain


# --- data -----------------------------------------------------------------------------------------


def small_retrieval_zip(path: Path, images: int = 48) -> Path:
    """The first `images` images of the bundled sample with their two captions each."""
    with zipfile.ZipFile(ASSETS / "sample_retrieval.zip") as src, zipfile.ZipFile(path, "w") as dst:
        rows = [json.loads(line) for line in src.read("metadata.jsonl").decode().splitlines()]
        keep = list(dict.fromkeys(r["file_name"] for r in rows))[:images]
        for name in keep:
            dst.writestr(name, src.read(name))
        dst.writestr("metadata.jsonl", "\n".join(json.dumps(r) for r in rows if r["file_name"] in set(keep)))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmdemo.data import ingest_dataset

    root = tmp_path_factory.mktemp("retrieval-data")
    return ingest_dataset(small_retrieval_zip(root / "small.zip"), root / "ws", task="retrieval")


def test_ingest_keeps_each_image_with_all_its_captions_and_its_file_name(dataset):
    from mmdemo.data import load_splits

    assert dataset.task == "retrieval" and dataset.num_train + dataset.num_val == 48 and dataset.num_val > 0
    assert dataset.counts["train"]["captions"] == 2 * dataset.counts["train"]["images"]
    splits = load_splits(dataset.path)
    train, val = splits["train"], splits["validation"]
    assert set(train.column_names) == {"image", "captions", "file_name"}
    assert not set(train["file_name"]) & set(val["file_name"])  # split by image
    row = train[0]
    colour, shape = row["captions"][0].split()[1:]
    assert row["file_name"].startswith("images/") and row["captions"] == [f"a {colour} {shape}",
                                                                           f"a {shape} that is {colour}"]


# --- models ---------------------------------------------------------------------------------------


def tiny_hf_folder(root: Path, kind: str) -> Path:
    """A 2-layer CLIP or SigLIP at 32 px with the MiniLM package's tokenizer, saved as a transformers folder."""
    from transformers import (BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig,
                              SiglipImageProcessor, SiglipModel)

    from mmdemo.vlm.composed import minilm_path

    tok = BertTokenizerFast.from_pretrained(minilm_path())
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    # 64 positions: the zero-shot pipeline pads SigLIP prompts to 64 tokens.
    text = dict(vocab_size=len(tok), max_position_embeddings=64, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, **layers)
    vision = dict(image_size=32, patch_size=8, **layers)
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    folder = root / f"tiny-{kind}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def train_run(dataset, run_dir: Path, **params):
    from mmdemo.config import TrainConfig
    from mmdemo.training import train

    cfg = TrainConfig(data=dataset.path, output_dir=str(run_dir), task="retrieval", checkpoint_every_minutes=0,
                      **params)
    return train(cfg)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_frozen_towers_trains_only_the_projections_on_features_computed_once(tmp_path, kind):
    """frozen_towers (the default): CLIP's two projections and temperature, SigLIP's text head (its projection
    sits inside the text tower), temperature and bias; the text tower's cached output through the projection is
    the tower's own embedding."""
    from mmdemo.dualenc import build_dual_encoder

    model = build_dual_encoder(str(tiny_hf_folder(tmp_path, kind))).apply_method("frozen_towers").eval()
    trained = {n.split(".")[1] if n.startswith("net.") else n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad} == (
        {"net.visual_projection", "net.text_projection", "net"} if kind == "clip" else {"net.text_model.head", "net"})
    assert ("logit_bias" in trained) == (kind == "siglip") and "logit_scale" in trained
    ids, mask = model.tokenize(["a red circle", "a blue triangle that is big"])
    with torch.no_grad():
        out = model.net.text_model(input_ids=ids, attention_mask=mask).pooler_output
        own = model.net.text_projection(out) if kind == "clip" else out
        cached = model.text_features(ids, mask)
        assert torch.allclose(model.encode_text(text_features=cached), own, atol=1e-5)
        assert torch.allclose(model.encode_text(ids, mask), own, atol=1e-5)


@pytest.mark.parametrize("kind, method", [("clip", ""), ("siglip", "locked_image")])
def test_tiny_transformers_dual_encoder_trains_saves_loads_searches_and_classifies(dataset, tmp_path, kind, method):
    from PIL import Image
    from transformers import AutoModel, pipeline

    from mmdemo.imagesearch import search_captions, search_images
    from mmdemo.zeroshot import zero_shot_batch

    base = tiny_hf_folder(tmp_path, kind)
    result = train_run(dataset, tmp_path / "run", base_model=str(base), max_steps=3, batch_size=16, method=method)
    assert {"i2t_recall@1", "t2i_recall@10", "t2i_median_rank", "val_loss"} <= result.keys()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "completed" and "t2i_recall@1" in status["metrics"]
    model_dir = tmp_path / "run" / "model"
    meta = json.loads((model_dir / "mmdemo.json").read_text())
    assert meta["task"] == "retrieval" and meta["family"] == "clip"
    assert meta["loss"] == ("sigmoid" if kind == "siglip" else "infonce")
    # The ecosystem's own loaders, without mmdemo.
    net = AutoModel.from_pretrained(model_dir)
    assert type(net).__name__ == ("SiglipModel" if kind == "siglip" else "CLIPModel")
    pipe = pipeline("zero-shot-image-classification", model=str(model_dir))
    image = Image.open(ASSETS / "examples/circle.png")
    scores = pipe(image, candidate_labels=["circle", "triangle"])
    assert sorted(s["label"] for s in scores) == ["circle", "triangle"]

    run = str(tmp_path / "run")
    hits = search_images("a red circle", dataset.path, run, top_k=4)
    assert len(hits) == 4 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["file_name"].startswith("images/") for h in hits)
    assert len(list((Path(dataset.path) / "embeddings").glob("images-*.safetensors"))) >= 1
    assert search_images("a red circle", dataset.path, run, top_k=4) == hits  # from the cache: the same answer
    captions = search_captions(image, dataset.path, run, top_k=3)
    assert len(captions) == 3 and all(c["caption"].startswith("a ") for c in captions)
    probs = zero_shot_batch([image, image], "circle, triangle, square", run, template="a {}")
    assert list(probs[0]) == ["circle", "triangle", "square"] and sum(probs[0].values()) == pytest.approx(1, abs=1e-3)
    # A transformers folder made elsewhere (no mmdemo.json) answers too.
    assert set(zero_shot_batch([image], ["circle", "square"], str(base))[0]) == {"circle", "square"}
    with pytest.raises(UserInputError, match="reads at most 64"):
        search_images("a red circle " * 30, dataset.path, run)
    # The export is the transformers folder itself, with a card for the zero-shot pipeline.
    from mmdemo.hub import export_run

    files = export_run(tmp_path / "run", tmp_path / "export")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "mmdemo.json"} <= set(files)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "text → image" in card


@pytest.fixture(scope="module")
def lit_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("lit") / "run"
    result = train_run(dataset, run, max_steps=4, batch_size=16, epochs=2)
    return run, result


@pytest.fixture(scope="module")
def lit_model():
    from mmdemo.dualenc import build_dual_encoder

    return build_dual_encoder("efficientnet_lite0+minilm")


def test_lit_methods_train_only_their_parts(lit_model):
    """frozen_towers: the projections and the temperature; locked_image: also MiniLM's top two layers."""
    def trained(method):
        lit_model.apply_method(method)
        return {n for n, p in lit_model.named_parameters() if p.requires_grad}

    projections = {n for n, _ in lit_model.named_parameters() if n.split(".")[0] in ("image_proj", "text_proj")}
    assert trained("frozen_towers") == projections | {"logit_scale", "logit_bias"}
    locked = trained("locked_image")
    assert locked > projections and not any(n.startswith("image_encoder.") for n in locked)
    layers = {n.split(".")[3] for n in locked if n.startswith("text_encoder.encoder.layer.")}
    assert layers == {"4", "5"} and not any("embeddings" in n for n in locked)


def test_lit_default_trains_the_projections_and_saves_its_loadable_parts(lit_run, dataset):
    import timm
    from transformers import BertModel

    from mmdemo.dualenc import load_dual_encoder

    run, result = lit_run
    cfg = (run / "config.yaml").read_text()
    assert "method: frozen_towers" in cfg and "base_model: efficientnet_lite0+minilm" in cfg
    assert 0 <= result["t2i_recall@1"] <= 1 and result["num_val"] == dataset.num_val
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["trainable_params"] < 1_500_000 < 25_000_000 < start["total_params"]  # both towers frozen
    model_dir = run / "model"
    image_tower = timm.create_model(f"local-dir:{model_dir / 'vision'}", pretrained=True)
    assert image_tower.num_features == 1280
    assert BertModel.from_pretrained(model_dir / "text").config.hidden_size == 384
    model = load_dual_encoder(model_dir).eval()
    texts = model.embed_texts(["a red circle", "a blue triangle"])
    assert texts.shape == (2, 256) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-4)
    # The trained projections were saved: the loaded model, from pixels and caption strings, ranks the held-out
    # images as the run's evaluation did on the features it had computed once.
    from mmdemo.data import load_splits
    from mmdemo.retrieval import RetrievalRows

    rows = RetrievalRows(load_splits(dataset.path)["validation"], model, model.preprocess.image_size, False, False)
    similarity = model.embed_images(rows.pixels)[rows.image_of] @ model.embed_texts(rows.texts).T
    scores = retrieval_metrics(similarity.numpy(), rows.captions, rows.texts)
    assert {k: round(scores[k], 5) for k in ("t2i_recall@1", "i2t_recall@1", "t2i_median_rank")} == {
        k: result[k] for k in ("t2i_recall@1", "i2t_recall@1", "t2i_median_rank")}


def test_the_report_shows_recall_rows_and_the_example_queries_best_images(lit_run):
    from mmdemo import runs

    run, result = lit_run
    evaluation = runs.read_eval(run)
    rows = {r["metric"]: r["value"] for r in runs.report_rows(evaluation)}
    assert rows["t2i_recall@1"] == result["t2i_recall@1"] and rows["i2t_median_rank"] == result["i2t_median_rank"]
    gallery = runs.report_examples(run)
    queries = evaluation["examples"][:runs.REPORT_QUERIES]
    expected = [(q["query"], rank, hit) for q in queries for rank, hit in enumerate(q["top"], 1)]
    assert len(gallery) == len(expected) > 0
    for (image, caption), (query, rank, hit) in zip(gallery, expected):
        assert caption.startswith(f"“{query}” #{rank}: {hit['file_name']} · ") and image.size[0] > 0
        assert caption.endswith(" ✓") == bool(hit["match"])


def test_lit_export_card_shows_how_to_load_the_parts(lit_run, tmp_path):
    from mmdemo.hub import export_run

    run, _ = lit_run
    files = export_run(run, tmp_path / "export")
    assert {"projection.safetensors", "vision/config.json", "text/config.json", "mmdemo.json", "README.md"} <= set(files)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card
    assert 'timm.create_model(f"local-dir:{folder}/vision"' in card and "projection.safetensors" in card
    assert "t2i" in card or "text → image" in card


# --- zero-shot and errors -------------------------------------------------------------------------


def test_offline_zero_shot_names_real_photos_without_training():
    from PIL import Image

    from mmdemo.zeroshot import zero_shot_batch

    photos = [Image.open(ASSETS / f"examples/{name}.jpg") for name in ("cat", "coffee", "rocket")]
    probs = zero_shot_batch(photos, "cat, coffee, rocket, dog")
    assert [max(p, key=p.get) for p in probs] == ["cat", "coffee", "rocket"]
    assert all(sum(p.values()) == pytest.approx(1, abs=1e-3) for p in probs)


@pytest.mark.parametrize("labels, message", [("", "No labels given"), ("cat", "Only one label"),
                                             (" cat , cat ", "Only one label"), (["cat", 3], "must be text")])
def test_zero_shot_refuses_unusable_labels(labels, message):
    from PIL import Image

    from mmdemo.zeroshot import zero_shot_batch

    with pytest.raises(UserInputError, match=message):
        zero_shot_batch([Image.new("RGB", (32, 32))], labels)


def test_zero_shot_refuses_a_template_without_a_slot():
    from PIL import Image

    from mmdemo.zeroshot import zero_shot_batch

    with pytest.raises(UserInputError, match="has no {} where the label goes"):
        zero_shot_batch([Image.new("RGB", (32, 32))], "cat, dog", template="a photo")


def test_cli_search_and_zero_shot_predict(lit_run, dataset, capsys):
    from mmdemo.__main__ import main

    # In this process (main(argv) is what `python -m mmdemo` runs), so the models load once.
    run, _ = lit_run
    assert main(["search", "--checkpoint", str(run), "--data", dataset.path, "--top-k", "3", "a red circle"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in lines] == [1, 2, 3] and all(r["file_name"].startswith("images/") for r in lines)
    assert main(["predict", "--task", "retrieval", "--checkpoint", str(run), "--labels", "red circle, blue triangle",
                 "--template", "a {}", str(ASSETS / "examples/circle.png")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["labels"]) == {"red circle", "blue triangle"}
    assert main(["predict", "--task", "retrieval", "--labels", "cat", str(ASSETS / "examples/cat.jpg")]) == 2
    assert "Only one label" in capsys.readouterr().err
