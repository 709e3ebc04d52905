"""Image-text retrieval figures: the offline LiT default on the bundled sample (time, R@k, caption zero-shot
on held-out images), example queries with their top-5 images, the offline zero-shot classifier on
scikit-image's photos, training time per step, and search latency over 10,000 cached embeddings.

    nice -n 5 python bench/retrieval.py [--out /tmp/retrieval-bench] [--skip-train RUN_DIR]

Prints one JSON line per figure, each with the load average it was measured under.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "assets" / "sample_retrieval.zip"
PHOTOS = {"astronaut": "astronaut", "camera": "camera", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket",
          "motorcycle": "stereo_motorcycle", "horse": "horse", "coins": "coins"}
QUERIES = ["a red circle", "a blue triangle", "a gray rectangle", "a triangle that is yellow", "a green shape"]


def emit(**record) -> None:
    print(json.dumps({**record, "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def train(out: Path, method: str = "", max_steps: int = 0) -> tuple[Path, float, float]:
    """Trains the default on the sample as the app's child does; (run dir, wall seconds, CPU seconds of the child)."""
    run = out / f"run-{method or 'default'}-{max_steps}"
    cmd = [sys.executable, "-m", "mmdemo", "train", "--task", "retrieval", "--data", str(SAMPLE), "--output-dir",
           str(run), "--quiet", "--checkpoint-every-minutes", "0"]
    cmd += ["--method", method] if method else []
    cmd += ["--max-steps", str(max_steps)] if max_steps else []
    from mmdemo.procs import child_env

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    # As the app starts its children (threads, niceness, memory limit: mmdemo.procs.child_env).
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=child_env(dict(os.environ)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run, time.time() - t0, cpu


def step_times(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    first, last = records[0]["time"], steps[-1]["time"]
    return {"steps": len(steps), "seconds_per_step": round((last - first) / max(1, len(steps)), 3)}


def caption_zero_shot(run: Path) -> float:
    """Held-out images classified among the sample's 24 colour + shape labels ("a {}" template)."""
    from mmdemo.data import load_splits
    from mmdemo.zeroshot import zero_shot_batch

    val = load_splits(next((run.parent / (run.name + "-data")).glob("datasets/*")))["validation"]
    labels = sorted({c[2:] for caps in val["captions"] for c in caps if "that is" not in c})
    right = 0
    for start in range(0, len(val), 50):
        rows = val.select(range(start, min(len(val), start + 50)))
        probs = zero_shot_batch(list(rows["image"]), labels, str(run), template="a {}")
        right += sum(max(p, key=p.get) == caps[0][2:] for p, caps in zip(probs, rows["captions"]))
    return right / len(val)


def example_queries(run: Path) -> None:
    from mmdemo.imagesearch import search_images

    dataset = next((run.parent / (run.name + "-data")).glob("datasets/*"))
    captions = _captions_by_file(dataset)
    for query in QUERIES:
        t0 = time.time()
        hits = search_images(query, dataset, str(run), top_k=5)
        emit(figure="example_query", query=query, seconds=round(time.time() - t0, 3),
             top5=[f"{h['file_name']} ({captions[h['file_name']]}, {h['score']:.3f})" for h in hits])


def _captions_by_file(dataset: Path) -> dict:
    from mmdemo.data import load_splits

    return {f: caps[0] for ds in load_splits(dataset).values() for f, caps in zip(ds["file_name"], ds["captions"])}


def search_latency(run: Path, n: int = 10_000, queries: int = 30) -> None:
    """The cache slot of the sample's image embeddings filled with n vectors (the sample's real embeddings,
    repeated with a little noise), then queries timed end to end (tokenise, text tower, matrix-vector, top-k)."""
    import torch
    from safetensors.torch import save_file

    from mmdemo.imagesearch import _cache_path, embed_query, image_embeddings, search_images

    dataset = next((run.parent / (run.name + "-data")).glob("datasets/*"))
    big = run.parent / "search-10k"
    if not big.exists():
        import shutil

        shutil.copytree(dataset, big, ignore=shutil.ignore_patterns("embeddings"))
    from mmdemo.retrieval import load_dual

    model = load_dual(str(run))
    real, names = image_embeddings(dataset, str(run), model)
    reps = -(-n // len(real))
    emb = torch.nn.functional.normalize(real.repeat(reps, 1)[:n] + 0.01 * torch.randn(n, real.shape[1]), dim=-1)
    path = _cache_path(big, str(run), "images")
    path.parent.mkdir(exist_ok=True)
    save_file({"embeddings": emb.contiguous()}, str(path),
              metadata={"names": json.dumps([f"{k}/{name}" for k in range(reps) for name in names][:n])})
    search_images("warm up", big, str(run))
    times = []
    for i in range(queries):
        t0 = time.perf_counter()
        search_images(QUERIES[i % len(QUERIES)], big, str(run), top_k=5)
        times.append(time.perf_counter() - t0)
    times.sort()
    # The parts: the query through the text tower, and the scan of the cached embeddings (matrix-vector, top-k).
    cached, _ = image_embeddings(big, str(run), model)
    encode, scan = [], []
    for i in range(queries):
        t0 = time.perf_counter()
        q = embed_query(model, QUERIES[i % len(QUERIES)])
        t1 = time.perf_counter()
        (cached @ q).topk(5)
        encode.append(t1 - t0)
        scan.append(time.perf_counter() - t1)
    encode.sort()
    scan.sort()
    emit(figure="search_latency_10k", embeddings=n, queries=queries, median_ms=round(1000 * times[len(times) // 2], 2),
         p90_ms=round(1000 * times[int(len(times) * 0.9)], 2), text_encode_median_ms=round(1000 * encode[queries // 2], 2),
         scan_median_ms=round(1000 * scan[queries // 2], 2), target_ms=50)


def conse_photos() -> None:
    from PIL import Image
    from skimage import data

    from mmdemo.zeroshot import zero_shot_batch

    labels = list(PHOTOS)
    arrays = [getattr(data, loader)() for loader in PHOTOS.values()]
    arrays = [a[0] if isinstance(a, tuple) else a for a in arrays]  # stereo_motorcycle: (left, right, disparity)
    images = [Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB") for a in arrays]
    for method in ("transfer", "conse"):
        probs = zero_shot_batch(images, labels, "", method=method)
        guesses = [max(p, key=p.get) for p in probs]
        emit(figure="offline_zero_shot_skimage", method=method, labels=labels,
             photos={f"skimage.data.{PHOTOS[label]}": guess for label, guess in zip(labels, guesses)},
             accuracy=round(sum(g == t for g, t in zip(guesses, labels)) / len(labels), 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/retrieval-bench")
    parser.add_argument("--skip-train", help="an existing run of the default on the sample (its -data folder next to it)")
    parser.add_argument("--only-photos", action="store_true", help="with --skip-train: only the zero-shot photos")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.skip_train:
        run = Path(args.skip_train)
    else:
        run, wall, cpu = train(out)
        result = json.loads((run / "eval.json").read_text())
        emit(figure="lit_default_on_sample", wall_s=round(wall, 1), cpu_s=round(cpu, 1), **step_times(run),
             **{k: result[k] for k in ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5",
                                       "t2i_median_rank", "i2t_median_rank", "num_val")})
    if not args.only_photos:
        emit(figure="caption_zero_shot_held_out", accuracy=round(caption_zero_shot(run), 4), labels=24, template="a {}")
        example_queries(run)
        search_latency(run)
    conse_photos()
    if args.only_photos:
        return
    full, wall, cpu = train(out, "full", 5)
    emit(figure="full_method_steps", wall_s=round(wall, 1), cpu_s=round(cpu, 1), **step_times(full))


if __name__ == "__main__":
    main()
