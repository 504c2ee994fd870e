"""Admission control for the label server's predictions: a few at a time, a bounded queue, 503 beyond.

MONAI Label 0.8.5 runs ``POST /infer/{model}`` inside the event loop, so one prediction stalls every
other request (``/info/``, ``/train/`` status, uploads) until it ends, and concurrent clients pile up
with no bound and no answer. :mod:`medunet.label.asgi` runs that same endpoint in a worker thread
behind an :class:`InferGate`: at most ``running`` predictions compute at once, at most ``waiting``
more wait their turn, and any request beyond that is refused at once with :class:`Busy` (HTTP 503
with ``Retry-After``), so memory stays bounded whatever the number of clients. Pure asyncio: usable
without monailabel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

__all__ = ["Busy", "InferGate", "gate_from_conf", "RETRY_AFTER_S"]

#: seconds a refused client is asked to wait before trying again
RETRY_AFTER_S = 5


class Busy(RuntimeError):
    """Every prediction slot and queue place is taken; ``str()`` says so in one line."""


class InferGate:
    """At most ``running`` predictions at once and ``waiting`` queued; the rest get :class:`Busy`.

    Args:
        running: predictions computed concurrently (1 by default: one prediction already uses every
            CPU core, or the GPU).
        waiting: requests allowed to wait for a slot; 0 refuses any request while one runs.

    Example:
        >>> gate = InferGate(running=1, waiting=4)
        >>> async def handle():
        ...     async with gate.admit():
        ...         ...  # predict
    """

    def __init__(self, running: int = 1, waiting: int = 16) -> None:
        if int(running) < 1 or int(waiting) < 0:
            raise ValueError(f"infer gate needs running >= 1 and waiting >= 0, got {running} and {waiting}")
        self.running, self.waiting = int(running), int(waiting)
        self._slots = asyncio.Semaphore(self.running)
        self.admitted = 0  # running + waiting now (the event loop is the only writer)
        self.refused = 0
        self.served = 0
        self.peak = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Wait for a prediction slot, or raise :class:`Busy` at once when the queue is full."""
        if self.admitted >= self.running + self.waiting:
            self.refused += 1
            raise Busy(f"server busy: {self.running} prediction(s) running and {self.waiting} waiting "
                       f"(the most it queues); retry in {RETRY_AFTER_S} s")
        self.admitted += 1
        self.peak = max(self.peak, self.admitted)
        try:
            async with self._slots:
                yield
                self.served += 1
        finally:
            self.admitted -= 1

    def stats(self) -> dict[str, int]:
        """Counters since start: ``served``, ``refused``, ``peak`` admitted, ``admitted`` now, limits."""
        return {"running": self.running, "waiting": self.waiting, "admitted": self.admitted,
                "served": self.served, "refused": self.refused, "peak": self.peak}


def gate_from_conf(conf: Mapping[str, str] | None) -> InferGate:
    """The gate set by the app's ``--conf infer_concurrency N`` and ``--conf infer_queue M``.

    Raises:
        ValueError: a value is not a whole number in range.
    """
    conf = conf or {}
    values = {}
    for key, default in (("infer_concurrency", 1), ("infer_queue", 16)):
        raw = conf.get(key, default)
        try:
            values[key] = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"--conf {key} {raw!r}: not a whole number") from None
    return InferGate(values["infer_concurrency"], values["infer_queue"])
