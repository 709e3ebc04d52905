"""Tests for mmdemo.data: every fixture is built in tmp_path, nothing touches the network."""

import io
import json
import re
import zipfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmdemo import data
from mmdemo.data import find_dataset, ingest_dataset, load_splits, load_summary, preview_images
from mmdemo.errors import UserInputError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SAMPLE_ZIP = ASSETS / "sample_shapes.zip"


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
    assert not (tmp_path / "ws" / "tmp").exists()  # temp extraction removed even on failure


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
    assert not (tmp_path / "ws" / "tmp").exists()


def test_unsupported_task_and_bad_arguments(tmp_path):
    with pytest.raises(UserInputError, match=r"task 'detection' is not supported yet; supported tasks: "
                                             r"classification, captioning, vqa"):
        ingest_dataset(SAMPLE_ZIP, tmp_path / "ws", task="detection")
    with pytest.raises(UserInputError, match=r"val_fraction must be between 0 and 1"):
        ingest_dataset(SAMPLE_ZIP, tmp_path / "ws", val_fraction=1.5)


# --- captioning and VQA -------------------------------------------------------------------------------


def _jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


def _pictures(n, prefix="images/"):
    """n distinct 16x16 PNGs named {prefix}{i}.png."""
    return {f"{prefix}{i}.png": _image_bytes((i * 12 % 256, 255 - i * 7 % 256, i * 31 % 256)) for i in range(n)}


def _rows(summary):
    """split -> list of rows without the image, and split -> stored image bytes per row."""
    splits = load_splits(summary.path)
    text = {s: ds.remove_columns("image").to_list() for s, ds in splits.items()}
    pixels = {s: [ex["image"].tobytes() for ex in ds] for s, ds in splits.items()}
    return text, pixels


def _all_captions(summary):
    text, _ = _rows(summary)
    return sorted(tuple(row["captions"]) for rows in text.values() for row in rows)


def test_captions_jsonl_string_or_list_one_row_per_image(tmp_path):
    files = _pictures(5)
    # a string on one line and a list on the next: the imagefolder builder refuses this mix
    files["metadata.jsonl"] = _jsonl([{"file_name": f"images/{i}.png", "text": f"cap {i}" if i % 2 else
                                       [f"cap {i}", f"other {i}"]} for i in range(5)])
    summary = _ingest_files(tmp_path, files, task="captioning")
    splits = load_splits(summary.path)
    assert splits["train"].features == datasets.Features({"image": datasets.Image(),
                                                          "captions": datasets.List(datasets.Value("string"))})
    assert _all_captions(summary) == [("cap 0", "other 0"), ("cap 1",), ("cap 2", "other 2"), ("cap 3",),
                                      ("cap 4", "other 4")]
    assert (summary.num_train, summary.num_val, summary.classes, summary.warnings) == (4, 1, [], [])
    assert sum(c["images"] for c in summary.counts.values()) == 5
    assert sum(c["captions"] for c in summary.counts.values()) == 8


def test_captions_csv_repeated_rows_merge_in_order(tmp_path):
    files = {**_pictures(3), "metadata.csv": "file_name,text\nimages/0.png,first\nimages/1.png,one\n"
                                             "images/0.png, second \nimages/2.png,two\nimages/0.png,third\n"}
    summary = _ingest_files(tmp_path, files, task="captioning")
    assert _all_captions(summary) == [("first", "second", "third"), ("one",), ("two",)]
    assert summary.num_train + summary.num_val == 3


def test_caption_column_name_json_list_in_csv_and_extra_column(tmp_path):
    files = {**_pictures(3), "metadata.csv": 'file_name,caption,id\nimages/0.png,"[""a"", ""b""]",7\n'
                                             "images/1.png,[blurry] c,8\nimages/2.png,2024,9\n"}
    summary = _ingest_files(tmp_path, files, task="captioning")
    assert _all_captions(summary) == [("2024",), ("[blurry] c",), ("a", "b")]
    assert summary.warnings == ["Ignored columns in 'metadata.csv': id."]


def test_captions_plural_column_from_a_metadata_file_source(tmp_path):
    root = _write_tree(tmp_path / "folder", {**_pictures(2, prefix="pics/"), "captions.jsonl": _jsonl(
        [{"file_name": f"pics/{i}.png", "captions": ["x", "y"]} for i in range(2)])})
    summary = ingest_dataset(root / "captions.jsonl", tmp_path / "ws", task="captioning")
    assert _all_captions(summary) == [("x", "y"), ("x", "y")]


def test_vqa_csv_answer_column_one_row_per_question(tmp_path):
    rows = "".join(f"images/{i}.png,how many?,{i}\nimages/{i}.png,what colour?,red\n" for i in range(4))
    files = {**_pictures(4), "metadata.csv": "file_name,question,answer\n" + rows +
             "images/0.png,what colour?,crimson\nimages/1.png,how many?,\u00a02 \n"}
    summary = _ingest_files(tmp_path, files, task="vqa")
    text, _ = _rows(summary)
    assert load_splits(summary.path)["train"].features == datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"),
         "answers": datasets.List(datasets.Value("string"))})
    found = sorted((row["question"], tuple(row["answers"])) for rows in text.values() for row in rows)
    # numbers stay text ("2", not 2.0), and a question asked again about an image gains the answer
    assert found == [("how many?", ("0",)), ("how many?", ("1", "2")), ("how many?", ("2",)), ("how many?", ("3",)),
                     ("what colour?", ("red",)), ("what colour?", ("red",)), ("what colour?", ("red",)),
                     ("what colour?", ("red", "crimson"))]
    assert summary.classes == ["0", "1", "2", "3", "crimson", "red"]
    assert summary.num_train + summary.num_val == 8
    assert summary.counts["validation"] == {"images": 1, "questions": 2}


def test_vqa_answers_list_of_strings(tmp_path):
    files = {**_pictures(3), "metadata.jsonl": _jsonl(
        [{"file_name": f"images/{i}.png", "question": "what is it?", "answers": ["a shape", "shape", 3]}
         for i in range(3)])}
    text, _ = _rows(_ingest_files(tmp_path, files, task="vqa"))
    assert [row["answers"] for rows in text.values() for row in rows] == [["a shape", "shape", "3"]] * 3


def test_vqa_answers_list_of_dicts_vqav2_style(tmp_path):
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1},
               {"answer": "yes", "answer_confidence": "maybe", "answer_id": 2},
               {"answer": "no", "answer_confidence": "no", "answer_id": 3}]
    files = {**_pictures(2), "metadata.jsonl": _jsonl(
        [{"file_name": f"images/{i}.png", "question": "is it red?", "answers": answers,
          "question_id": i} for i in range(2)])}
    summary = _ingest_files(tmp_path, files, task="vqa")
    text, _ = _rows(summary)
    assert [row["answers"] for rows in text.values() for row in rows] == [["yes", "yes", "no"]] * 2
    assert summary.classes == ["no", "yes"]
    assert summary.warnings == ["Ignored columns in 'metadata.jsonl': question_id."]


def test_vqa_classes_keep_the_most_frequent_hundred(tmp_path, monkeypatch):
    monkeypatch.setattr(data.text, "MAX_CLASSES", 2)
    files = {**_pictures(3), "metadata.jsonl": _jsonl(
        [{"file_name": f"images/{i}.png", "question": "q?", "answers": ["b", "c", "c", "a", "a"][i:]}
         for i in range(3)])}
    assert _ingest_files(tmp_path, files, task="vqa").classes == ["a", "c"]


def test_text_split_is_by_image_and_seeded(tmp_path):
    files = _pictures(20)
    files["metadata.jsonl"] = _jsonl([{"file_name": f"images/{i}.png", "question": f"question {q}?",
                                       "answer": str(i)} for i in range(20) for q in range(3)])
    path = _write_zip(tmp_path / "upload.zip", files)
    summaries = [ingest_dataset(path, tmp_path / "ws", task="vqa", seed=seed) for seed in (1, 1, 2)]
    held_out = []
    for summary in summaries:
        text, pixels = _rows(summary)
        assert not set(pixels["train"]) & set(pixels["validation"])  # no image in two splits
        answers = {split: {row["answers"][0] for row in rows} for split, rows in text.items()}
        assert len(answers["validation"]) == 4 and len(answers["train"]) == 16  # 20% of the images
        assert Counter(row["answers"][0] for rows in text.values() for row in rows) == {str(i): 3 for i in range(20)}
        assert summary.counts == {"train": {"images": 16, "questions": 48}, "validation": {"images": 4,
                                                                                           "questions": 12}}
        held_out.append(answers["validation"])
    assert held_out[0] == held_out[1] != held_out[2]


def test_split_folders_with_metadata_in_each(tmp_path):
    files = {**_pictures(6, prefix="train/"), **_pictures(2, prefix="test/"), "train/extra.png": b""}
    files = {k: _image_bytes((i * 20, 3, 3)) for i, k in enumerate(files)}  # distinct across splits too
    files["train/metadata.jsonl"] = _jsonl([{"file_name": f"{i}.png", "text": f"t{i}"} for i in range(6)])
    files["test/metadata.csv"] = "file_name,text\n0.png,u0\n1.png,u1\n"
    with pytest.raises(UserInputError, match=r"has both metadata.csv and metadata.jsonl files; use one format"):
        _ingest_files(tmp_path, files, task="captioning")
    files["test/metadata.jsonl"] = _jsonl([{"file_name": f"{i}.png", "text": f"u{i}"} for i in range(2)])
    del files["test/metadata.csv"]
    summary = _ingest_files(tmp_path, files, task="captioning")
    assert (summary.num_train, summary.num_val, summary.num_test) == (5, 1, 2)
    assert sorted(row["captions"][0] for row in _rows(summary)[0]["test"]) == ["u0", "u1"]
    assert summary.warnings == ["Ignored 1 image outside the split folders or not listed in the metadata file: "
                                "train/extra.png."]


def test_text_junk_formats_and_max_side(tmp_path):
    files = {"images/big.JPG": _image_bytes((200, 10, 10), size=(600, 300), fmt="JPEG"),
             "images/rgba.png": _image_bytes((0, 0, 0, 0), mode="RGBA"),
             "images/cmyk.jpg": _image_bytes((0, 0, 255, 0), fmt="JPEG", mode="CMYK"),
             "__MACOSX/._metadata.jsonl": b"\x00\x05resource fork", ".hidden/metadata.jsonl": "not json",
             "metadata.jsonl": _jsonl([{"file_name": name, "text": name} for name in
                                       ("images/big.JPG", "images/rgba.png", "images/cmyk.jpg")])}
    summary = _ingest_files(tmp_path, files, task="captioning", max_side=64)
    splits = load_splits(summary.path)
    images = {ex["captions"][0]: ex["image"] for split in splits.values() for ex in split}
    assert summary.warnings == [] and all(image.mode == "RGB" for image in images.values())
    assert images["images/big.JPG"].size == (64, 32)
    assert images["images/rgba.png"].getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_images_drop_their_rows_and_duplicates_are_named(tmp_path):
    same = _image_bytes((1, 2, 3))
    files = {**_pictures(3, prefix="train/"), "train/bad.png": b"not a png", "train/orig.png": same,
             "test/copy.png": same}
    files["train/metadata.csv"] = ("file_name,question,answer\nbad.png,q1?,a\n0.png,q?,a\nbad.png,q2?,b\n"
                                   "1.png,q?,a\n2.png,q?,a\norig.png,q?,a\n")
    files["test/metadata.csv"] = "file_name,question,answer\ncopy.png,q?,a\n"
    summary = _ingest_files(tmp_path, files, task="vqa")
    assert summary.num_train + summary.num_val == 4 and summary.num_test == 1
    assert any(w.startswith("Skipped 1 unreadable image and dropped their metadata rows: train/bad.png (not a "
                            "readable image; dropped train/metadata.csv lines 2, 4).") for w in summary.warnings)
    assert any("identical to training images (test: test/copy.png)" in w for w in summary.warnings)


CAPTION_ROWS = _jsonl([{"file_name": f"images/{i}.png", "text": "x"} for i in range(2)])
VQA_ROWS = _jsonl([{"file_name": f"images/{i}.png", "question": "q?", "answer": "a"} for i in range(2)])


@pytest.mark.parametrize(("task", "files", "message"), [
    ("captioning", {"metadata.jsonl": CAPTION_ROWS + _jsonl([{"file_name": "images/9.png", "text": "y"}])},
     r"^1 metadata row cannot be used: metadata.jsonl line 3 \(images/9.png\): the image is not in the upload\. "
     r"Fix or delete those rows.*file_name is the image's path relative to the folder of its metadata file"),
    ("captioning", {"metadata.csv": "file_name,text\nimages/0.png,x\nimages/1.png,\n"},
     r"metadata.csv line 3 \(images/1.png\): the caption is empty"),
    ("captioning", {"metadata.csv": "file_name,text\nimages/0.png,x\nimages/1.png\n"},
     r"metadata.csv line 3 \(images/1.png\): the caption is empty"),
    ("captioning", {"metadata.jsonl": _jsonl([{"file_name": "images/0.png", "text": []},
                                              {"file_name": "images/1.png", "text": ["ok", " "]},
                                              {"file_name": "images/1.png", "text": {"en": "x"}},
                                              {"file_name": "", "text": "x"}])},
     r"^4 metadata rows cannot be used: metadata.jsonl line 1 \(images/0.png\): the caption is empty; "
     r"metadata.jsonl line 2 \(images/1.png\): the caption is empty; metadata.jsonl line 3 \(images/1.png\): "
     r"the caption is not text \(\{'en': 'x'\}\); metadata.jsonl line 4: file_name is empty\."),
    ("captioning", {"metadata.jsonl": _jsonl([{"file_name": "images/0.png", "description": "x"}])},
     r"'metadata.jsonl' has columns file_name, description; expected 'file_name' \(image path relative to that "
     r"file\) and 'text' \(or 'caption', 'captions'\), in lower case\. Rename the columns\."),
    ("vqa", {"metadata.csv": "file_name,question\nimages/0.png,q?\n"},
     r"'metadata.csv' has columns file_name, question; expected 'file_name' \(image path relative to that file\), "
     r"'question' and 'answer' \(or 'answers'\)"),
    ("vqa", {"metadata.jsonl": VQA_ROWS + _jsonl([{"file_name": "images/1.png", "question": " ", "answer": "a"}])},
     r"metadata.jsonl line 3 \(images/1.png\): the question is empty"),
    ("vqa", {"metadata.jsonl": VQA_ROWS + _jsonl([{"file_name": "images/1.png", "question": "q?", "answers": []}])},
     r"metadata.jsonl line 3 \(images/1.png\): the answer is empty"),
    ("vqa", {"metadata.jsonl": _jsonl([{"file_name": "images/0.png", "question": ["a?", "b?"], "answer": "x"}])},
     r"line 1 \(images/0.png\): the row has several questions; write one question per row"),
    ("vqa", {"metadata.csv": "file_name,question,answer\n"}, r"'metadata.csv' has no rows; add one per image"),
    ("vqa", {"metadata.jsonl": VQA_ROWS + "{oops\n"}, r"Line 3 of 'metadata.jsonl' is not a JSON object"),
    ("vqa", {"metadata.jsonl": _jsonl([{"file_name": "../images/0.png", "question": "q?", "answer": "a"}])},
     r"line 1 \(../images/0.png\): file_name must be a path inside the folder of the metadata file"),
    ("captioning", {}, r"No metadata.jsonl or metadata.csv for the train images in 'upload.zip'; captioning needs "
                       r"one next to the images"),
    ("captioning", {"metadata.jsonl": "", "images/x.txt": "hi"}, r"'metadata.jsonl' is empty"),
    ("captioning", {"metadata.jsonl": _jsonl([{"file_name": "images/0.png", "text": "x"}])},
     r"The training split has 1 distinct image; need at least 2"),
])
def test_bad_text_uploads_name_the_row_and_fix(tmp_path, task, files, message):
    with pytest.raises(UserInputError, match=message):
        _ingest_files(tmp_path, {**_pictures(2), **files}, task=task)
    assert not (tmp_path / "ws" / "tmp").exists()


@pytest.mark.parametrize(("files", "message"), [
    ({**_pictures(2, prefix="train/"), **_pictures(1, prefix="test/"), "metadata.jsonl": CAPTION_ROWS},
     r"No metadata.jsonl or metadata.csv for the train images in 'upload.zip' \(metadata.jsonl at the top is not "
     r"read when there are split folders"),
    ({**_pictures(2, prefix="val/"), "val/metadata.jsonl": CAPTION_ROWS.replace("images/", "")},
     r"Found only validation/; add a train/ folder with its own metadata.jsonl"),
    ({"metadata.jsonl": CAPTION_ROWS}, r"No images found in 'upload.zip'; it needs image files .* with a "
                                        r"metadata.jsonl or metadata.csv giving each one's file_name and text"),
    ({"images/0.png": b"bad", "images/1.png": b"bad", "metadata.jsonl": CAPTION_ROWS},
     r"None of the images could be read.*images/0.png \(not a readable image; dropped metadata.jsonl line 1\)"),
])
def test_bad_caption_layouts(tmp_path, files, message):
    with pytest.raises(UserInputError, match=message):
        _ingest_files(tmp_path, files, task="captioning")


def test_text_previews_are_keyed_by_caption_or_question(tmp_path):
    files = {**_pictures(10), "metadata.jsonl": _jsonl([{"file_name": f"images/{i}.png", "text": f"shape {i % 3}"}
                                                        for i in range(10)])}
    summary = _ingest_files(tmp_path, files, task="captioning")
    previews = preview_images(summary.path, per_class=1)  # up to 4 images, spread over the 8 training images
    assert sum(map(len, previews.values())) == 4 and set(previews) <= {"shape 0", "shape 1", "shape 2"}
    files["metadata.jsonl"] = _jsonl([{"file_name": f"images/{i}.png", "question": "which?", "answer": str(i % 2)}
                                      for i in range(10)])
    previews = preview_images(_ingest_files(tmp_path, files, task="vqa").path, per_class=2)
    assert set(previews) == {"which? → 0", "which? → 1"} and sum(map(len, previews.values())) == 8
    assert all(image.size == (16, 16) for images in previews.values() for image in images)


def test_sample_captions_zip(tmp_path):
    summary = ingest_dataset(ASSETS / "sample_captions.zip", tmp_path / "ws", task="captioning")
    assert (summary.num_train, summary.num_val, summary.num_test, summary.warnings) == (480, 120, 150, [])
    assert summary.counts["test"] == {"images": 150, "captions": 150}
    assert re.fullmatch(r"a \w+ (circle|rectangle|triangle)", load_splits(summary.path)["test"][0]["captions"][0])


def test_sample_vqa_zip(tmp_path):
    summary = ingest_dataset(ASSETS / "sample_vqa.zip", tmp_path / "ws", task="vqa")
    assert summary.num_train + summary.num_val == 7754 and summary.num_test == 0 and summary.warnings == []
    assert summary.counts["train"]["images"] == 640 and summary.counts["validation"]["images"] == 160
    assert summary.classes == sorted(["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle",
                                      "yellow", "triangle", "brown", "blue", "no"])


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_text_hub_id_without_network_says_upload_a_zip(tmp_path, monkeypatch, task):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"Could not reach the Hugging Face Hub for dataset 'someone/pics'.*"
                                             r"upload a zip of images with a metadata.jsonl"):
        ingest_dataset("someone/pics", tmp_path / "ws", task=task)


def test_hub_caption_dataset_is_normalised(tmp_path, monkeypatch):
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "id": datasets.Value("int32")})
    rows = {"img": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)],
            "caption": [["a", "b"], ["c"], [], ["d"], ["e"]], "id": list(range(5))}
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                                "test": datasets.Dataset.from_dict(rows, features=features).select([0, 1])})
    monkeypatch.setattr(datasets, "load_dataset", lambda repo_id: hub)
    summary = ingest_dataset("someone/captions", tmp_path / "ws", task="captioning")
    assert (summary.num_train, summary.num_val, summary.num_test) == (3, 1, 2)
    assert summary.source == "someone/captions" == load_summary(summary.path).source  # for the model card
    assert summary.warnings[0] == "Dropped 1 row of 'someone/captions' without usable text: train row 2: the " \
                                  "caption is empty."
    assert any("identical to training images" in w for w in summary.warnings)  # the test rows are copies
    with pytest.raises(UserInputError, match=r"Hub dataset 'someone/captions' has columns img, caption, id; need an "
                                             r"image column, 'question' and 'answer' \(or 'answers'\) for vqa"):
        ingest_dataset("someone/captions", tmp_path / "ws", task="vqa")
