"""Rebuilds the sample datasets and the example photos that ship with the app.

    python assets/make_samples.py

Needs `easy-vqa` (shapes, MIT) and `scikit-image` (photos, CC0 / public domain) from PyPI; no network.
The output is byte-for-byte reproducible: fixed image choice, fixed zip timestamps, sorted entries.
"""

import io
import json
import re
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = ("circle", "rectangle", "triangle")
PER_CLASS = 40
ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed so the zip does not change on every rebuild
SHAPE_QUESTIONS = {"what shape is in the image?", "what shape does the image contain?", "what shape is present?"}
COLOUR_QUESTION = re.compile(r"what (?:color is|is the color of) the (\w+)\?")  # "the shape" or "the circle"
COLOURED_SHAPE_QUESTION = re.compile(r"what is the (\w+) shape\?")  # "what is the red shape?" -> its shape
CAPTION_IMAGES = {"train": 600, "test": 150}
VQA_IMAGES = 800
IMAGE_TEXT_IMAGES = 250
RETRIEVAL_IMAGES = 500


def shape_labels() -> dict[int, str]:
    """Image id -> shape, read from easy-VQA's own "what shape ..." answers."""
    from easy_vqa import get_train_questions

    questions, answers, image_ids = get_train_questions()
    return {i: a for q, a, i in zip(questions, answers, image_ids) if q in SHAPE_QUESTIONS and a in SHAPES}


def pick_images(labels: dict[int, str]) -> dict[str, list[int]]:
    picked = {shape: [] for shape in SHAPES}
    for image_id in sorted(labels):
        if len(picked[labels[image_id]]) < PER_CLASS:
            picked[labels[image_id]].append(image_id)
    return picked


def write_zip(picked: dict[str, list[int]], out: Path) -> None:
    from easy_vqa import get_train_image_paths

    paths = get_train_image_paths()
    write_entries(out, {f"{shape}/{image_id:04d}.png": Path(paths[image_id]).read_bytes()
                        for shape in SHAPES for image_id in picked[shape]})


def write_entries(out: Path, entries: dict[str, bytes]) -> None:
    """Writes the entries in the given order with fixed timestamps, so a rebuild is byte-identical."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)


def captions(questions) -> dict[int, str]:
    """Image id -> "a red triangle", from easy-VQA's own answers about each image's colour and shape."""
    colour, shape = {}, {}
    for question, answer, image_id in zip(*questions):
        if match := COLOUR_QUESTION.fullmatch(question):
            colour[image_id] = answer
            if match[1] in SHAPES:
                shape[image_id] = match[1]
        elif match := COLOURED_SHAPE_QUESTION.fullmatch(question):
            colour[image_id], shape[image_id] = match[1], answer
        elif question in SHAPE_QUESTIONS:
            shape[image_id] = answer
    return {i: f"a {colour[i]} {shape[i]}" for i in sorted(colour.keys() & shape.keys())}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def write_captions_zip(out: Path) -> dict[str, int]:
    """train/ and test/ split folders, each with its images and a metadata.jsonl (file_name, text)."""
    import easy_vqa

    entries, sizes = {}, {}
    for split, n in CAPTION_IMAGES.items():
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        chosen = list(captions(getattr(easy_vqa, f"get_{split}_questions")()).items())[:n]
        entries.update({f"{split}/{i:04d}.png": Path(paths[i]).read_bytes() for i, _ in chosen})
        entries[f"{split}/metadata.jsonl"] = jsonl([{"file_name": f"{i:04d}.png", "text": text} for i, text in chosen])
        sizes[split] = len(chosen)
    write_entries(out, entries)
    return sizes


def write_vqa_zip(out: Path) -> dict[str, int]:
    """images/ and one metadata.jsonl (file_name, question, answer) with every question about each image."""
    from easy_vqa import get_train_image_paths, get_train_questions

    questions, answers, image_ids = get_train_questions()
    chosen = sorted(set(image_ids))[:VQA_IMAGES]
    rows = sorted((i, q, a) for q, a, i in zip(questions, answers, image_ids) if i in set(chosen))
    paths = get_train_image_paths()
    entries = {f"images/{i:04d}.png": Path(paths[i]).read_bytes() for i in chosen}
    entries["metadata.jsonl"] = jsonl([{"file_name": f"images/{i:04d}.png", "question": q, "answer": a}
                                       for i, q, a in rows])
    write_entries(out, entries)
    return {"images": len(chosen), "questions": len(rows)}


def image_text_rows(questions) -> list[tuple[int, str, str]]:
    """Two rows per image, a shape question and a colour question, so that the label needs both inputs:
    the text says what is asked, the image what the answer is. (easy-VQA's yes / no questions are left
    out: with a few hundred rows, frozen encoders cannot learn to compare the word asked about with the
    image; on three rows per image, one of them yes / no, late fusion reached 0.93.)"""
    by_image: dict[int, dict[str, list]] = {}
    for question, answer, image_id in zip(*questions):
        kind = ("shape" if question in SHAPE_QUESTIONS or COLOURED_SHAPE_QUESTION.fullmatch(question) else
                "colour" if COLOUR_QUESTION.fullmatch(question) else None)
        if kind:
            by_image.setdefault(image_id, {}).setdefault(kind, []).append((question, answer))
    rows, images = [], 0
    for image_id in sorted(by_image):
        kinds = by_image[image_id]
        if len(kinds) < 2:
            continue
        # Vary the wording over the images: the n-th image takes the n-th phrasing it has, cyclically.
        rows += [(image_id, *kinds[k][images % len(kinds[k])]) for k in ("shape", "colour")]
        images += 1
        if images == IMAGE_TEXT_IMAGES:
            break
    return rows


def write_image_text_zip(out: Path) -> dict[str, int]:
    """images/ and one metadata.csv (file_name, text, label): easy-VQA questions as the text, their
    answers as the labels; each image appears in two rows."""
    import csv

    from easy_vqa import get_train_image_paths, get_train_questions

    rows = image_text_rows(get_train_questions())
    paths = get_train_image_paths()
    entries = {f"images/{i:04d}.png": Path(paths[i]).read_bytes() for i in sorted({r[0] for r in rows})}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file_name", "text", "label"])
    writer.writerows([f"images/{i:04d}.png", q, a] for i, q, a in rows)
    entries["metadata.csv"] = buffer.getvalue().encode()
    write_entries(out, entries)
    return {"images": len(entries) - 1, "rows": len(rows)}


def write_retrieval_zip(out: Path) -> dict[str, int]:
    """images/ and one metadata.jsonl with two rows (two phrasings of its caption) per image: "a red circle"
    and "a circle that is red"; many images share a caption, as in real caption sets."""
    from easy_vqa import get_train_image_paths, get_train_questions

    chosen = list(captions(get_train_questions()).items())[:RETRIEVAL_IMAGES]
    paths = get_train_image_paths()
    entries = {f"images/{i:04d}.png": Path(paths[i]).read_bytes() for i, _ in chosen}
    rows = []
    for i, text in chosen:
        colour, shape = text.split()[1:]
        rows += [{"file_name": f"images/{i:04d}.png", "text": text},
                 {"file_name": f"images/{i:04d}.png", "text": f"a {shape} that is {colour}"}]
    entries["metadata.jsonl"] = jsonl(rows)
    write_entries(out, entries)
    return {"images": len(chosen), "captions": len(rows)}


def write_examples(picked: dict[str, list[int]], out_dir: Path) -> None:
    from easy_vqa import get_train_image_paths
    from PIL import Image
    from skimage import data

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = get_train_image_paths()
    for shape in ("circle", "triangle", "rectangle"):
        (out_dir / f"{shape}.png").write_bytes(Path(paths[picked[shape][0]]).read_bytes())
    for name, loader in (("cat", data.chelsea), ("coffee", data.coffee), ("rocket", data.rocket)):
        image = Image.fromarray(loader()).convert("RGB")
        image.thumbnail((400, 400), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        assert buffer.tell() < 60_000, f"{name}.jpg is {buffer.tell()} bytes"
        (out_dir / f"{name}.jpg").write_bytes(buffer.getvalue())


def main() -> None:
    picked = pick_images(shape_labels())
    write_zip(picked, HERE / "sample_shapes.zip")
    write_examples(picked, HERE / "examples")
    print({shape: len(ids) for shape, ids in picked.items()}, (HERE / "sample_shapes.zip").stat().st_size, "bytes")
    for name, write in (("sample_captions.zip", write_captions_zip), ("sample_vqa.zip", write_vqa_zip),
                        ("sample_image_text.zip", write_image_text_zip),
                        ("sample_retrieval.zip", write_retrieval_zip)):
        print(name, write(HERE / name), (HERE / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
