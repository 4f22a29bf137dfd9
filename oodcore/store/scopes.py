"""OOD scopes of a run: every set pooled (""), one group ("group:near") or one set ("set:ninco").

`select(data, scope)` returns a BenchmarkData whose `ood` holds only that scope's rows (and the ODIN
grid's and trained detectors' rows with them), sharing the run's ID rows and fitted states, so every
detector, metric and page works on it unchanged. The honest exposure/held-out split stays the one
of the full run (restricted to the view), so a detector trained on the exposure rows is never
scored on them in any view.
"""

from __future__ import annotations

import numpy as np

from oodcore.store.rundata import BenchmarkData, OdinGrid, OodSet, SplitArrays, TrainedScores

ALL = "all"


def scopes(data: BenchmarkData) -> list[str]:
    """The scopes a user can pick: all sets, each group (when some set has one), each set; [""] for one set."""
    if len(data.ood_sets) <= 1:
        return [ALL]
    groups = list(dict.fromkeys(s.group for s in data.ood_sets if s.group))
    return [ALL, *(f"group:{g}" for g in groups), *(f"set:{s.name}" for s in data.ood_sets)]


def scopes_of_run(run: dict) -> list[str]:
    """`scopes` from a run.json summary (no arrays loaded): what the sidebar offers."""
    sets = run.get("ood_sets") or []
    if len(sets) <= 1:
        return [ALL]
    groups = list(dict.fromkeys(s.get("group") for s in sets if s.get("group")))
    return [ALL, *(f"group:{g}" for g in groups), *(f"set:{s['name']}" for s in sets)]


def scope_label(scope: str) -> str:
    if not scope or scope == ALL:
        return "all OOD sets"
    kind, _, name = scope.partition(":")
    return f"{name} (group)" if kind == "group" else name


def sets_of(data: BenchmarkData, scope: str) -> list[OodSet]:
    """The sets a scope covers; ValueError for a scope the run does not have."""
    if not scope or scope == ALL:
        return list(data.ood_sets)
    kind, _, name = scope.partition(":")
    chosen = [s for s in data.ood_sets if (s.group if kind == "group" else s.name) == name and kind in ("group", "set")]
    if not chosen:
        raise ValueError(f"this run has no OOD {kind or 'scope'} {name!r} (it has: {', '.join(scopes(data)[1:])})")
    return chosen


def _take(split: SplitArrays, rows: np.ndarray) -> SplitArrays:
    return SplitArrays(
        logits=split.logits[rows],
        features=None if split.features is None else split.features[rows],
        labels=split.labels[rows],
        paths=split.paths[rows],
    )


def select(data: BenchmarkData, scope: str) -> BenchmarkData:
    """The run restricted to one scope's OOD rows (the run itself for all sets)."""
    chosen = sets_of(data, scope)
    if not scope or scope == ALL or len(chosen) == len(data.ood_sets):
        return data
    rows = np.concatenate([s.rows for s in chosen])
    sets, start = [], 0
    for s in chosen:
        sets.append(OodSet(s.name, s.group, start, start + s.n))
        start += s.n
    base = rows if data.ood_base is None else data.ood_base[rows]
    odin = data.odin
    if odin is not None:
        odin = OdinGrid(odin.temps, odin.eps, odin.id, odin.ood[rows], odin.tune)
    trained = {k: TrainedScores(v.id, v.ood[rows], v.meta) for k, v in data.trained.items()}
    return BenchmarkData(
        benchmark=data.benchmark,
        arch=data.arch,
        protocol=data.protocol,
        class_ids=data.class_ids,
        class_names=data.class_names,
        id=data.id,
        ood=_take(data.ood, rows),
        head_weight=data.head_weight,
        head_bias=data.head_bias,
        fit=data.fit,
        odin=odin,
        trained=trained,
        meta=data.meta,
        states=data.states,  # fitted on the ID fit split and head only: the same for every scope
        ood_sets=sets,
        tune=data.tune,
        tune_name=data.tune_name,
        ood_base=base,
        n_ood_all=data.n_ood_all if data.n_ood_all is not None else len(data.ood),
    )


def set_column(data: BenchmarkData) -> np.ndarray:
    """Each `ood` row's set name (the scores CSV's `ood_set` column)."""
    out = np.empty(len(data.ood), dtype=object)
    for s in data.ood_sets or [OodSet("ood", None, 0, len(data.ood))]:
        out[s.start : s.stop] = s.name
    return out.astype(str)


def groups(data: BenchmarkData) -> dict[str, list[OodSet]]:
    """Group name -> its sets, in order (sets without a group are in none)."""
    out: dict[str, list[OodSet]] = {}
    for s in data.ood_sets:
        if s.group:
            out.setdefault(s.group, []).append(s)
    return out
