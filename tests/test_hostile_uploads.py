"""A generated corpus of hostile and broken uploads.

Each case runs through `mmdemo.data.ingest_dataset` and must end in a UserInputError whose text names
the problem, or in a dataset whose warnings name what was skipped; either way nothing is written outside
the workspace. A few run through the real app too, which must keep serving afterwards.
"""

import io
import json
import os
import random
import re
import struct
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from PIL import Image

from appserver import AppProcess
from mmdemo.data import ingest_dataset, load_splits
from mmdemo.errors import UserInputError



# --- builders ---------------------------------------------------------------------------------


def png(color=(10, 20, 30), size=(16, 16), mode="RGB", fmt="PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def classes(n=3, names=("cats", "dogs")) -> dict:
    return {f"{name}/{i}.png": png((60 * c + 5, 9 * i, 100)) for c, name in enumerate(names) for i in range(n)}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    return buffer.getvalue()


def write_zip(path: Path, files, compression=zipfile.ZIP_DEFLATED) -> Path:
    """files: name -> bytes / str, or name -> (bytes, ZipInfo tweak) for symlinks and the like; a list of
    (name, content) pairs may repeat a name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": that is the point of one case
        for name, content in (files.items() if isinstance(files, dict) else files):
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if isinstance(content, tuple):
                content, tweak = content
                tweak(info)
            archive.writestr(info, content)
    return path


def symlink(info):
    info.external_attr = 0o120777 << 16
    info.create_system = 3


def zipped(files: dict, compression=zipfile.ZIP_DEFLATED) -> Callable:
    return lambda up, root: write_zip(up / "upload.zip", files() if callable(files) else files, compression)


def lone(name: str, content, images: dict | None = None) -> Callable:
    """A metadata file uploaded on its own (images next to it)."""
    def build(up: Path, root: Path) -> Path:
        for rel, data in (images or {}).items():
            (up / rel).parent.mkdir(parents=True, exist_ok=True)
            (up / rel).write_bytes(data)
        (up / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return up / name
    return build


def raw(name: str, content: bytes) -> Callable:
    def build(up: Path, root: Path) -> Path:
        (up / name).write_bytes(content)
        return up / name
    return build


def absolute_member(up: Path, root: Path) -> Path:
    # Aimed inside the sentinel folder: a naive extractor would write exactly there.
    return write_zip(up / "upload.zip", {**classes(), str(root / "abs-evil.png"): png()})


def corrupt_deflate(up: Path, root: Path) -> Path:
    path = write_zip(up / "upload.zip", {**classes(), "cats/big.png": png(size=(64, 64)) + os.urandom(4096)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("cats/big.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 10, start + 60):  # scramble the compressed stream itself
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def lying_entry_count(up: Path, root: Path) -> Path:
    """400 entries whose end record claims 1: the flood is judged by the directory's size."""
    path = write_zip(up / "upload.zip", {f"{i:04d}-" + "x" * 150: b"" for i in range(400)})
    data = bytearray(path.read_bytes())
    end = len(data) - 22  # the end record, no comment
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)
    path.write_bytes(bytes(data))
    return path


def truncated_zip(up: Path, root: Path) -> Path:
    path = write_zip(up / "upload.zip", classes())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def nested() -> dict:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        for name, data in classes(names=("birds", "fish")).items():
            archive.writestr(name, data)
    return inner.getvalue()


def noise(n: int) -> bytes:
    return random.Random(0).randbytes(n)


def latin1_csv() -> bytes:
    return "file_name,label\ncats/0.png,chat\ncats/1.png,chat\ndogs/0.png,chien\ndogs/1.png,été\n".encode("latin-1")


BIG_CELL = "file_name,label\ncats/0.png," + "x" * 200_000 + "\n"
DEEP_JSON = "[" * 100_000 + "]" * 100_000 + "\n"


# --- the corpus -------------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    build: Callable  # (upload folder, sentinel root) -> source path
    outcome: str  # "error": UserInputError matching; "warns": a warning matches; "ok": no warnings
    pattern: str = ""
    task: str = "classification"
    env: dict = {}


CAPTION_ROWS = "".join(json.dumps({"file_name": f"images/{i}.png", "text": f"shape {i}"}) + "\n" for i in range(4))
CAPTION_IMAGES = {f"images/{i}.png": png((40 * i, 10, 10)) for i in range(4)}

CASES = [
    # zip slip: '..', absolute paths, drive letters, backslashes, symlinks
    Case("zip-dotdot", zipped({**classes(), "../../../../../../../evil.png": png()}), "error",
         r"unsafe entry '\.\./\.\./.*evil.png' \(absolute path, '\.\.' or symlink\)"),
    Case("zip-absolute", absolute_member, "error", r"unsafe entry '/.*abs-evil.png'"),
    Case("zip-drive-letter", zipped({**classes(), "C:\\Windows\\evil.png": png()}), "error", r"unsafe entry 'C:"),
    Case("zip-backslash-dotdot", zipped({**classes(), "cats\\..\\..\\..\\..\\evil.png": png()}), "error",
         r"unsafe entry"),
    Case("zip-symlink-file", zipped({**classes(), "cats/passwd.png": ("/etc/passwd", symlink)}), "error",
         r"unsafe entry 'cats/passwd.png'"),
    Case("zip-symlink-dir", zipped({"up": ("../../../../..", symlink), **classes()}), "error", r"unsafe entry 'up'"),
    # nested archives
    Case("zip-nested-zip", zipped({**classes(), "more/inner.zip": nested()}), "warns",
         r"Skipped 1 nested archive \(more/inner.zip\): archives inside the zip are not opened"),
    Case("zip-only-a-nested-zip", zipped({"inner.zip": nested()}), "error",
         r"No images found in 'upload.zip' \(it holds another archive, inner.zip: unzip that"),
    # zip bombs: total size, compression ratio, member count (caps from the environment)
    Case("bomb-ratio", zipped(lambda: {**classes(), "cats/zeros.png": b"\0" * (64 << 20)}), "error",
         r"'upload.zip' looks like a zip bomb: 'cats/zeros.png' unpacks to more than 100 times its compressed size"),
    Case("bomb-total-size", zipped(lambda: {**classes(), "cats/noise.bmp": noise(3 << 20)}, zipfile.ZIP_STORED),
         "error",
         r"'upload.zip' unpacks to more than 1 MB, the limit of this app \(MMDEMO_MAX_UNZIPPED_MB\)",
         env={"MMDEMO_MAX_UNZIPPED_MB": "1"}),
    Case("bomb-members", zipped({**classes(), **{f"cats/x{i}.png": png((i, i, i)) for i in range(60)}}), "error",
         r"'upload.zip' holds more than 50 entries, the limit of this app \(MMDEMO_MAX_ZIP_MEMBERS\)",
         env={"MMDEMO_MAX_ZIP_MEMBERS": "50"}),
    Case("bomb-members-flood", zipped({f"e{i}": b"" for i in range(400)}), "error", r"holds more than 100 entries",
         env={"MMDEMO_MAX_ZIP_MEMBERS": "100"}),
    Case("bomb-members-lying-count", lying_entry_count, "error", r"holds more than 100 entries",
         env={"MMDEMO_MAX_ZIP_MEMBERS": "100"}),
    Case("zip-bzip2", zipped(classes(), zipfile.ZIP_BZIP2), "error", r"bzip2 or LZMA compression.*Deflate"),
    Case("zip-corrupt-stream", corrupt_deflate, "error", r"'upload.zip' is damaged or password-protected"),
    Case("zip-truncated", truncated_zip, "error", r"'upload.zip' is not a zip archive"),
    Case("zip-zero-bytes", raw("upload.zip", b""), "error", r"'upload.zip' is empty \(0 bytes\)"),
    Case("zip-not-a-zip", raw("upload.zip", b"PK but not really" * 10), "error", r"'upload.zip' is not a zip archive"),
    # images: bombs, truncated, corrupt, wrong extensions, empty, odd modes, odd names, repeats, junk
    Case("image-bomb-header", zipped({**classes(), "cats/bomb.png": png_declaring(40_000, 40_000)}), "warns",
         r"Skipped 1 unreadable image: cats/bomb.png \(too large\)"),
    Case("image-truncated-png", zipped({**classes(), "cats/cut.png": png(size=(64, 64))[:60]}), "warns",
         r"cats/cut.png \(not a readable image\)"),
    Case("image-truncated-jpeg", zipped({**classes(), "dogs/cut.jpg": png(size=(64, 64), fmt="JPEG")[:300]}), "warns",
         r"dogs/cut.jpg \(not a readable image\)"),
    Case("image-corrupt", zipped({**classes(), "cats/noise.jpg": noise(5000)}), "warns",
         r"cats/noise.jpg \(not a readable image\)"),
    Case("image-text-named-png", zipped({**classes(), "dogs/notes.png": "hello, I am text"}), "warns",
         r"dogs/notes.png \(not a readable image\)"),
    Case("image-png-named-jpg", zipped({**classes(), "cats/really-a-png.jpg": png((1, 2, 3))}), "ok"),
    Case("image-named-txt", zipped({**classes(), "cats/photo.txt": png(), "README.md": "# my data"}), "warns",
         r"Ignored 2 files that are neither images nor metadata: cats/photo.txt, README.md"),
    Case("image-zero-bytes", zipped({**classes(), "cats/empty.png": b""}), "warns",
         r"cats/empty.png \(not a readable image\)"),
    Case("image-modes", zipped({**classes(), "cats/cmyk.jpg": png((0, 0, 255, 0), mode="CMYK", fmt="JPEG"),
                                "cats/16bit.png": png(40000, mode="I;16"),
                                "dogs/palette-alpha.png": palette_with_transparency(),
                                "dogs/la.png": png((9, 200), mode="LA")}), "ok"),
    Case("names-unicode-spaces", zipped({f"{name}/{stem} {i}.png": png((60 * c, 9 * i, 7)) for c, (name, stem) in
                                         enumerate([("chats noirs", "ねこ"), ("perros ñ", "perro é")])
                                         for i in range(3)}), "ok"),
    Case("names-duplicate", zipped([*classes().items(), ("cats/0.png", png((200, 1, 1))),
                                    ("dogs/./1.png", png((1, 200, 1)))]), "warns",
         r"Skipped 2 repeated entries \(cats/0.png, dogs/./1.png\): the zip holds the same path more than once"),
    Case("names-file-and-folder", zipped({**classes(), "cats/x.png": png(), "cats/x.png/y.png": png((3, 3, 3))}),
         "warns", r"Skipped 1 file that cannot be unpacked here.*cats/x.png/y.png"),
    Case("names-too-long", zipped({**classes(), "cats/" + "n" * 300 + ".png": png()}), "warns",
         r"cannot be unpacked here.*cats/nnnn"),
    Case("junk-hidden", zipped({**classes(), "__MACOSX/cats/._0.png": b"\0\5fork", "cats/.DS_Store": b"\0\0",
                                "Thumbs.db": b"\xd0\xcf", "dogs/desktop.ini": "[x]", ".git/HEAD.png": b"x"}), "ok"),
    # metadata: columns, missing files, size, encoding, broken syntax
    Case("meta-missing-column", zipped({**classes(), "metadata.csv": "file_name,caption\ncats/0.png,hi\n"}), "error",
         r"'metadata.csv' has columns file_name, caption; expected 'file_name'.*and 'label'"),
    Case("meta-missing-file-classification",
         zipped({**classes(), "metadata.csv": "file_name,label\n" + "".join(
             f"{rel},{rel.split('/')[0]}\n" for rel in classes()) + "cats/gone.png,cats\n"}), "warns",
         r"Skipped 1 unreadable image: cats/gone.png \(file not found\)"),
    Case("meta-missing-file-captioning",
         zipped({**CAPTION_IMAGES, "metadata.jsonl": CAPTION_ROWS + '{"file_name": "images/gone.png", "text": "x"}\n'}),
         "error", r"metadata.jsonl line 5 \(images/gone.png\): the image is not in the upload", task="captioning"),
    Case("meta-enormous", lone("metadata.csv", "file_name,label\n" + "cats/0.png,cats\n" * 20_000, classes()),
         "error", r"'metadata.csv' is 0.3 MB, more than the 0.1 MB limit for metadata files \(MMDEMO_MAX_METADATA_MB\)",
         env={"MMDEMO_MAX_METADATA_MB": "0.1"}),
    Case("meta-latin1", lone("metadata.csv", latin1_csv(), classes()), "error",
         r"'metadata.csv' is not UTF-8 text \(byte 0xe9 at position \d+\); save it as UTF-8"),
    Case("meta-latin1-in-zip", zipped({**classes(), "metadata.csv": latin1_csv()}), "error",
         r"'metadata.csv' is not UTF-8 text.*save it as UTF-8"),
    Case("meta-binary-garbage", lone("metadata.jsonl", noise(4000), CAPTION_IMAGES), "error",
         r"'metadata.jsonl' is not (a text file|UTF-8 text).*save it as UTF-8", task="captioning"),
    Case("meta-nul-bytes", lone("metadata.jsonl", CAPTION_ROWS.encode() + b"\0\0\0", CAPTION_IMAGES), "error",
         r"'metadata.jsonl' is not a text file \(it contains binary data\).*save it as UTF-8", task="captioning"),
    Case("meta-huge-csv-cell", lone("metadata.csv", BIG_CELL, classes()), "error",
         r"Line \d+ of 'metadata.csv' is not valid CSV \(field larger than field limit"),
    Case("meta-deep-json", lone("metadata.jsonl", DEEP_JSON, CAPTION_IMAGES), "error",
         r"Line 1 of 'metadata.jsonl' is not a JSON object", task="captioning"),
    Case("meta-upper-case-suffix", lone("METADATA.CSV", "file_name,label\n", classes()), "error",
         r"Rename 'METADATA.CSV' to end in lower-case .csv"),
    Case("meta-empty", lone("metadata.jsonl", b"", CAPTION_IMAGES), "error", r"'metadata.jsonl' is empty",
         task="captioning"),
]


def snapshot(root: Path, skip: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1
            for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_upload(case, tmp_path, monkeypatch):
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "sentinel"  # the workspace sits deep inside it: an escape lands in the snapshot
    upload, workspace = root / "upload", root / "deep" / "er" / "ws"
    upload.mkdir(parents=True)
    workspace.mkdir(parents=True)
    source = case.build(upload, root)
    before = snapshot(root, workspace)
    if case.outcome == "error":
        with pytest.raises(UserInputError, match=case.pattern):
            ingest_dataset(source, workspace, task=case.task)
        assert not list((workspace / "datasets").glob("*")), "a failed ingest left a dataset behind"
    else:
        summary = ingest_dataset(source, workspace, task=case.task)
        if case.outcome == "ok":
            assert summary.warnings == [], summary.warnings
        else:
            assert any(re.search(case.pattern, w) for w in summary.warnings), summary.warnings
        assert sum(len(ds) for ds in load_splits(summary.path).values()) >= 4
    assert snapshot(root, workspace) == before, "something was written outside the workspace"
    stray = [p for p in workspace.rglob("*") if p.is_file() and "datasets" not in p.relative_to(workspace).parts]
    assert stray == [] and not (workspace / "tmp").exists()  # no empty work folder either


def test_zip_extraction_stops_at_the_cap_while_streaming(tmp_path, monkeypatch):
    """The byte cap is enforced on what is decompressed, as it is decompressed: a 24 MB member under a
    1 MB cap is abandoned after at most one chunk past the cap, not unpacked and then measured."""
    monkeypatch.setenv("MMDEMO_MAX_UNZIPPED_MB", "1")
    monkeypatch.setenv("MMDEMO_MAX_ZIP_RATIO", "0")  # off: the size cap alone must stop it
    path = write_zip(tmp_path / "upload.zip", {**classes(), "cats/zeros.bmp": b"\0" * (24 << 20)})
    read = 0
    original = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        nonlocal read
        data = original(self, n)
        read += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    with pytest.raises(UserInputError, match=r"unpacks to more than 1 MB"):
        ingest_dataset(path, tmp_path / "ws")
    assert read <= (1 << 20) + (1 << 20) + 64 * 1024, f"read {read} bytes before stopping"


def test_limits_are_read_from_the_environment(tmp_path, monkeypatch):
    from mmdemo.data.upload import LIMITS, limit

    assert limit("MMDEMO_MAX_UNZIPPED_MB") == LIMITS["MMDEMO_MAX_UNZIPPED_MB"] > 0
    monkeypatch.setenv("MMDEMO_MAX_ZIP_RATIO", "7.5")
    assert limit("MMDEMO_MAX_ZIP_RATIO") == 7.5
    monkeypatch.setenv("MMDEMO_MAX_ZIP_RATIO", "lots")
    with pytest.raises(ValueError, match="MMDEMO_MAX_ZIP_RATIO must be a number"):
        limit("MMDEMO_MAX_ZIP_RATIO")


# --- the same through the real app -------------------------------------------------------------

MAX_UPLOAD = "200kb"


@pytest.fixture(scope="module")
def small_app(tmp_path_factory):
    """The app with MMDEMO_MAX_UPLOAD=200kb and a data directory of its own."""
    data_dir = tmp_path_factory.mktemp("hostile-data")
    log = tmp_path_factory.mktemp("hostile-app") / "app.log"
    with AppProcess(data_dir, log, env={"MMDEMO_MAX_UPLOAD": MAX_UPLOAD}) as app:
        yield app.url, data_dir


def test_upload_over_the_size_limit_names_the_limit(small_app, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    url, _ = small_app
    big = write_zip(tmp_path / "big.zip", {"cats/noise.png": noise(300_000)}, zipfile.ZIP_STORED)
    client = Client(url, verbose=False)
    # gradio_client refuses before sending, naming the server's limit (200 kB = 204800 bytes) ...
    with pytest.raises(ValueError, match=r"exceeds the maximum file size of 204800 bytes"):
        client.predict(file=handle_file(str(big)), task="classification", api_name="/load_dataset")
    # ... and the server itself refuses a raw upload with 413 and the same limit.
    with open(big, "rb") as f:
        response = httpx.post(url + "/gradio_api/upload", files={"files": ("big.zip", f)})
    assert response.status_code == 413 and "maximum allowed size of 204800 bytes" in response.text


def test_hostile_uploads_through_the_app_then_a_valid_one(small_app, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, data_dir = small_app
    client = Client(url, verbose=False)
    escape = Path("/tmp") / f"mmdemo-escape-{uuid.uuid4().hex}.png"
    up = tmp_path / "up"
    cases = [
        (write_zip(up / "slip.zip", {**classes(), "../" * 12 + str(escape).lstrip("/"): png()}), r"unsafe entry"),
        (write_zip(up / "abs.zip", {**classes(), str(escape): png()}), r"unsafe entry '/tmp/mmdemo-escape"),
        (write_zip(up / "bomb.zip", {**classes(), "cats/zeros.png": b"\0" * (32 << 20)}), r"looks like a zip bomb"),
        (lone("metadata.csv", latin1_csv(), classes())(up, up), r"not UTF-8 text.*save it as UTF-8"),
    ]
    for path, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(file=handle_file(str(path)), task="classification", api_name="/load_dataset")
    assert not escape.exists()
    bombed = write_zip(up / "pixels.zip", {**classes(), "cats/bomb.png": png_declaring(40_000, 40_000)})
    summary = client.predict(file=handle_file(str(bombed)), task="classification", api_name="/load_dataset")
    assert any("cats/bomb.png (too large)" in w for w in summary["warnings"])
    # The app keeps serving: a valid upload from a fresh client works, and nothing is left half-done.
    ok = Client(url, verbose=False).predict(file=handle_file(str(write_zip(up / "ok.zip", classes()))),
                                            task="classification", api_name="/load_dataset")
    assert sorted(ok["classes"]) == ["cats", "dogs"] and ok["warnings"] == []
    assert not [p for p in data_dir.glob("users/*/tmp/*")]
