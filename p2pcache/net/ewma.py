"""The one moving average of the network layer (peer latency and bandwidth, own prefill speed)."""

from __future__ import annotations


def ewma(old: float, new: float, alpha: float = 0.3) -> float:
    """Exponentially weighted: ``new`` weighs ``alpha``. The first sample (``old`` 0: nothing
    measured yet) is taken as it is."""
    return new if old == 0 else (1 - alpha) * old + alpha * new
