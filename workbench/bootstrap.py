"""Study metrics and their bootstrap confidence intervals.

A metric is a function of per-column means over the cases of a study ("rows"): a plain
mean, a share, a paired difference, the harmonic mean S of three means, even a
correlation (a function of the means of x, y, x^2, y^2, xy). Writing every metric that way
makes the percentile bootstrap one vectorized step: resample rows, take the column means
of each resample, combine. A row where a column is missing (None) is skipped for that
column only.

    m = Metric("S", ("ES", "PS", "NS"), combine=harmonic, unit="%")
    est = estimate(rows, m, n_resamples=2000, seed=0)    # Estimate(value, low, high, n)
    est = estimate(rows, m, cluster="model")              # resample models, then cases within each

Rows measured on several trained models are not independent draws: cases of one model share
its training. `cluster=` makes the bootstrap two-stage (resample the clusters, then the rows
within each drawn cluster), so the interval carries the spread between models too. With one
cluster it is the plain row bootstrap, number for number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError

Column = Callable[[Mapping[str, Any]], "float | bool | None"]


def _getter(column: Column | str) -> Column:
    if isinstance(column, str):
        key = column
        return lambda row: row.get(key)
    return column


def _first(*means: float) -> float:
    return means[0]


@dataclass(frozen=True)
class Metric:
    """A named statistic of the study's rows: `combine(*column means)`.

    `columns` are row keys or functions row -> number (None: missing). Without `combine`
    the metric is the mean of its single column. `scale` multiplies the result (100 for
    percent).
    """

    name: str
    columns: tuple[Column | str, ...]
    combine: Callable[..., float] | None = None
    description: str = ""
    unit: str = ""
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.columns:
            raise WorkbenchError(f"metric {self.name!r} needs at least one column")
        if self.combine is None and len(self.columns) != 1:
            raise WorkbenchError(f"metric {self.name!r} has {len(self.columns)} columns; give combine= to reduce them")

    def table(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """[n_rows, n_columns] float64, NaN where a row has no value."""
        getters = [_getter(c) for c in self.columns]
        out = np.full((len(rows), len(getters)), np.nan)
        for i, row in enumerate(rows):
            for j, get in enumerate(getters):
                value = get(row)
                if value is not None:
                    v = float(value)
                    if math.isfinite(v):
                        out[i, j] = v
        return out

    def from_means(self, means: Sequence[float]) -> float:
        if any(not math.isfinite(m) for m in means):
            return math.nan
        value = (self.combine or _first)(*[float(m) for m in means])
        return float(value) * self.scale if value is not None and math.isfinite(value) else math.nan

    def value(self, rows: Sequence[Mapping[str, Any]]) -> float:
        table = self.table(rows)
        return self.from_means(_nanmean(table))

    def per_row(self, rows: Sequence[Mapping[str, Any]]) -> list[float | None]:
        """Each row's own value (the metric of that row alone; None where undefined)."""
        out: list[float | None] = []
        for row in rows:
            v = self.from_means(self.table([row])[0])
            out.append(None if not math.isfinite(v) else v)
        return out


@dataclass(frozen=True)
class Estimate:
    """A metric's value over all rows and its percentile bootstrap interval."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    level: float
    n_resamples: int
    n_clusters: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"value": self.value, "ci": [self.low, self.high], "n": self.n, "level": self.level,
               "n_resamples": self.n_resamples}
        if self.n_clusters is not None:
            out["n_clusters"] = self.n_clusters
        return out


def _nanmean(table: np.ndarray) -> np.ndarray:
    counts = np.sum(~np.isnan(table), axis=0)
    sums = np.nansum(table, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def estimate(rows: Sequence[Mapping[str, Any]], metric: Metric, *, n_resamples: int = 2000, level: float = 0.95,
             seed: int = 0, cluster: Column | str | None = None) -> Estimate:
    """The metric over `rows` with a seeded percentile bootstrap interval.

    Without `cluster` the bootstrap resamples rows. With `cluster` (a row key or function naming
    each row's cluster, e.g. "model") it resamples clusters, then rows within each drawn cluster;
    among the rows that carry data, a single cluster gives exactly the row bootstrap. The interval
    is None when fewer than two rows carry data or when more than 5% of the resamples leave the
    metric undefined.
    """
    if not 0 < level < 1:
        raise WorkbenchError(f"level {level}: expected a confidence level in (0, 1), e.g. 0.95")
    table = metric.table(rows)
    has_data = ~np.all(np.isnan(table), axis=1)
    n = int(has_data.sum())
    value = metric.from_means(_nanmean(table))
    groups = None
    if cluster is not None:
        get = _getter(cluster)
        labels = [get(r) for r, keep in zip(rows, has_data) if keep]
        groups = list(dict.fromkeys(labels))
    n_clusters = None if groups is None else len(groups)
    if n < 2 or n_resamples <= 0:
        return Estimate(_none(value), None, None, n, level, 0, n_clusters)
    table = table[has_data]
    rng = np.random.default_rng(seed)
    if groups is not None and len(groups) > 1:
        position = {g: i for i, g in enumerate(groups)}
        members = [np.flatnonzero(np.array([position[g] for g in labels]) == i) for i in range(len(groups))]
        sums, counts = _cluster_resample(table, members, n_resamples, rng)
    else:
        idx = rng.integers(0, n, size=(n_resamples, n))
        samples = table[idx]  # [B, n, k]
        counts = np.sum(~np.isnan(samples), axis=1)
        sums = np.nansum(samples, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)  # [B, k]
    if metric.combine is None:
        stats = means[:, 0] * metric.scale
    else:
        stats = np.array([metric.from_means(row) for row in means])
    finite = stats[np.isfinite(stats)]
    if finite.size < 0.95 * n_resamples:
        return Estimate(_none(value), None, None, n, level, n_resamples, n_clusters)
    lo, hi = np.quantile(finite, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Estimate(_none(value), float(lo), float(hi), n, level, n_resamples, n_clusters)


def _cluster_resample(table: np.ndarray, members: Sequence[np.ndarray], n_resamples: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample column sums and counts of a two-stage bootstrap: `len(members)` clusters drawn
    with replacement, then each drawn cluster's rows drawn with replacement ([B, k] each)."""
    k = table.shape[1]
    filled = np.nan_to_num(table, nan=0.0)
    present = (~np.isnan(table)).astype(np.float64)
    picks = rng.integers(0, len(members), size=(n_resamples, len(members)))
    sums = np.zeros((n_resamples, k))
    counts = np.zeros((n_resamples, k))
    for g, rows in enumerate(members):
        times = np.count_nonzero(picks == g, axis=1)  # how often each resample drew this cluster
        owner = np.repeat(np.arange(n_resamples), times * len(rows))
        draws = rows[rng.integers(0, len(rows), size=owner.size)]
        for j in range(k):
            sums[:, j] += np.bincount(owner, weights=filled[draws, j], minlength=n_resamples)
            counts[:, j] += np.bincount(owner, weights=present[draws, j], minlength=n_resamples)
    return sums, counts


# --- combiners and metric builders ----------------------------------------------------------

def harmonic(*values: float) -> float:
    """Harmonic mean; 0 when any value is <= 0 (CounterFact's S)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def difference(a: float, b: float) -> float:
    return a - b


def ratio(a: float, b: float) -> float:
    """a / b (NaN when b is ~0): e.g. a measured effect over the effect a finding predicted."""
    return a / b if abs(b) > 1e-12 else math.nan


def correlation(mx: float, my: float, mxx: float, myy: float, mxy: float) -> float:
    """Pearson r from the means of x, y, x^2, y^2 and xy (NaN when a variance is ~0)."""
    vx, vy = mxx - mx * mx, myy - my * my
    if vx <= 1e-12 or vy <= 1e-12:
        return math.nan
    return (mxy - mx * my) / math.sqrt(vx * vy)


def mean_of(name: str, column: Column | str, **kwargs: Any) -> Metric:
    return Metric(name, (column,), **kwargs)


def share_of(name: str, predicate: Callable[[Mapping[str, Any]], bool | None], **kwargs: Any) -> Metric:
    """Share of rows where `predicate` holds (rows where it returns None are skipped)."""

    def col(row: Mapping[str, Any]) -> float | None:
        v = predicate(row)
        return None if v is None else float(bool(v))

    return Metric(name, (col,), **kwargs)


def paired_difference(name: str, a: Column | str, b: Column | str, **kwargs: Any) -> Metric:
    """Mean of a - b over rows that have both (a paired comparison)."""
    ga, gb = _getter(a), _getter(b)

    def col(row: Mapping[str, Any]) -> float | None:
        x, y = ga(row), gb(row)
        return None if x is None or y is None else float(x) - float(y)

    return Metric(name, (col,), **kwargs)


def correlation_of(name: str, x: Column | str, y: Column | str, **kwargs: Any) -> Metric:
    """Pearson correlation of x and y across rows (rows missing either are skipped)."""
    gx, gy = _getter(x), _getter(y)

    def both(row: Mapping[str, Any]) -> tuple[float, float] | None:
        a, b = gx(row), gy(row)
        return None if a is None or b is None else (float(a), float(b))

    cols: tuple[Column, ...] = (
        lambda r: None if (p := both(r)) is None else p[0],
        lambda r: None if (p := both(r)) is None else p[1],
        lambda r: None if (p := both(r)) is None else p[0] ** 2,
        lambda r: None if (p := both(r)) is None else p[1] ** 2,
        lambda r: None if (p := both(r)) is None else p[0] * p[1],
    )
    return Metric(name, cols, combine=correlation, **kwargs)


def wilson_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion (better than the bootstrap for small n)."""
    if n <= 0:
        return None, None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get their average rank); None when either side is constant."""
    if len(x) != len(y):
        raise WorkbenchError(f"spearman needs paired values; got {len(x)} and {len(y)}")

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        order = np.argsort(a, kind="stable")
        r = np.empty_like(a)
        r[order] = np.arange(len(a), dtype=np.float64)
        for value in np.unique(a):  # average rank over ties
            tied = a == value
            r[tied] = r[tied].mean()
        return r - r.mean()

    rx, ry = ranks(x), ranks(y)
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else None
