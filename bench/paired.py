"""Paired timing: providers interleaved round by round in a shuffled order, with their spread.

On these noisy 2-core machines a provider timed in a block of its own rounds collects whatever
drift that block met, and with a fixed order the first provider of each round pays for the
previous round's last one (measured ~15% here). Every comparison in bench/ therefore runs the
providers one call each per round, in an order shuffled per round, after a warm-up, and reports
medians with interquartile ranges; a ratio comes with a bootstrap 95% interval of the ratio of
medians, and is called a tie when that interval contains 1.0.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def paired(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    inner: int = 1,
    warmup: int = 3,
    seed: int = 0,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each provider: ``rounds`` samples each, a sample the mean of
    ``inner`` back-to-back calls; ``before`` (untimed) runs before every sample (e.g. a cache
    flush)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            if before is not None:
                before()
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner)
    return samples


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of a provider's samples (seconds)."""

    median: float
    q1: float
    q3: float
    rounds: int

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        if len(samples) < 2:
            v = samples[0]
            return cls(v, v, v, len(samples))
        q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(med, q1, q3, len(samples))


@dataclass(frozen=True)
class Ratio:
    """``baseline / candidate`` time (a speedup of the candidate) with a bootstrap 95% interval."""

    value: float
    low: float
    high: float

    @property
    def tie(self) -> bool:
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        text = f"{self.value:.2f}x [{self.low:.2f}-{self.high:.2f}]"
        return text + " (tie)" if self.tie else text


def ratio(baseline: list[float], candidate: list[float], resamples: int = 2000, seed: int = 0) -> Ratio:
    """Speedup median(baseline) / median(candidate) with a percentile-bootstrap 95% interval
    (both sample sets resampled independently)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, c = np.asarray(baseline, float), np.asarray(candidate, float)
    value = float(np.median(b) / np.median(c))
    boot_b = np.median(b[rng.integers(0, b.size, (resamples, b.size))], axis=1)
    boot_c = np.median(c[rng.integers(0, c.size, (resamples, c.size))], axis=1)
    low, high = np.percentile(boot_b / boot_c, [2.5, 97.5])
    return Ratio(value, float(low), float(high))
