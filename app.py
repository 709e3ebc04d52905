"""mmdemo web app: Gradio Blocks over the mmdemo engine (no torch in this module).

Run ``python app.py``; it honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT. The UI lives in ``ui/``
(one module per tab, the API endpoints, the engine calls they share); this module builds and serves it.
"""

from __future__ import annotations

# Re-exported: tests, benchmarks and scripts call the handlers and engine calls as ``app.<name>``.
from mmdemo import api
from mmdemo.api import DEFAULT_CHECKPOINT, resolve_checkpoint
from ui import build_demo, on_load_browser, on_refresh_choices
from ui.api import (api_answer, api_caption, api_classify, api_list_runs, api_load_dataset, api_push_to_hub,
                    api_resume_training, api_start_training, api_stop_training, api_training_status, register_api)
from ui.common import (BASE_MODELS, EXAMPLES, MAX_UPLOAD, METHODS, SAMPLES, TASKS, api_workspace, browser_workspace,
                       file_path, manager, read_image, user_errors)
from ui.common import answer as do_answer
from ui.common import caption as do_caption
from ui.common import classify as do_classify
from ui.dataset_tab import build_dataset_tab, dataset_choices, on_load_dataset, on_sample
from ui.predict_tabs import build_classify_tab, build_text_tab, on_answer, on_caption, on_classify
from ui.train_tab import (build_push_section, build_train_tab, on_pick_dataset, on_push, on_resume, on_start, on_stop,
                          on_tick, run_choices, run_report)

# The engine calls under their earlier names (the job manager is the engine's, the same as manager()'s).
do_load_dataset, do_start_training, do_status, do_stop, do_push = api.ingest, api.start, api.status, api.stop, api.push

__all__ = ["BASE_MODELS", "DEFAULT_CHECKPOINT", "EXAMPLES", "MAX_UPLOAD", "METHODS", "SAMPLES", "TASKS",
           "api_answer", "api_caption", "api_classify", "api_list_runs", "api_load_dataset", "api_push_to_hub",
           "api_resume_training", "api_start_training", "api_stop_training", "api_training_status", "api_workspace",
           "browser_workspace", "build_classify_tab", "build_dataset_tab", "build_demo", "build_push_section",
           "build_text_tab", "build_train_tab", "dataset_choices", "demo", "do_answer", "do_caption", "do_classify",
           "do_load_dataset", "do_push", "do_start_training", "do_status", "do_stop", "file_path", "manager",
           "on_answer", "on_caption", "on_classify", "on_load_browser", "on_load_dataset", "on_pick_dataset", "on_push",
           "on_refresh_choices", "on_resume", "on_sample", "on_start", "on_stop", "on_tick", "read_image",
           "register_api", "resolve_checkpoint", "run_choices", "run_report", "user_errors"]

demo = build_demo()

if __name__ == "__main__":
    from ui.lifecycle import serve

    serve(demo.queue(default_concurrency_limit=4), max_file_size=MAX_UPLOAD)
