"""Serving the app so that its training children end with it: on SIGTERM / SIGINT each child is asked
to stop at its next step boundary (it writes a checkpoint) and given MMDEMO_STOP_GRACE_S seconds before
it is killed, while the server closes. Once it serves, the default classifier loads in the background
(MMDEMO_PRELOAD)."""

from __future__ import annotations

import signal
import threading

from mmdemo import settings

from . import common

PRELOAD_DELAY_S = 2.0


def serve(demo, **launch_kwargs) -> None:
    """``demo.launch(**launch_kwargs)``, blocking until SIGTERM or SIGINT, then the jobs' shutdown.

    gradio blocks the main thread in ``block_thread`` (a sleep loop that ends on KeyboardInterrupt) and
    leaves SIGTERM at its default (instant death: no cleanup, no atexit); uvicorn runs in a thread and
    installs no handlers. With SSR, gradio installs its own handlers for its Node server at launch: so
    these are installed after launch and hand over to those once the jobs are stopped."""
    demo.launch(prevent_thread_lock=True, **launch_kwargs)
    if settings.preload():  # after a first page has had time to serve without waiting for torch's import
        preloading = threading.Timer(PRELOAD_DELAY_S, common.preload)
        preloading.daemon = True
        preloading.start()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The children are asked to stop at once, while the server closes (which takes seconds): a run
    # near its end must not finish unasked, and the grace counts from the signal.
    jobs_stopping = threading.Thread(target=_stop_jobs, name="mmdemo-shutdown")

    def on_signal(signum, frame):
        if jobs_stopping.is_alive() or jobs_stopping.ident:
            return  # already shutting down: a second Ctrl-C must not cut the children's grace short
        jobs_stopping.start()
        raise KeyboardInterrupt  # ends block_thread, which closes the server

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        demo.block_thread()
    finally:
        if not jobs_stopping.ident:
            jobs_stopping.start()
        jobs_stopping.join()
    for sig, handler in previous.items():
        if callable(handler) and handler not in (signal.default_int_handler, on_signal):
            handler(sig, None)  # e.g. gradio's SSR Node server shutdown


def _stop_jobs() -> None:
    print("Stopping training runs (each saves a checkpoint)...", flush=True)
    common.shutdown_jobs()
