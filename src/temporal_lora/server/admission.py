"""Admission: a generation request takes one of `max_concurrency` slots (or is shed) and pins the
bundle version it runs on until its last job ends."""

from __future__ import annotations

from collections.abc import Callable

from temporal_lora.server.errors import ServerBusyError, VersionClosedError
from temporal_lora.server.live import Live, Unit
from temporal_lora.server.metrics import Metrics


class Admission:
    """Counts the generation requests in progress; `in_flight` is what GET /health reports."""

    def __init__(self, max_concurrency: int, metrics: Metrics, live: Live):
        self.max_concurrency, self.metrics, self.live = max_concurrency, metrics, live
        self.in_flight = 0

    def admit(self, unit: Unit) -> Callable[[], None]:
        """Take a slot or raise ServerBusyError, and pin `unit` (the live bundle version) until the
        request ends; returns the (idempotent) release of both."""
        if self.in_flight >= self.max_concurrency:
            self.metrics.shed.inc()
            raise ServerBusyError(f"server busy: {self.max_concurrency} requests are in progress; retry shortly")
        if unit.closed:  # cannot happen: a request takes its unit and pins it with no await between
            raise VersionClosedError("the bundle version changed while the request was admitted; retry")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        self.live.pin(unit)
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()
                self.live.unpin(unit)

        return release
