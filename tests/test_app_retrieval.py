"""The /search, /search_captions and /zero_shot endpoints through gradio_client against the launched app."""

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from test_app_text import trained_run
from test_retrieval import small_retrieval_zip

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT = handle_file(str(ASSETS / "examples/cat.jpg"))
CIRCLE = handle_file(str(ASSETS / "examples/circle.png"))


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_search_and_zero_shot_endpoints(client, app_url, tmp_path):
    sample = small_retrieval_zip(tmp_path / "small.zip", images=24)
    dataset_id = client.predict(handle_file(str(sample)), task="retrieval", api_name="/load_dataset")["dataset_id"]
    with pytest.raises(Exception, match="No retrieval model yet"):
        client.predict("a red circle", dataset_id, api_name="/search")
    run = trained_run(client, "retrieval", sample)
    status = client.predict(run, api_name="/training_status")
    assert {"t2i_recall@1", "i2t_recall@1"} <= set(status["metrics"])

    hits = client.predict("a red circle", dataset_id, checkpoint=run, top_k=3, api_name="/search")
    assert len(hits) == 3 and all(h["file_name"].startswith("images/") for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert client.predict("a red circle", dataset_id, top_k=3, api_name="/search") == hits  # "" = the newest run
    captions = client.predict(CIRCLE, dataset_id, checkpoint=run, top_k=2, api_name="/search_captions")
    assert len(captions) == 2 and all(c["caption"].startswith("a ") for c in captions)

    probs = client.predict(CAT, "cat, rocket, coffee", api_name="/zero_shot")
    assert max(probs, key=probs.get) == "cat" and sum(probs.values()) == pytest.approx(1, abs=1e-3)
    probs = client.predict(CIRCLE, "red circle, blue triangle", checkpoint=run, template="a {}", api_name="/zero_shot")
    assert set(probs) == {"red circle", "blue triangle"}

    # Bad input: clear messages, and the app keeps serving.
    with pytest.raises(Exception, match="Only one label"):
        client.predict(CAT, "cat", api_name="/zero_shot")
    with pytest.raises(Exception, match="No labels given"):
        client.predict(CAT, " , ", api_name="/zero_shot")
    with pytest.raises(Exception, match="reads at most 64"):
        client.predict("a red circle " * 30, dataset_id, checkpoint=run, api_name="/search")
    with pytest.raises(Exception, match="Type what to look for"):
        client.predict("  ", dataset_id, checkpoint=run, api_name="/search")
    other = Client(app_url, verbose=False)  # another user: another workspace
    with pytest.raises(Exception, match="Unknown dataset id"):
        other.predict("a red circle", dataset_id, api_name="/search")
    with pytest.raises(Exception, match="Unknown run id"):
        other.predict(CAT, "cat, dog", checkpoint=run, api_name="/zero_shot")
    classification = trained_run(client, "classification", ASSETS / "sample_shapes.zip")
    with pytest.raises(Exception, match="trained for classification, not retrieval"):
        client.predict("a red circle", dataset_id, checkpoint=classification, api_name="/search")
    assert client.predict("a blue triangle", dataset_id, checkpoint=run, top_k=1, api_name="/search")


def test_the_contrastive_loss_reaches_the_runs_config(client, tmp_path):
    """/start_training's contrastive_loss (the Train tab's retrieval-only setting) lands in config.yaml, as
    /compare_runs reads it back."""
    sample = small_retrieval_zip(tmp_path / "loss.zip", images=12)
    dataset_id = client.predict(handle_file(str(sample)), task="retrieval", api_name="/load_dataset")["dataset_id"]
    runs = [client.predict(dataset_id, max_steps=1, contrastive_loss=loss, api_name="/start_training")["run_id"]
            for loss in ("sigmoid", "infonce")]
    try:
        view = client.predict(runs, api_name="/compare_runs")
        row = next(r for r in view["config"] if r["setting"] == "contrastive_loss")
        assert sorted(v for k, v in row.items() if k != "setting") == ["infonce", "sigmoid"]
    finally:
        for run in runs:
            client.predict(run, api_name="/stop_training")
    with pytest.raises(Exception, match="contrastive_loss must be auto, infonce or sigmoid"):
        client.predict(dataset_id, contrastive_loss="cosine", api_name="/start_training")
