"""Distances between histograms, the distances sampling noise alone gives, and the smallest shift that
stands out of that noise.

A fixed threshold means different things at different sample sizes: 20 quantile bins filled by 300
reference rows differ from any span by more than a real drift differs from 30,000. So each distance's
threshold is the larger of a fixed effect size (the smallest drift worth an alert) and the value that
NOISE_QUANTILE of no-drift spans stay under, at this reference and this span size. That null
distribution comes from resampling the reference's counts: the bin masses of the distribution the
reference was drawn from are Dirichlet(reference counts) given those counts (for quantile bins this
is exact: they are spacings of the reference's order statistics), and a span of `m` values drawn from
it is Multinomial(m, masses).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

PSI_FLOOR = 1e-4
"""Smallest bin share PSI uses, so that an empty bin gives a large but finite term."""
METRICS = ("ks", "d1", "psi", "js")
NOISE_QUANTILE = 0.9999
"""Share of spans without drift whose distance stays under its noise threshold (per distance and
feature): a 256-feature model sees a false drift in about one clean span in ten."""
NULL_SAMPLES = 2000
"""Resampled no-drift spans per feature and span size; their tail is extrapolated (see `tail_quantile`)."""
SIZE_STEPS_PER_DOUBLING = 4
"""Span sizes are rounded down to 2**(1/4) steps for the noise model: a few percent more noise
(a conservative threshold), computed once per step instead of once per span."""
SHIFTS_SIGMA = np.geomspace(0.005, 20.0, 240)
"""Mean shifts, in reference standard deviations, tried for the smallest detectable shift."""
SHARE_SHIFTS = np.geomspace(0.0005, 1.0, 240)
"""Shares of values moved between categories, tried for a categorical feature's smallest detectable shift."""


def distance_arrays(reference: np.ndarray, current: np.ndarray, ordered: bool) -> dict[str, np.ndarray]:
    """KS (ordered bins only), D1, PSI and JS distance between a histogram of counts `[k]` and each of
    the histograms `[..., k]` in `current`; also an upper bound on the unbinned KS (`ks_bound`)."""
    p = reference / reference.sum()
    q = current / current.sum(axis=-1, keepdims=True)
    result = {"d1": np.abs(p - q).sum(axis=-1)}
    pf, qf = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    result["psi"] = ((qf - pf) * np.log(qf / pf)).sum(axis=-1)
    m = (p + q) / 2
    safe_m = np.where(m > 0, m, 1.0)
    divergence = sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / safe_m), 0.0).sum(axis=-1)
                     for a in (np.broadcast_to(p, q.shape), q)) / 2
    result["js"] = np.sqrt(np.maximum(divergence, 0.0))
    if ordered:
        gap = np.cumsum(p - q, axis=-1)
        gap[..., -1] = 0.0
        gap = np.concatenate([np.zeros(gap.shape[:-1] + (1,)), gap], axis=-1)
        result["ks"] = np.abs(gap).max(axis=-1)
        within = np.maximum(np.abs(gap[..., :-1]), np.abs(gap[..., 1:])) + np.maximum(p, q)
        result["ks_bound"] = np.minimum(within.max(axis=-1), 1.0)
    return result


def distances(reference: np.ndarray, current: np.ndarray, ordered: bool) -> dict[str, float]:
    """KS (ordered bins only), D1, PSI and JS distance between two histograms of counts."""
    return {name: float(value) for name, value in distance_arrays(reference, current, ordered).items()}


def calibration_size(values: int) -> int:
    """The span size the noise model uses for a span of `values` values: rounded down to a size step."""
    return max(1, int(2 ** (math.floor(math.log2(values) * SIZE_STEPS_PER_DOUBLING) / SIZE_STEPS_PER_DOUBLING)))


class NoiseModel:
    """Noise thresholds per feature and span size for one reference, each computed once.

    Seeded by what they depend on, so a job gives the same verdict every time it runs. Not
    thread-safe: one job run owns it.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, dict[str, float] | float] = {}

    def thresholds(self, name: str, reference: np.ndarray, values: int, ordered: bool) -> dict[str, float]:
        """Per distance, the value that NOISE_QUANTILE of no-drift spans of `values` values stay under."""
        size = calibration_size(values)
        key = ("distances", name, size)
        if key not in self._cache:
            self._cache[key] = _null_quantiles(reference, size, ordered, zlib.crc32(f"{name}:{size}".encode()))
        return self._cache[key]

    def share_limit(self, alpha: float, beta: float, values: int) -> float:
        """The share of a span's values that NOISE_QUANTILE of no-drift spans of `values` values stay
        under, when what the reference shows makes a value's chance Beta(alpha, beta): for a rate
        seen in `k` of `n` reference values, Beta(k, n - k); for falling outside the range of `n`
        reference values, Beta(2, n - 1) (the two outer spacings of their order statistics)."""
        if alpha <= 0:
            return 0.0
        if beta <= 0:
            return 1.0
        size = calibration_size(values)
        key = ("share", alpha, beta, size)
        if key not in self._cache:
            rng = np.random.default_rng(zlib.crc32(f"{alpha}:{beta}:{size}".encode()))
            chance = rng.beta(alpha, beta, NULL_SAMPLES)
            self._cache[key] = tail_quantile(rng.binomial(size, chance) / size, "linear")
        return self._cache[key]


def _null_quantiles(reference: np.ndarray, values: int, ordered: bool, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    support = reference > 0
    masses = rng.standard_gamma(reference[support], size=(NULL_SAMPLES, int(support.sum())))
    masses /= masses.sum(axis=1, keepdims=True)
    current = np.zeros((NULL_SAMPLES, reference.size))
    current[:, support] = rng.multinomial(values, masses)
    null = distance_arrays(reference, current, ordered)
    return {metric: tail_quantile(null[metric], "log" if metric == "psi" else "square")
            for metric in METRICS if metric in null}


def tail_quantile(null: np.ndarray, scale: str) -> float:
    """NOISE_QUANTILE of a null sample too small to hold it: extrapolated from its 90% and 99% quantiles
    on a `scale` where its tail is close to exponential, and never under its 99.9% quantile.

    "square" for KS, D1 and JS (roots of chi-square-like sums; KS's square has the Kolmogorov tail);
    "log" for PSI, whose tail is heavier when bins are nearly empty (its log terms), which overstates
    it a little elsewhere; "linear" for a share of values (a binomial's tail is lighter)."""
    q90, q99, q999 = (float(q) for q in np.quantile(null, [0.9, 0.99, 0.999]))
    decades = -math.log10(1.0 - NOISE_QUANTILE) - 2.0
    if scale == "square":
        value = math.sqrt(q99 * q99 + decades * (q99 * q99 - q90 * q90))
    elif scale == "log" and q90 > 0:
        value = q99 * (q99 / q90) ** decades
    else:
        value = q99 + decades * (q99 - q90)
    return max(value, q999)


def _first_over(distances_by_shift: dict[str, np.ndarray], limits: dict[str, float], shifts: np.ndarray) -> float | None:
    over = np.zeros(shifts.size, dtype=bool)
    for metric, limit in limits.items():
        if metric in distances_by_shift:
            over |= distances_by_shift[metric] > limit
    return float(shifts[np.argmax(over)]) if over.any() else None


def numeric_detectable_shift(reference: dict, limits: dict[str, float], std: float) -> float | None:
    """The smallest mean shift, in reference standard deviations, whose expected distances cross
    `limits` (such a shift is flagged in about half of the spans); None when not computable.

    The reference is taken as uniform within each bin, so a shift moves mass across the bin edges
    in proportion to how far they are passed."""
    edges = np.asarray(reference["edges"], dtype=np.float64)
    counts = np.asarray(reference["bins"], dtype=np.float64)
    if not edges.size or not reference["range"] or not std > 0:
        return None
    knots = np.array([reference["range"][0], *edges, reference["range"][1]])
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    found = []
    for sign in (1.0, -1.0):
        moved = np.interp(edges[None, :] - sign * SHIFTS_SIGMA[:, None] * std, knots, cdf)
        shares = np.diff(np.concatenate([np.zeros((SHIFTS_SIGMA.size, 1)), moved,
                                         np.ones((SHIFTS_SIGMA.size, 1))], axis=1), axis=1)
        shift = _first_over(distance_arrays(counts, shares, ordered=True), limits, SHIFTS_SIGMA)
        if shift is not None:
            found.append(shift)
    return min(found) if found else None


def categorical_detectable_shift(counts: np.ndarray, limits: dict[str, float]) -> float | None:
    """The smallest share of values that, moved from the most frequent category to the second,
    gives expected distances over `limits`; None with fewer than two categories seen."""
    order = np.argsort(-counts, kind="stable")
    if counts.size < 2 or counts[order[1]] == 0:
        return None
    p = counts / counts.sum()
    moved = SHARE_SHIFTS[SHARE_SHIFTS <= p[order[0]]]
    shares = np.tile(p, (moved.size, 1))
    shares[:, order[0]] -= moved
    shares[:, order[1]] += moved
    return _first_over(distance_arrays(counts, shares, ordered=False), limits, moved)
