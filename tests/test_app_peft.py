"""The method endpoints of the real app (conftest.app_url): the parameter count before launch, and the
bake-off's refusal of an id that is not the caller's."""

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

SAMPLE_ZIP = Path(__file__).resolve().parents[1] / "assets" / "sample_shapes.zip"


def test_method_plan_and_bakeoff_status_endpoints(app_url):
    from mmdemo.bakeoff import method_plan

    client = Client(app_url, verbose=False)
    ds = client.predict(file=handle_file(str(SAMPLE_ZIP)), task="classification", api_name="/load_dataset")
    plan = client.predict(ds["dataset_id"], "", "ia3", api_name="/method_plan")
    assert plan["trainable_params"] == method_plan("classification", "efficientnet_lite0", ds["classes"], "ia3")[
        "trainable_params"]
    assert plan["total_params"] > 100 * plan["trainable_params"] and plan["layers"]
    with pytest.raises(AppError, match="method must be one of"):
        client.predict(ds["dataset_id"], "", "nope", api_name="/method_plan")
    with pytest.raises(AppError, match="No bake-off '../x' in this session"):
        client.predict("../x", api_name="/bakeoff_status")
