"""Sharing on the Hugging Face Hub: a run's export, model card and push; the Space deployment.

- ``export``: ``export_run`` writes exactly what a push uploads (the run's model/, its config without local
  paths, eval.json, the loss curve and the card), offline.
- ``card``: ``build_model_card`` (Hub metadata + text, per task) and ``plot_loss_curve``.
- ``push``: the network seam ``HubClient``, ``resolve_token``, ``check_write_access``, ``push_run``.
- ``space``: ``space_files`` and ``deploy_space``.
- ``cli``: ``push``, ``export`` and ``space deploy`` for ``python -m mmdemo``.
- ``rundir``: reading a run directory, and telling its local paths from Hub ids.

The network is one small seam, ``HubClient`` (whoami, create_repo, upload_folder): tests pass a recording
fake with the same three methods, everything else runs for real. A token only ever goes to that seam: it is
never written to disk, logged, returned, or put in a card or a message. Importing this package loads no
torch (the Gradio app imports it at start-up).
"""

from .card import build_model_card, plot_loss_curve
from .cli import add_cli_commands, run_cli
from .export import export_run
from .push import HubClient, check_write_access, push_run, push_run_api, resolve_token
from .space import deploy_space, space_files

__all__ = ["HubClient", "resolve_token", "check_write_access", "export_run", "build_model_card", "plot_loss_curve",
           "push_run", "push_run_api", "space_files", "deploy_space", "add_cli_commands", "run_cli"]
