"""Estimated waits, learned from how long requests take. An estimate, never a promise."""

from __future__ import annotations

from .errors import MAX_RETRY_AFTER_S
from .gate import Gate, Ticket

DEFAULT_SERVICE_S = 10.0
SWAP_PENALTY_S = 5.0
ALPHA = 0.2


class Estimator:
    """Exponential moving averages of service time, overall and per model."""

    def __init__(self) -> None:
        self.overall_s: float | None = None
        self.by_model: dict[str, float] = {}

    def observe(self, model: str, service_s: float) -> None:
        if service_s < 0:
            return
        prev = self.by_model.get(model)
        self.by_model[model] = service_s if prev is None else prev + ALPHA * (service_s - prev)
        o = self.overall_s
        self.overall_s = service_s if o is None else o + ALPHA * (service_s - o)
        if len(self.by_model) > 1000:
            self.by_model.pop(next(iter(self.by_model)))

    def service_s(self, model: str | None = None) -> float:
        if model is not None and model in self.by_model:
            return self.by_model[model]
        return self.overall_s if self.overall_s is not None else DEFAULT_SERVICE_S

    def eta_ms(self, gate: Gate, ticket: Ticket, position: int | None = None) -> int:
        """Expected wait before ``ticket`` starts: requests ahead times their service time."""
        if position is None:
            position = gate.position(ticket)
        if position <= 0:
            return 0
        ahead = position - 1 + gate.active
        per_slot = self.service_s(ticket.model) / gate.parallel
        swap = SWAP_PENALTY_S if ticket.model not in gate.loaded else 0.0
        return int((ahead * per_slot + swap) * 1000)

    def retry_after_s(self, gate: Gate) -> int:
        """When to come back after a 429: about when one slot in the line frees up."""
        wait = self.service_s() * max(1, gate.depth - gate.max_queue + 1) / gate.parallel
        return int(max(1, min(MAX_RETRY_AFTER_S, wait)))
