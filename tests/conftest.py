"""Shared fixtures: the real app, served by `python app.py` in a child process."""

import os

import pytest

# No test may reach the Hub: offline mode before any test module imports huggingface_hub / datasets
# (they read it once, at import), so a Hub id fails at once instead of after minutes of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from appserver import AppProcess, AppStartError  # noqa: E402

STARTUP_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """URL of the app running as `python app.py` with a fresh data directory; stopped at the end,
    together with any training run a test left going."""
    data_dir = tmp_path_factory.mktemp("mmdemo-data")
    log_path = tmp_path_factory.mktemp("mmdemo-app") / "app.log"
    try:
        app = AppProcess(data_dir, log_path, timeout=STARTUP_TIMEOUT_S)
    except AppStartError as e:
        pytest.fail(str(e))
    with app:
        yield app.url
