"""Rebuilds the sample dataset and the example photos that ship with the app.

    python assets/make_samples.py

Needs `easy-vqa` (shapes, MIT) and `scikit-image` (photos, CC0 / public domain) from PyPI; no network.
The output is byte-for-byte reproducible: fixed image choice, fixed zip timestamps, sorted entries.
"""

import io
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = ("circle", "rectangle", "triangle")
PER_CLASS = 40
ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed so the zip does not change on every rebuild
SHAPE_QUESTIONS = {"what shape is in the image?", "what shape does the image contain?", "what shape is present?"}


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
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for shape in SHAPES:
            for image_id in picked[shape]:
                info = zipfile.ZipInfo(f"{shape}/{image_id:04d}.png", date_time=ZIP_DATE)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, Path(paths[image_id]).read_bytes())


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


if __name__ == "__main__":
    main()
