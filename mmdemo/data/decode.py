"""Decode once: every image becomes a small RGB image and a pixel digest, or an error that names it."""

import hashlib
import io
from pathlib import Path

from mmdemo.errors import UserInputError

from .upload import IMAGE_TYPES, listing, plural


def decode_split(ds, split, decode_fn, features, fn_kwargs, work, describe):
    """Maps `decode_fn` over a split once; returns (readable rows, descriptions of the dropped ones).

    `decode_fn(example, index, **fn_kwargs)` returns the new row with `image`, `digest` and `error`;
    `describe(row)` names a dropped row (given without its image) for the warning.
    """
    import datasets

    ds = ds.cast_column("image", datasets.Image(decode=False))
    # an explicit cache file keeps decoded copies of Hub datasets out of the user's HF cache
    ds = ds.map(decode_fn, with_indices=True, features=features, remove_columns=ds.column_names,
                fn_kwargs=fn_kwargs, cache_file_name=str(work / f"decoded-{split}.arrow"))
    errors = ds["error"]
    bad = [i for i, error in enumerate(errors) if error]
    skipped = [describe(row) for row in ds.select(bad).remove_columns("image")]
    return ds.select([i for i, error in enumerate(errors) if not error]), skipped


def require_readable(decoded, skipped):
    if not any(len(ds) for ds in decoded.values()):
        raise UserInputError(f"None of the images could be read, so nothing usable is left (e.g. {skipped[0]}); "
                             f"upload {IMAGE_TYPES} images.")


def decode_image(ref, source, max_side) -> dict:
    """One image reference ({"path", "bytes"}) -> {"image": PNG/JPEG bytes, "digest", "error"}."""
    try:
        image, fmt = _open_rgb(ref or {}, max_side)
    except Exception as error:  # any decoder failure means a bad file, never a crashed ingest
        too_large = "too large" in str(error) or type(error).__name__ == "DecompressionBombError"
        return {"image": None, "digest": "", "error": "file not found" if isinstance(error, FileNotFoundError) else (
            "too large" if too_large else "not a readable image")}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    digest = hashlib.sha1(image.tobytes() + str(image.size).encode()).hexdigest()
    return {"image": {"bytes": buffer.getvalue(), "path": source}, "digest": digest, "error": ""}


def open_image(path, name: str | None = None):
    """An image file to predict on -> a loaded PIL image, or a UserInputError naming the file. A file over
    MAX_PIXELS is refused from its header, before its pixels are decoded."""
    import warnings

    from PIL import Image

    from mmdemo import data

    name = name or Path(str(path)).name
    too_large = UserInputError(f"'{name}' has more than {data.MAX_PIXELS:,} pixels, the limit for an image; scale it "
                               "down (e.g. to 4000 x 4000) and try again.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as image:
                if image.width * image.height > data.MAX_PIXELS:
                    raise too_large
                image.load()
                return image.copy()
    except UserInputError:
        raise
    except Image.DecompressionBombError:
        raise too_large from None
    except (OSError, ValueError, SyntaxError, EOFError):  # what Pillow's decoders raise for a bad file
        raise UserInputError(f"Could not read the image '{name}': use a JPEG, PNG or WebP file.") from None


def _open_rgb(ref, max_side):
    """Decodes one image to RGB (EXIF rotation applied, alpha on white), longer side <= max_side."""
    from PIL import Image, ImageOps

    from mmdemo import data  # read at call time: mmdemo.data.MAX_PIXELS is the public knob

    with Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"]) as image:
        if image.width * image.height > data.MAX_PIXELS:
            raise ValueError("too large")
        fmt = "JPEG" if image.format == "JPEG" else "PNG"  # re-encoding a JPEG as PNG only costs disk
        image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2..1/8 scale: far less memory and time
        image = to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image, fmt


def to_rgb(image):
    """Any PIL mode -> RGB: transparency composited on white, 16-bit grey scaled to 8 bits."""
    from PIL import Image

    if image.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits, a plain convert clips it to white
        image = image.convert("I").point(lambda v: v * (1 / 257))
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def duplicate_warning(splits) -> list[str]:
    """Names validation/test images whose pixels equal a training image's (scores would be inflated)."""
    seen = set(splits["train"]["digest"])
    dupes = [f"{split}: {source}" for split, ds in splits.items() if split != "train"
             for digest, source in zip(ds["digest"], ds["source"]) if digest in seen]
    if not dupes:
        return []
    return [f"Found {plural(len(dupes), 'validation/test image')} identical to training images "
            f"({listing(dupes, 5)}); remove the copies so the scores are not inflated."]
