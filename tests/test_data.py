"""Tests for mmdemo.data: every fixture is built in tmp_path, nothing touches the network."""

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmdemo import data
from mmdemo.data import find_dataset, ingest_dataset, load_splits, load_summary, preview_images
from mmdemo.errors import UserInputError

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "assets" / "sample_shapes.zip"


def _image_bytes(color, size=(16, 16), fmt="PNG", mode="RGB", **save_kwargs):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def _classes(n_per_class, names=("cats", "dogs"), prefix=""):
    """Distinct solid-colour PNGs, so no two images are duplicates by accident."""
    return {f"{prefix}{name}/{i}.png": _image_bytes((40 * c + 10, 7 * i, 200 - 3 * i))
            for c, name in enumerate(names) for i in range(n_per_class)}


def _write_tree(root, files):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def _write_zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for rel, content in files.items():
            archive.writestr(rel, content)
    return path


def _reference(tmp_path, root):
    """What the datasets imagefolder builder itself reports: split -> label name -> count."""
    raw = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "ref_cache"))
    out = {}
    for split, ds in raw.items():
        feature = ds.features["label"]
        names = [feature.int2str(v) if isinstance(feature, datasets.ClassLabel) else str(v) for v in ds["label"]]
        out[split] = dict(Counter(names))
    return out


def _all_counts(summary):
    total = Counter()
    for per_class in summary.counts.values():
        total.update(per_class)
    return dict(total)


def _ingest_files(tmp_path, files, **kwargs):
    return ingest_dataset(_write_zip(tmp_path / "upload.zip", files), tmp_path / "ws", **kwargs)


def _stored_images(summary, split="train"):
    """file name -> stored PIL image (save_to_disk keeps only the base name of each source path)."""
    ds = load_splits(summary.path)[split]
    paths = [ref["path"] for ref in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    return {path: example["image"] for path, example in zip(paths, ds)}


def test_class_folders_zip_matches_imagefolder_and_makes_validation(tmp_path):
    files = _classes(5)
    summary = _ingest_files(tmp_path, files)
    reference = _reference(tmp_path, _write_tree(tmp_path / "tree", files))
    assert summary.classes == ["cats", "dogs"] and _all_counts(summary) == reference["train"]
    assert summary.counts["validation"] == {"cats": 1, "dogs": 1} and summary.num_train == 8
    assert summary.warnings == [] and set(load_splits(summary.path)) == {"train", "validation"}
    assert load_splits(summary.path)["train"].features["label"].names == ["cats", "dogs"]


def test_split_folders_with_val_and_test_match_imagefolder(tmp_path):
    files = {**_classes(3, prefix="train/"), **_classes(2, names=("cats", "dogs"), prefix="val/"),
             **_classes(1, prefix="test/")}
    files = {k: _image_bytes((i, 255 - i, 3 * i % 256)) for i, k in enumerate(files)}  # all distinct
    summary = _ingest_files(tmp_path, files)
    reference = _reference(tmp_path, _write_tree(tmp_path / "tree", files))
    assert summary.counts == {"train": reference["train"], "validation": reference["validation"],
                              "test": reference["test"]}
    assert (summary.num_train, summary.num_val, summary.num_test) == (6, 4, 2)


def test_metadata_csv_labels_match_imagefolder(tmp_path):
    files = {f"images/{i}.png": _image_bytes((i * 20, 0, 0)) for i in range(6)}
    files["metadata.csv"] = "file_name,label\n" + "".join(
        f"images/{i}.png,{'round' if i < 3 else 'square'}\n" for i in range(6))
    summary = _ingest_files(tmp_path, files)
    reference = _reference(tmp_path, _write_tree(tmp_path / "tree", files))
    assert summary.classes == ["round", "square"] and _all_counts(summary) == reference["train"]


def test_metadata_jsonl_with_extra_column_is_read_and_warned(tmp_path):
    files = {f"{i}.png": _image_bytes((0, i * 20, 0)) for i in range(6)}
    files["metadata.jsonl"] = "".join(
        json.dumps({"file_name": f"{i}.png", "label": i % 2, "note": "x"}) + "\n" for i in range(6))
    summary = _ingest_files(tmp_path, files)
    reference = _reference(tmp_path, _write_tree(tmp_path / "tree", files))
    assert summary.classes == ["0", "1"] and _all_counts(summary) == reference["train"]
    assert any("note" in w for w in summary.warnings)


def test_wrapping_top_folder_is_tolerated(tmp_path):
    files = _classes(4, prefix="mydata/")
    summary = _ingest_files(tmp_path, files)
    assert summary.classes == ["cats", "dogs"] and summary.num_train + summary.num_val == 8
    assert _all_counts(summary) == _reference(tmp_path, _write_tree(tmp_path / "tree", files))["train"]


def test_directory_source(tmp_path):
    root = _write_tree(tmp_path / "folder", _classes(3))
    summary = ingest_dataset(root, tmp_path / "ws")
    assert summary.classes == ["cats", "dogs"] and _all_counts(summary) == _reference(tmp_path, root)["train"]


def test_windows_zip_paths_and_excel_csv_with_bom(tmp_path):
    files = {f"cats\\{i}.png": _image_bytes((i, 50, 0)) for i in range(4)}
    files["metadata.csv"] = "\ufefffile_name,label\r\n" + "".join(f"cats/{i}.png,{'ab'[i % 2]}\r\n" for i in range(4))
    summary = _ingest_files(tmp_path, files)
    assert summary.classes == ["a", "b"] and _all_counts(summary) == {"a": 2, "b": 2}


def test_images_the_builder_leaves_out_are_named(tmp_path):
    files = {**_classes(2, prefix="train/"), "extra/cats/9.png": _image_bytes((9, 9, 9))}
    summary = _ingest_files(tmp_path, files)
    assert _all_counts(summary) == {"cats": 2, "dogs": 2}
    assert any(w.startswith("Ignored 1 image outside the split folders") and "extra/cats/9.png" in w
               for w in summary.warnings)


@pytest.mark.parametrize("name", ["labels.csv", "labels.jsonl"])
def test_metadata_file_source_with_any_name_resolves_paths_next_to_it(tmp_path, name):
    files = {f"pics/{i}.png": _image_bytes((0, 0, i * 30)) for i in range(6)}
    rows = [{"file_name": f"pics/{i}.png", "label": "a" if i % 2 else "b"} for i in range(6)]
    files[name] = ("file_name,label\n" + "".join(f"{r['file_name']},{r['label']}\n" for r in rows)
                   if name.endswith(".csv") else "".join(json.dumps(r) + "\n" for r in rows))
    root = _write_tree(tmp_path / "folder", files)
    summary = ingest_dataset(root / name, tmp_path / "ws")
    assert summary.classes == ["a", "b"] and _all_counts(summary) == {"a": 3, "b": 3}


def test_every_format_and_mode_becomes_rgb(tmp_path):
    gif = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(gif, "GIF", save_all=True,
                                                 append_images=[Image.new("RGB", (16, 16), (0, 0, 255))])
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=0)
    files = {
        "a/rgba.png": _image_bytes((0, 0, 0, 0), mode="RGBA"),  # fully transparent -> white
        "a/la.png": _image_bytes((10, 255), mode="LA"),
        "a/l.png": _image_bytes(128, mode="L"),
        "a/p.png": buffer.getvalue(),
        "a/i16.png": _image_bytes(65535, mode="I;16"),
        "a/cmyk.jpg": _image_bytes((0, 0, 255, 0), fmt="JPEG", mode="CMYK"),  # yellow
        "b/photo.webp": _image_bytes((1, 2, 3), fmt="WEBP", lossless=True),
        "b/bitmap.bmp": _image_bytes((4, 5, 6), fmt="BMP"),
        "b/anim.gif": gif.getvalue(),
        "b/scan.tiff": _image_bytes((7, 8, 9), fmt="TIFF"),
        "b/rgb.jpeg": _image_bytes((200, 100, 50), fmt="JPEG"),
    }
    summary = _ingest_files(tmp_path, files)
    assert summary.warnings == [] and _all_counts(summary) == {"a": 6, "b": 5}
    images = {**_stored_images(summary), **_stored_images(summary, "validation")}
    assert all(image.mode == "RGB" for image in images.values()) and len(images) == 11
    assert images["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["i16.png"].getpixel((0, 0)) == (255, 255, 255)
    assert images["anim.gif"].getpixel((0, 0)) == (255, 0, 0)
    assert images["p.png"].getpixel((0, 0)) == (0, 255, 0)
    red, green, blue = images["cmyk.jpg"].getpixel((0, 0))
    assert red > 200 and green > 200 and blue < 60


def test_exif_rotation_uppercase_extension_and_downscale(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held sideways: display rotated by 90 degrees
    files = {"x/rotated.JPG": _image_bytes((9, 9, 9), size=(40, 20), fmt="JPEG", exif=exif),
             "x/big.PNG": _image_bytes((1, 1, 1), size=(600, 300)),
             "y/0.png": _image_bytes((2, 2, 2)), "y/1.png": _image_bytes((3, 3, 3))}
    summary = _ingest_files(tmp_path, files, max_side=128)
    images = {**_stored_images(summary), **_stored_images(summary, "validation")}
    assert images["rotated.JPG"].size == (20, 40)
    assert images["big.PNG"].size == (128, 64)


@pytest.mark.parametrize(("files", "message"), [
    (_classes(3, names=("cats",)), r"Found 1 class folder \(cats/\).*need at least 2"),
    ({**_classes(3, names=("cats",)), "dogs/only.png": _image_bytes((1, 2, 3))},
     r"Class 'dogs' has only 1 image.*add at least one more"),
    ({"notes/readme.txt": "hi"}, r"No images found in 'upload.zip'"),
    ({"a.png": _image_bytes(1, mode="L"), "b.png": _image_bytes(2, mode="L")}, r"not in class folders"),
    ({"cover.png": _image_bytes(1, mode="L"), **_classes(2)}, r"different folder depths.*cover.png"),
    ({"cats/1.png": b"bad", "cats/2.png": b"bad", "dogs/1.png": b"x", "dogs/2.png": b"y"},
     r"None of the images could be read.*nothing usable"),
    ({**_classes(2), "metadata.csv": "file_name,caption\ncats/0.png,hi\n"},
     r"'metadata.csv' has columns file_name, caption; expected 'file_name'.*'label'"),
    ({**_classes(2), "metadata.csv": "filename,class\ncats/0.png,cat\n"}, r"has columns filename, class"),
    ({**_classes(2), "metadata.csv": ""}, r"'metadata.csv' is empty"),
    ({**_classes(2), "metadata.jsonl": "not json\n"}, r"'metadata.jsonl' is not a JSON object"),
    ({**_classes(2), "metadata.jsonl": "[1, 2]\n"}, r"'metadata.jsonl' is not a JSON object"),
    ({**_classes(2), "metadata.csv": "file_name, label\ncats/0.png, a\n"}, r"has columns file_name,  label"),
    ({"x/0.png": _image_bytes(1, mode="L"), "x/1.png": _image_bytes(2, mode="L"),
      "metadata.csv": "file_name,label\nx/0.png,a\nx/1.png,a\n"}, r"need at least 2 classes"),
    ({**_classes(2), "metadata.csv": "file_name,label\n../x.png,a\ncats/0.png,b\n"},
     r"Could not read 'upload.zip'.*Invalid metadata file_name '../x.png'"),
    (_classes(2, prefix="val/"), r"Found only validation/; add a train/ folder"),
])
def test_bad_uploads_name_the_file_and_fix(tmp_path, files, message):
    with pytest.raises(UserInputError, match=message):
        _ingest_files(tmp_path, files)
    assert list((tmp_path / "ws" / "tmp").iterdir()) == []  # temp extraction removed even on failure


def test_not_a_zip_empty_file_and_missing_file(tmp_path):
    fake = tmp_path / "photos.zip"
    fake.write_text("just text renamed to .zip")
    with pytest.raises(UserInputError, match=r"'photos.zip' is not a zip archive"):
        ingest_dataset(fake, tmp_path / "ws")
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    with pytest.raises(UserInputError, match=r"'empty.zip' is empty"):
        ingest_dataset(empty, tmp_path / "ws")
    with pytest.raises(UserInputError, match=r"'gone.zip' was not found"):
        ingest_dataset(tmp_path / "gone.zip", tmp_path / "ws")
    with pytest.raises(UserInputError, match=r"'notes.txt' is not a zip archive; upload a .zip"):
        ingest_dataset(_write_tree(tmp_path, {"notes.txt": "hi"}) / "notes.txt", tmp_path / "ws")


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "cats/../../evil.png", "C:/evil.png"])
def test_zip_slip_member_rejected(tmp_path, member):
    path = _write_zip(tmp_path / "upload.zip", {**_classes(2), member: _image_bytes(1, mode="L")})
    with pytest.raises(UserInputError, match=r"unsafe entry"):
        ingest_dataset(path, tmp_path / "ws" / "inner")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "ws" / "evil.png").exists()


def test_symlink_member_rejected(tmp_path):
    path = _write_zip(tmp_path / "upload.zip", _classes(2))
    with zipfile.ZipFile(path, "a") as archive:
        link = zipfile.ZipInfo("cats/link.png")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UserInputError, match=r"unsafe entry 'cats/link.png'"):
        ingest_dataset(path, tmp_path / "ws")


def test_hidden_junk_is_ignored(tmp_path):
    junk = {"__MACOSX/cats/._0.png": b"resource fork", "cats/.DS_Store": b"x", "Thumbs.db": b"x",
            "dogs/.hidden.png": b"not an image", ".git/config.png": b"x"}
    summary = _ingest_files(tmp_path, {**_classes(3), **junk})
    assert summary.warnings == [] and _all_counts(summary) == {"cats": 3, "dogs": 3}


def test_corrupt_and_oversized_images_are_skipped_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)  # a 40x40 "bomb" is over the limit, 16x16 is not
    files = {**_classes(3), "cats/bad.jpg": b"\xff\xd8 truncated", "dogs/bomb.png": _image_bytes(1, size=(40, 40))}
    summary = _ingest_files(tmp_path, files)
    assert _all_counts(summary) == {"cats": 3, "dogs": 3}
    assert any(w.startswith("Skipped 2 unreadable images:") and "cats/bad.jpg" in w and "dogs/bomb.png (too large"
               in w for w in summary.warnings)


def test_filename_split_keywords_do_not_drop_images(tmp_path):
    # datasets alone would make cats/test_1.png the whole test split and drop everything else
    files = {**_classes(3), "cats/test_1.png": _image_bytes((5, 5, 5))}
    summary = _ingest_files(tmp_path, files)
    assert _all_counts(summary) == {"cats": 4, "dogs": 3} and summary.num_test == 0


def test_stratified_split_is_seeded(tmp_path):
    files = _classes(10, names=("a", "b", "c"))
    ws = tmp_path / "ws"
    path = _write_zip(tmp_path / "upload.zip", files)
    summaries = [ingest_dataset(path, ws, seed=seed) for seed in (1, 1, 2)]
    val_pixels = [sorted(ex["image"].tobytes() for ex in load_splits(s.path)["validation"]) for s in summaries]
    assert val_pixels[0] == val_pixels[1] != val_pixels[2]
    assert summaries[0].counts["validation"] == {"a": 2, "b": 2, "c": 2}


def test_duplicate_and_imbalance_warnings(tmp_path):
    same = _image_bytes((1, 2, 3))
    files = {**_classes(8, names=("big",), prefix="train/"), **_classes(2, names=("small",), prefix="train/"),
             "val/big/copy.png": same, "train/big/orig.png": same, "val/small/v.png": _image_bytes((9, 9, 9))}
    summary = _ingest_files(tmp_path, files)
    assert any("imbalanced" in w and "'big' has 9" in w and "'small' only 2" in w for w in summary.warnings)
    assert any("identical to training images" in w and "val/big/copy.png" in w for w in summary.warnings)


def test_sample_zip_ingests_to_three_classes(tmp_path):
    summary = ingest_dataset(SAMPLE_ZIP, tmp_path / "ws")
    assert summary.classes == ["circle", "rectangle", "triangle"]
    assert summary.num_train == 96 and summary.num_val == 24 and summary.warnings == []


def test_hub_id_without_network_says_upload_a_zip(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # both libraries read HF_HUB_OFFLINE at import time, so the env var alone is too late here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"Could not reach the Hugging Face Hub for dataset 'someone/shapes'"
                                             r".*upload a zip"):
        ingest_dataset("someone/shapes", tmp_path / "ws")


def test_hub_dataset_columns_and_splits_are_normalised(tmp_path, monkeypatch):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y"]),
                                  "extra": datasets.Value("int32")})
    rows = {"img": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)], "fine_label": [0, 0, 1, 1],
            "extra": [0, 1, 2, 3]}
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                                "valid": datasets.Dataset.from_dict(rows, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda repo_id: hub)
    summary = ingest_dataset("someone/shapes", tmp_path / "ws")
    assert summary.classes == ["x", "y"] and (summary.num_train, summary.num_val) == (4, 4)


def test_summary_preview_and_find_dataset(tmp_path):
    summary = _ingest_files(tmp_path, _classes(5))
    payload = json.loads(json.dumps(summary.to_dict()))
    assert payload["classes"] == ["cats", "dogs"] and "path" not in payload  # no server paths in the API
    assert load_summary(summary.path) == summary
    previews = preview_images(summary.path, per_class=2)
    assert {k: len(v) for k, v in previews.items()} == {"cats": 2, "dogs": 2}
    assert find_dataset(tmp_path / "ws", summary.dataset_id) == Path(summary.path)
    for bad in ("../" + summary.dataset_id, summary.dataset_id.upper(), "0" * 32, ""):
        with pytest.raises(UserInputError, match="Unknown dataset id.*upload a dataset first"):
            find_dataset(tmp_path / "ws", bad)
    assert list((tmp_path / "ws" / "tmp").iterdir()) == []


def test_unsupported_task_and_bad_arguments(tmp_path):
    with pytest.raises(UserInputError, match=r"task 'vqa' is not supported yet; supported tasks: classification"):
        ingest_dataset(SAMPLE_ZIP, tmp_path / "ws", task="vqa")
    with pytest.raises(UserInputError, match=r"val_fraction must be between 0 and 1"):
        ingest_dataset(SAMPLE_ZIP, tmp_path / "ws", val_fraction=1.5)
