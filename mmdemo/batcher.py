"""Concurrent inference calls for the same model stacked into one forward pass (no torch here).

A caller submits its item (e.g. its preprocessed images) with a key (the model) and the function that runs
a list of items. While a forward runs, the calls that arrive wait; the next forward takes all waiting
items of the oldest waiting call's key at once (up to ``max_rows`` rows) and gives each caller its own
result. Whichever waiting caller finds the batcher free runs that forward: there is no worker thread, so
nothing runs when no call is waiting, and a call that arrives with nothing running starts at once (no
window to wait out). Keys never mix; the oldest waiting key goes first, so none starves.

If a batch of several items fails, each item is run again on its own, so a bad item fails only its caller.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence


class _Call:
    __slots__ = ("key", "run", "item", "rows", "done", "result", "error")

    def __init__(self, key, run, item, rows: int):
        self.key, self.run, self.item, self.rows = key, run, item, rows
        self.done, self.result, self.error = False, None, None

    def finish(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


class Batcher:
    """Stacks concurrent calls of one key into one call of their ``run`` function.

    Args:
        lock: held around each batch (the process's inference lock, which other model calls share).
        max_rows: the most rows (images) one batch takes; an item with more runs alone.
    """

    def __init__(self, lock: threading.Lock | None = None, max_rows: int = 32):
        self._lock = lock or threading.Lock()
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []  # oldest first
        self._busy = False
        self.max_rows = max_rows
        self.batch_sizes: list[int] = []  # items per batch run, the latest 1000 (for tests and benchmarks)

    def submit(self, key: Hashable, run: Callable[[list], Sequence], item, rows: int = 1):
        """``item``'s result of ``run(items)`` (a list with one result per item, in order), run together
        with the other waiting items of ``key``; ``run`` raises for the whole batch or returns a list of
        the same length. Raises what running this item raised."""
        call = _Call(key, run, item, max(1, rows))
        with self._cond:
            self._waiting.append(call)
        while True:
            with self._cond:
                while self._busy and not call.done:
                    self._cond.wait()
                if call.done:
                    break
                self._busy = True
            try:
                with self._lock:
                    with self._cond:  # what arrived while this thread waited for the lock joins too
                        batch = self._take()
                    _run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if call.error is not None:
            raise call.error
        return call.result

    def _take(self) -> list[_Call]:
        """The oldest waiting call and the later ones of its key that fit in max_rows, removed from the queue."""
        first = self._waiting[0]
        batch, rows, rest = [first], first.rows, []
        for call in self._waiting[1:]:
            if call.key == first.key and rows + call.rows <= self.max_rows:
                batch.append(call)
                rows += call.rows
            else:
                rest.append(call)
        self._waiting = rest
        self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
        return batch


def _run(batch: list[_Call]) -> None:
    """Runs ``batch`` as one call; if that fails with several items, each alone. Every call ends done."""
    try:
        try:
            results = list(batch[0].run([c.item for c in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except Exception as e:  # noqa: BLE001 - handed to the callers; one bad item must not fail the rest
            if len(batch) == 1:
                batch[0].finish(error=e)
                return
            for call in batch:
                _run([call])
            return
        for call, result in zip(batch, results):
            call.finish(result)
    finally:
        for call in batch:  # e.g. a KeyboardInterrupt in the running thread: no caller waits forever
            if not call.done:
                call.finish(error=RuntimeError("the batch this call was part of was interrupted"))
