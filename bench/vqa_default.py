"""The offline default VQA model on the bundled sample: default recipe, held-out accuracy and time.

    python bench/vqa_default.py      # one JSON line per figure
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(figure: str, value, unit: str = "", **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, "load": round(os.getloadavg()[0], 2), **extra}),
          flush=True)


def main() -> None:
    from mmdemo.config import TrainConfig
    from mmdemo.data import ingest_dataset
    from mmdemo.training import train

    work = Path(tempfile.mkdtemp(prefix="mmdemo-vqa-"))
    start = time.time()
    summary = ingest_dataset(ROOT / "assets/sample_vqa.zip", work / "ws", task="vqa")
    emit("vqa_sample_ingest_seconds", round(time.time() - start, 1), "s", rows=summary.num_train + summary.num_val)
    start = time.time()
    report = train(TrainConfig(task="vqa", data=summary.path, output_dir=str(work / "run"), log_every=10))
    emit("vqa_default_train_seconds", round(time.time() - start, 1), "s")
    # The validation split holds images never seen in training.
    emit("vqa_default_val_vqa_accuracy", report["vqa_accuracy"], "", num_val=report["num_val"])
    emit("vqa_default_val_exact_match", report["exact_match"], "")


if __name__ == "__main__":
    main()
