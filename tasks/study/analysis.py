"""From the study's counts (collect.Grid) to its tables and headline numbers, every one with a bootstrap interval.

The headline metric is the chance-corrected hit rate of the NEW concepts, (hit − chance) / (1 − chance) averaged
over them (characters and artists have different chances): 0 = no better than chance, 1 = every image hits.
* steps to level — the first step at which an arm's mean curve reaches `level` × the best mean value either arm
  reached (linear between checkpoints; never reached = censored);
* arm differences — flow − ε at each matched step, at the final step, over the whole curve (area) and in steps to
  level, all paired by training seed;
* forgetting — the OLD concepts' corrected hit rate at the final step minus the base's (the base sampled as an ε
  model, the way it was trained);
* control — the share of control images (prompts naming no concept) the probe puts on a new concept, against the
  share it would by chance (new concepts of the kind / concepts of the kind).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.study import stats
from tasks.study.collect import Grid

BASE_ARM = "ddpm"  # the base is an ε model: its own numbers are the ε sampler's step 0


@dataclass
class Analysis:
    steps: list[int]
    arms: list[str]
    seeds: list[int]
    level: float | None  # the corrected new-concept level of steps-to-level (None: nothing learned)
    best: float  # the best mean corrected new-concept value of either arm (point estimate)
    headline: dict[str, Any] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)  # per (group, kind, arm, step)
    difference: list[dict[str, Any]] = field(default_factory=list)  # per step: flow − ε
    forgetting: list[dict[str, Any]] = field(default_factory=list)  # per (arm, step)
    control: list[dict[str, Any]] = field(default_factory=list)  # per (kind, arm, step)
    concepts: list[dict[str, Any]] = field(default_factory=list)  # per concept
    points: list[dict[str, Any]] = field(default_factory=list)  # per (arm, step, concept): the hit rate
    per_seed: list[dict[str, Any]] = field(default_factory=list)  # per (seed, arm)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _iv(point: float, replicates: np.ndarray, confidence: float) -> dict[str, float]:
    return stats.interval(point, replicates, confidence).as_dict()


def _r(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def analyse(grid: Grid, groups: dict[str, str], *, level: float = 0.5, reps: int = 2000,
            confidence: float = 0.95, seed: int = 0) -> Analysis:
    """groups: concept -> "new" | "old". Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    arms, steps = list(grid.arms), np.asarray(grid.steps, dtype=np.float64)
    fa, ea = arms.index("flow"), arms.index(BASE_ARM)
    draws = stats.seed_draws(len(grid.seeds), reps, rng)
    rate0 = stats.pooled_rates(grid.hits, grid.n)  # [A, T, C]
    rateb = stats.bootstrap_rates(grid.hits, grid.n, draws, rng)  # [B, A, T, C]
    z0, zb = stats.normalise(rate0, grid.chance), stats.normalise(rateb, grid.chance)
    new = np.array([groups.get(c) == "new" for c in grid.concepts])
    old = np.array([groups.get(c) == "old" for c in grid.concepts])
    new0, newb = stats.group_mean(z0, new), stats.group_mean(zb, new)  # [A, T], [B, A, T]
    old0, oldb = stats.group_mean(z0, old), stats.group_mean(zb, old)

    best = float(np.nanmax(new0)) if np.isfinite(new0).any() else float("nan")
    lvl = level * best if np.isfinite(best) and best > 0 else None
    out = Analysis(steps=[int(s) for s in grid.steps], arms=arms, seeds=list(grid.seeds), level=_r(lvl),
                   best=_r(best) if np.isfinite(best) else 0.0)
    h: dict[str, Any] = {"level_fraction": level, "confidence": confidence, "replicates": reps}

    # --- new concepts: final value, area, steps to level, and the arm differences ----------------------------
    h["final"] = {a: _iv(new0[i, -1], newb[:, i, -1], confidence) for i, a in enumerate(arms)}
    h["final_diff"] = _iv(new0[fa, -1] - new0[ea, -1], newb[:, fa, -1] - newb[:, ea, -1], confidence)
    auc0, aucb = stats.area_under(new0, steps), stats.area_under(newb, steps)
    h["area"] = {a: _iv(auc0[i], aucb[:, i], confidence) for i, a in enumerate(arms)}
    h["area_diff"] = _iv(auc0[fa] - auc0[ea], aucb[:, fa] - aucb[:, ea], confidence)
    if lvl is not None:
        t0, tb = stats.steps_to_level(new0, steps, lvl), stats.steps_to_level(newb, steps, lvl)
        h["steps_to_level"] = {a: _iv(t0[i], tb[:, i], confidence) for i, a in enumerate(arms)}
        d = stats.difference(tb[:, fa], tb[:, ea])
        h["steps_diff"] = _iv(stats.difference(t0[fa], t0[ea]), d, confidence)
        h["steps_undecided"] = float(np.isnan(d).mean())  # replicates where neither arm reached the level
        h["steps_censored"] = {a: float(np.isinf(tb[:, i]).mean()) for i, a in enumerate(arms)}
    for t, step in enumerate(out.steps):
        out.difference.append({"step": step, **_iv(new0[fa, t] - new0[ea, t], newb[:, fa, t] - newb[:, ea, t],
                                                     confidence)})

    # --- the base and forgetting -------------------------------------------------------------------------
    h["base_old"] = _iv(old0[ea, 0], oldb[:, ea, 0], confidence)
    h["base_new"] = _iv(new0[ea, 0], newb[:, ea, 0], confidence)
    h["forgetting"] = {a: _iv(old0[i, -1] - old0[ea, 0], oldb[:, i, -1] - oldb[:, ea, 0], confidence)
                       for i, a in enumerate(arms)}
    for i, a in enumerate(arms):
        for t, step in enumerate(out.steps):
            out.forgetting.append({"arm": a, "step": step,
                                   **_iv(old0[i, t] - old0[ea, 0], oldb[:, i, t] - oldb[:, ea, 0], confidence)})

    # --- curves: raw mean hit rate per group and kind (the plots), corrected per group ------------------
    for grp, mask in (("new", new), ("old", old)):
        for kind in dict.fromkeys(grid.kinds):
            m = mask & (np.asarray(grid.kinds) == kind)
            if not m.any():
                continue
            raw0, rawb = stats.group_mean(rate0, m), stats.group_mean(rateb, m)
            chance = float(np.nanmean(grid.chance[m]))
            for i, a in enumerate(arms):
                for t, step in enumerate(out.steps):
                    out.curves.append({"group": grp, "kind": kind, "arm": a, "step": step, "concepts": int(m.sum()),
                                       "chance": round(chance, 4), **_iv(raw0[i, t], rawb[:, i, t], confidence)})

    # --- control: share of control images put on a new concept of each kind ------------------------------
    h["control"] = {}
    for kind in dict.fromkeys(grid.kinds):
        m = new & (np.asarray(grid.kinds) == kind)
        if not m.any():
            continue
        share = float(m.sum() / (np.asarray(grid.kinds) == kind).sum())  # the share under no preference
        ch = grid.ctrl_hits[..., m].sum(-1)  # [A, S, T]
        c0 = stats.pooled_rates(ch, grid.ctrl_n)
        cb = stats.bootstrap_rates(ch, grid.ctrl_n, draws, rng)
        h["control"][kind] = {"chance_share": round(share, 4),
                              **{a: _iv(c0[i, -1], cb[:, i, -1], confidence) for i, a in enumerate(arms)}}
        for i, a in enumerate(arms):
            for t, step in enumerate(out.steps):
                out.control.append({"kind": kind, "arm": a, "step": step, "chance_share": round(share, 4),
                                    **_iv(c0[i, t], cb[:, i, t], confidence)})

    # --- per concept: the base, each arm's final value and change, flow − ε ------------------------------
    ctrl0 = stats.pooled_rates(grid.ctrl_hits, np.broadcast_to(grid.ctrl_n[..., None], grid.ctrl_hits.shape))
    for c, concept in enumerate(grid.concepts):
        row: dict[str, Any] = {"concept": concept, "kind": grid.kinds[c], "group": groups.get(concept, "old"),
                               "chance": _r(grid.chance[c]),
                               "base": _iv(rate0[ea, 0, c], rateb[:, ea, 0, c], confidence)}
        for i, a in enumerate(arms):
            row[a] = _iv(rate0[i, -1, c], rateb[:, i, -1, c], confidence)
            row[f"{a}_change"] = _iv(rate0[i, -1, c] - rate0[ea, 0, c], rateb[:, i, -1, c] - rateb[:, ea, 0, c],
                                     confidence)
            row[f"{a}_control"] = _r(ctrl0[i, -1, c])
        row["diff"] = _iv(rate0[fa, -1, c] - rate0[ea, -1, c], rateb[:, fa, -1, c] - rateb[:, ea, -1, c], confidence)
        out.concepts.append(row)

    # --- every (arm, step, concept): the raw hit rate and its interval --------------------------------------
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(rateb, [alpha, 1.0 - alpha], axis=0, method="inverted_cdf")  # [A, T, C] each
    for i, a in enumerate(arms):
        for t, step in enumerate(out.steps):
            for c, concept in enumerate(grid.concepts):
                out.points.append({"arm": a, "step": step, "concept": concept, "kind": grid.kinds[c],
                                   "group": groups.get(concept, "old"), "images": int(grid.n[i, :, t, c].sum()),
                                   "value": _r(rate0[i, t, c]), "lo": _r(lo[i, t, c]), "hi": _r(hi[i, t, c])})

    # --- per seed: each arm's own curve (images only, no interval) ----------------------------------------
    for s, seed_value in enumerate(grid.seeds):
        with np.errstate(invalid="ignore", divide="ignore"):
            rate_s = grid.hits[:, s] / np.maximum(grid.n[:, s], 1)  # [A, T, C]
        curve = stats.group_mean(stats.normalise(rate_s, grid.chance), new)  # [A, T]
        reach = stats.steps_to_level(curve, steps, lvl) if lvl is not None else np.full(len(arms), np.nan)
        area = stats.area_under(curve, steps)
        for i, a in enumerate(arms):
            out.per_seed.append({"seed": seed_value, "arm": a, "final": _r(curve[i, -1]), "area": _r(area[i]),
                                 "steps_to_level": None if not np.isfinite(reach[i]) else round(float(reach[i]), 1),
                                 "reached": bool(np.isfinite(reach[i]))})
    out.headline = h
    return out
