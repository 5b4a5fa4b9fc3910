"""Calibrated input reservations: learn how the upstream counts input tokens against the estimate.

The estimate (`usage/estimate.py`) is ~4 bytes per token; real tokenizers differ (CJK text is about a token
per 3-byte character, code and JSON are denser than prose, each provider frames messages its own way), and
a reservation below the actual usage is the one overshoot the budget bound allows. So for every
`(provider, model, product)` the gate keeps the ratio actual / estimated input tokens of the last
`window` requests whose usage the upstream reported, and reserves `ceil(estimate * multiplier)` input
tokens, where the multiplier is a high quantile of those ratios (not the mean: a reservation must cover
the requests that count more than usual, not the average one).

- A key never seen reserves with `seed` (2.0: twice the 4-bytes rule covers CJK, code and the
  tokenizers measured). Until `min_samples` ratios are in, the multiplier is the largest of the seed and
  what was seen, so a model that counts more than the seed is covered from its first settled request.
- From `min_samples` on, the multiplier is the `quantile` of the ring alone: a model whose estimates were
  too high converges down (no permanent over-reservation starving a budget near its limit), never below
  `floor`. A model that starts counting more is covered once its new ratios reach the top of the ring
  (with a window of 32 and the 0.9 quantile: after 4 requests).
- Memory is bounded: `window` floats per key and at most `max_keys` keys (the least recently observed
  key goes first; model names come from clients).
- Every request a budget applies to teaches its key. Requests no budget applies to teach it too (so a
  budget added later, or one covering part of the traffic, is sized from all of it), all of them until
  the key's window is full, then one in `sample_every`: estimating every one of them would cost more than
  the gate itself does on that path.

Failure policy: this only sizes reservations; it never raises on the request path (`observe` ignores
unusable numbers), and the gate keeps the budget invariant whatever the multiplier is.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque

__all__ = ["DEFAULT_SEED", "Calibration", "CalibrationKey"]

DEFAULT_SEED = 2.0

CalibrationKey = tuple[str, str, str]  # (provider, model, product)


class _Ring:
    """The last `window` ratios in arrival order, the same kept sorted (for the quantile), the multiplier,
    and the unbudgeted requests seen since the last one sampled (`wants_sample`)."""

    __slots__ = ("multiplier", "ordered", "ratios", "skipped")

    def __init__(self, multiplier: float) -> None:
        self.ratios: deque[float] = deque()
        self.ordered: list[float] = []
        self.multiplier = multiplier
        self.skipped = 0


class Calibration:
    """Per-(provider, model, product) input-token multipliers, learned from settled usage.

    Args:
        window: ratios kept per key.
        quantile: which quantile of them is the multiplier (0.9: the 4th largest of 32).
        seed: the multiplier of a key never seen, and its lower bound until `min_samples` ratios are in.
        min_samples: ratios needed before the multiplier may go below the seed.
        floor: the least multiplier (a reservation never shrinks below this share of the estimate).
        max_keys: keys kept; the least recently observed is dropped past it.
        sample_every: once a key's window is full, one in this many requests without a budget teaches it
            (`wants_sample`); requests a budget applies to always do.

    Example:
        calibration = Calibration()
        key = ("openai", "gpt-4o", "chat.completions")
        calibration.reserve(key, 100)  # 200: the seed
        for _ in range(3):
            calibration.observe(key, estimated=100, actual=130)
        calibration.reserve(key, 100)  # 130
    """

    def __init__(
        self,
        *,
        window: int = 32,
        quantile: float = 0.9,
        seed: float = DEFAULT_SEED,
        min_samples: int = 3,
        floor: float = 0.25,
        max_keys: int = 4096,
        sample_every: int = 8,
    ) -> None:
        if min(window, max_keys, min_samples, sample_every) < 1:
            raise ValueError("window, min_samples, max_keys and sample_every must be >= 1")
        if not 0.0 < quantile <= 1.0:
            raise ValueError("quantile must be in (0, 1]")
        if not 0.0 < floor <= seed:
            raise ValueError("floor must be > 0 and <= seed")
        self.window = window
        self.quantile = quantile
        self.seed = seed
        self.min_samples = min_samples
        self.floor = floor
        self.max_keys = max_keys
        self.sample_every = sample_every
        self._rings: OrderedDict[CalibrationKey, _Ring] = OrderedDict()  # least recently observed first

    def __len__(self) -> int:
        return len(self._rings)

    def multiplier(self, key: CalibrationKey) -> float:
        """The multiplier the next reservation of `key` uses."""
        ring = self._rings.get(key)
        return self.seed if ring is None else ring.multiplier

    def reserve(self, key: CalibrationKey, estimated: int) -> int:
        """Input tokens to reserve for an estimate of `estimated` (rounded up)."""
        if estimated <= 0:
            return 0
        ring = self._rings.get(key)
        return math.ceil(estimated * (self.seed if ring is None else ring.multiplier))

    def wants_sample(self, key: CalibrationKey) -> bool:
        """Whether to learn from a request no budget applies to (the gate asks before estimating it): always
        until the key's window is full, then one in `sample_every`. Budgeted requests always teach; the
        rest only keep the ring current, and estimating each would cost them more than the gate does."""
        ring = self._rings.get(key)
        if ring is None or len(ring.ratios) < self.window:
            return True
        ring.skipped += 1
        if ring.skipped < self.sample_every:
            return False
        ring.skipped = 0
        return True

    def observe(self, key: CalibrationKey, estimated: int, actual: int) -> None:
        """Learn from one settled request: `actual` input tokens (upstream-reported) for `estimated`."""
        if estimated <= 0 or actual <= 0:
            return  # nothing to compare (no text, or no usage)
        rings = self._rings
        ring = rings.get(key)
        if ring is None:
            if len(rings) >= self.max_keys:
                rings.popitem(last=False)
            ring = rings[key] = _Ring(self.seed)
        else:
            rings.move_to_end(key)
        ratio = actual / estimated
        ratios, ordered = ring.ratios, ring.ordered
        if len(ratios) >= self.window:  # the oldest ratio leaves both (a sorted list of <= window floats)
            del ordered[bisect.bisect_left(ordered, ratios.popleft())]
        ratios.append(ratio)
        bisect.insort(ordered, ratio)
        n = len(ordered)
        value = ordered[min(n - 1, max(0, math.ceil(self.quantile * n) - 1))]
        if n < self.min_samples:
            value = max(value, self.seed)
        ring.multiplier = max(value, self.floor)
