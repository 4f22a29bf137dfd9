"""The bootstrap's replicate metrics, computed over the ID tie groups in replicate blocks (numpy only).

`metrics.bootstrap_replicates` gives every replicate the five metrics of `metrics._weighted_metrics`
with count weights.  That core works on B x N prefix sums over all N pooled samples: a scatter, two
cumulative sums and some ten B x N float64 passes.  Here the same numbers come from the structure of
the pooled sort:

- The OOD-positive metrics (AUROC, AUPR-Out, FPR@95) change only at the K tie groups holding OOD
  samples (K <= n_ood, 2k against 52k pooled samples at ImageNet scale).  They need the ID weight
  before and through each of those groups, which are read off the ID pass below at 2K rows, and the
  OOD weight there, from the B x n_ood OOD counts.  Then the very formulas of the core run on B x K.
- The ID-positive metrics (AUPR-In, FPR@95-In) need, at each ID tie group, the ID weight at or below it
  (from one exclusive cumulative sum down the ID groups) and the OOD weight at or below it, which is
  constant between two OOD groups (a row of a (K + 1) x B table).  One pass down the ID groups in
  cache-sized chunks, on a replicate block laid out (rows, replicates), computes both and the
  cumulative sums the OOD side reads.  Replicate blocks run on the cores side by side.

Counts are integers, so every cumulative weight, AUROC, FPR@95 and FPR@95-In are exactly the core's; the
two average precisions sum the same float64 terms in another order (equal to ~1e-15; the tests check
both paths against each other and scikit-learn on explicitly resampled arrays).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from oodcore.evaluation.resample import TPR_LEVEL, bootstrap_counts

_ROWS = 2048  # ID groups per chunk: (rows, replicates) temporaries of ~0.8 MB (int32) at 100 replicates
_THREADS = max(1, min(2, os.cpu_count() or 1))
_INT = np.int32  # the ID pass's integer weights: sums of counts up to n_id (< 2^31)


@functools.lru_cache(maxsize=4)
def count_blocks(n_id: int, n_ood: int, n_boot: int, seed: int, blocks: int) -> tuple:
    """The shared bootstrap counts, transposed into `blocks` replicate blocks: ((start, stop, (n_id, b), (n_ood, b)), ...).

    Each block is C-contiguous with the replicates last, so a chunk of ID rows is one contiguous read.  Drawn
    once per (class sizes, n_boot, seed) like `resample.bootstrap_counts` (read-only, shared by every method).
    """
    c_id, c_ood = bootstrap_counts(n_id, n_ood, n_boot, seed)
    bounds = np.linspace(0, n_boot, max(1, min(blocks, n_boot)) + 1).astype(int)
    out = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        t_id = np.ascontiguousarray(c_id[start:stop].T)
        t_ood = np.ascontiguousarray(c_ood[start:stop].T)
        t_id.setflags(write=False)
        t_ood.setflags(write=False)
        out.append((int(start), int(stop), t_id, t_ood))
    return tuple(out)


class _Layout:
    """What every replicate block shares for one sorted pool: the ID and OOD samples in sorted order and their groups."""

    def __init__(self, ps) -> None:
        n = ps.scores.size
        group_of = np.zeros(n, dtype=np.int64)
        group_of[ps.group_ends[:-1] + 1] = 1
        np.cumsum(group_of, out=group_of)
        orig = np.empty(n, dtype=np.int64)  # original index within its class, by sorted position
        orig[ps.pos_id] = np.arange(ps.pos_id.size)
        orig[ps.pos_ood] = np.arange(ps.pos_ood.size)
        id_pos = np.flatnonzero(~ps.is_ood)
        ood_pos = np.flatnonzero(ps.is_ood)
        self.id_order = orig[id_pos]  # ID samples, best (highest score) first
        self.ood_order = orig[ood_pos]
        id_group = group_of[id_pos]
        ood_group = group_of[ood_pos]
        self.id_groups = ps.id_groups  # = unique(id_group): the ID-side columns of the core
        self.ood_groups = ps.ood_groups
        # samples -> tie groups: group g holds the class's sorted samples bounds[g]:bounds[g + 1], or None when no
        # two samples of the class share a score
        self.id_bounds = _group_bounds(id_group, self.id_groups.size)
        self.ood_bounds = _group_bounds(ood_group, self.ood_groups.size)
        # per ID group: the first OOD group at or after it; OOD weight at or below it is OLE[q]
        self.q = np.searchsorted(self.ood_groups, self.id_groups, side="left")
        # the ID weight before / through OOD group k is the exclusive ID cumulative sum at these ID-group rows
        self.before_rows = np.searchsorted(self.id_groups, self.ood_groups, side="left")
        self.through_rows = np.searchsorted(self.id_groups, self.ood_groups, side="right")


def _group_bounds(group: np.ndarray, n_groups: int) -> np.ndarray | None:
    """Where each tie group's samples start in a class's sorted samples, and their count at the end (n_groups + 1
    entries); None when every sample is its own group."""
    if n_groups == group.size:
        return None
    return np.append(np.flatnonzero(np.diff(group, prepend=-1)), group.size)


def _cumsum_rows(x: np.ndarray, m: int = 32) -> np.ndarray:
    """In-place cumulative sum down the rows of a C-contiguous (r, b) array of integers (or of integer-valued floats).

    numpy's cumsum runs one scalar at a time (~3 ns an element here); this adds whole rows instead: the rows
    are cut into blocks of m, each block is summed down in m - 1 row additions that run over every block at
    once, then each block gets the total of the blocks before it.  Integer sums are exact in any order, so the
    result equals np.cumsum(x, axis=0).
    """
    r = x.shape[0]
    n_blk = r // m
    done = 0
    if n_blk >= 2:
        head = x[: n_blk * m].reshape(n_blk, m, x.shape[1])
        for k in range(1, m):
            head[:, k] += head[:, k - 1]
        before = np.cumsum(head[:-1, -1], axis=0)  # totals of the blocks before block 1, 2, ...
        head[1:] += before[:, None, :]
        done = n_blk * m
    for i in range(max(done, 1), r):
        x[i] += x[i - 1]
    return x


def _ood_cumulative(layout: _Layout, c_ood_t: np.ndarray) -> np.ndarray:
    """(K, b) OOD weight through each OOD tie group, from the (n_ood, b) counts."""
    w = _cumsum_rows(c_ood_t[layout.ood_order].astype(np.float64))
    if layout.ood_bounds is None:
        return w
    return w[layout.ood_bounds[1:] - 1]  # read at each group's last sample (see `_id_pass`)


def _id_pass(layout: _Layout, c_id_t: np.ndarray, ole: np.ndarray, t_id: np.ndarray) -> tuple:
    """One pass down the ID groups: (AP-In numerator, ID groups with ID recall >= 95%, ci_before, ci) per replicate.

    A chunk's rows are gathered from the (n_id, b) counts as contiguous (rows, b) reads, and every step after
    adds, divides or reduces whole rows of b replicates; weights stay int32 (half the memory traffic of float64)
    until the one float64 division.
    """
    n_groups = layout.id_groups.size
    b = c_id_t.shape[1]
    k = layout.ood_groups.size
    t_int = t_id.astype(np.int64)
    carry = np.zeros(b, dtype=np.int64)  # ID weight in the groups before the chunk
    ap = np.zeros(b)
    n_sat = np.zeros(b, dtype=np.int64)
    ci_before = np.empty((k, b))
    ci = np.empty((k, b))
    bounds = layout.id_bounds
    for g0 in range(0, n_groups, _ROWS):
        g1 = min(g0 + _ROWS, n_groups)
        if bounds is None:
            a = c_id_t[layout.id_order[g0:g1]].astype(_INT)
            id_le = _cumsum_rows(a.copy())
        else:
            # the cumulative sum over the chunk's samples, read at each group's last sample, is the cumulative sum
            # over its groups (np.add.reduceat down rows would cost a call per group); a group's weight is its step
            s0 = bounds[g0]
            id_le = _cumsum_rows(c_id_t[layout.id_order[s0 : bounds[g1]]].astype(_INT))[
                bounds[g0 + 1 : g1 + 1] - s0 - 1
            ]
            a = np.diff(id_le, axis=0, prepend=0)
        # ID weight at or below each group: the total less the weight in the groups before it (integers: exact)
        np.subtract((t_int - carry).astype(_INT), id_le, out=id_le)
        id_le += a
        carry = t_int - id_le[-1] + a[-1]
        for rows, out in ((layout.before_rows, ci_before), (layout.through_rows, ci)):
            lo, hi = np.searchsorted(rows, [g0, g1], side="left")
            out[lo:hi] = t_int - id_le[rows[lo:hi] - g0]
        # ID recall falls down the rows: count the rows at >= 95% whole chunks at a time
        first_ok = id_le[0] / t_id >= TPR_LEVEL
        last_ok = id_le[-1] / t_id >= TPR_LEVEL
        n_sat += np.where(last_ok, g1 - g0, 0)
        for r in np.flatnonzero(first_ok & ~last_ok):  # where it crosses 95% (once per replicate)
            n_sat[r] += np.count_nonzero(id_le[:, r] / t_id[r] >= TPR_LEVEL)
        tot = ole[layout.q[g0:g1]]
        tot += id_le
        # count weights: tot is 0 only where id_le is 0 too (precision 0, as the core), else >= 1
        np.maximum(tot, 1, out=tot)
        prec = np.divide(id_le, tot, dtype=np.float64)  # integers divided in float64, as the core divides them
        prec *= a
        ap += prec.sum(axis=0)
    for rows, out in ((layout.before_rows, ci_before), (layout.through_rows, ci)):
        out[rows >= n_groups] = carry  # OOD groups after every ID group: all the ID weight is before them
    return ap, n_sat, ci_before, ci


def _block_metrics(layout: _Layout, c_id_t: np.ndarray, c_ood_t: np.ndarray, ood_side) -> dict:
    """The five metrics of one replicate block (arrays of length b)."""
    b = c_id_t.shape[1]
    t_id = c_id_t.sum(axis=0, dtype=np.int64).astype(np.float64)
    t_ood = c_ood_t.sum(axis=0, dtype=np.int64).astype(np.float64)
    if np.any(t_id <= 0) or np.any(t_ood <= 0):
        raise ValueError("every weighting needs positive total weight on both ID and OOD")
    co = _ood_cumulative(layout, c_ood_t)  # (K, b)
    # (K + 1, b): OOD weight at or below an ID group whose first OOD group at or after it is k
    ole = np.empty((co.shape[0] + 1, b), dtype=_INT)
    ole[0] = t_ood
    np.subtract(t_ood, co, out=ole[1:], casting="unsafe")  # integer-valued: exact
    ap, n_sat, ci_before, ci = _id_pass(layout, c_id_t, ole, t_id)
    co_t = np.ascontiguousarray(co.T)
    co_before = np.concatenate([np.zeros((b, 1)), co_t[:, :-1]], axis=1)
    out = ood_side(co_before, co_t, np.ascontiguousarray(ci_before.T), np.ascontiguousarray(ci.T), t_id, t_ood)
    out["aupr_in"] = ap / t_id
    out["fpr95_in"] = ole[layout.q[n_sat - 1], np.arange(b)].astype(np.float64) / t_ood
    return out


def replicate_metrics(ps, n_boot: int, seed: int, ood_side) -> dict[str, np.ndarray]:
    """Per-replicate metrics of the stratified bootstrap over the sorted pool `ps` (a `metrics.PooledSort`).

    `ood_side(co_before, co, ci_before, ci, t_id, t_ood)` is the core's OOD-positive arithmetic on B x K
    arrays, passed in so that both paths share it.
    """
    layout = _Layout(ps)
    blocks = count_blocks(ps.pos_id.size, ps.pos_ood.size, int(n_boot), int(seed), _THREADS)
    parts = {}

    def run(block) -> None:
        start, stop, c_id_t, c_ood_t = block
        parts[start] = (stop, _block_metrics(layout, c_id_t, c_ood_t, ood_side))

    if len(blocks) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(blocks)) as pool:
            list(pool.map(run, blocks))
    else:
        run(blocks[0])
    names = next(iter(parts.values()))[1].keys()
    out = {name: np.empty(int(n_boot)) for name in names}
    for start, (stop, m) in parts.items():
        for name in names:
            out[name][start:stop] = m[name]
    return out
