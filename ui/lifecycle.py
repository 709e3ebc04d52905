"""Serving the app so that its training children end with it: SIGTERM / SIGINT close the server,
then each child is asked to stop at its next step boundary (it writes a checkpoint) and given
MMDEMO_STOP_GRACE_S seconds before it is killed."""

from __future__ import annotations

import signal
import threading

from . import common


def serve(demo, **launch_kwargs) -> None:
    """``demo.launch(**launch_kwargs)``, blocking until SIGTERM or SIGINT, then the jobs' shutdown.

    gradio blocks the main thread in ``block_thread`` (a sleep loop that ends on KeyboardInterrupt) and
    leaves SIGTERM at its default (instant death: no cleanup, no atexit); uvicorn runs in a thread and
    installs no handlers. With SSR, gradio installs its own handlers for its Node server at launch: so
    these are installed after launch and hand over to those once the jobs are stopped."""
    demo.launch(prevent_thread_lock=True, **launch_kwargs)
    stopping = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):
        if stopping.is_set():
            return  # already shutting down: a second Ctrl-C must not cut the children's grace short
        stopping.set()
        raise KeyboardInterrupt  # ends block_thread, which closes the server

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        demo.block_thread()
    finally:
        stopping.set()
        print("Stopping training runs (each saves a checkpoint)...", flush=True)
        common.shutdown_jobs()
    for sig, handler in previous.items():
        if callable(handler) and handler not in (signal.default_int_handler, on_signal):
            handler(sig, None)  # e.g. gradio's SSR Node server shutdown
