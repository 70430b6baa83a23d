"""The study's statistics on synthetic counts whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.study import stats
from tasks.study.analysis import analyse
from tasks.study.collect import Grid


def _coverage(n_seeds: int, n_images: int, p: float, seed_sd: float, reps: int = 300, boot: int = 600) -> float:
    """Share of repetitions whose interval of one arm's pooled rate contains the true mean rate p."""
    rng = np.random.default_rng(12345)
    inside = 0
    for _ in range(reps):
        ps = np.clip(p + rng.normal(0.0, seed_sd, n_seeds), 0, 1) if seed_sd else np.full(n_seeds, p)
        hits, n = rng.binomial(n_images, ps)[None, :], np.full((1, n_seeds), n_images)
        b = stats.bootstrap_rates(hits, n, stats.seed_draws(n_seeds, boot, rng), rng)[:, 0]
        iv = stats.interval(float(stats.pooled_rates(hits, n)[0]), b)
        inside += iv.lo <= p <= iv.hi
    return inside / reps


def test_image_bootstrap_interval_covers_the_true_rate_95_percent_of_the_time():
    assert 0.92 <= _coverage(n_seeds=1, n_images=200, p=0.3, seed_sd=0.0) <= 0.98


def test_seed_and_image_bootstrap_is_conservative_when_seeds_agree():
    # the image noise is counted in the seed spread and again within seeds: wider than nominal, never narrower
    assert 0.95 <= _coverage(n_seeds=3, n_images=100, p=0.3, seed_sd=0.0) <= 0.995


def test_seed_and_image_bootstrap_with_a_seed_effect_stays_near_nominal():
    # with 3 seeds the seed spread is itself uncertain: measured ~0.93 for a moderate seed effect
    assert 0.88 <= _coverage(n_seeds=3, n_images=100, p=0.3, seed_sd=0.05) <= 0.99


def test_a_known_difference_is_found_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    n = np.full((2, 3), 200)
    draws = stats.seed_draws(3, 2000, rng)
    hits = np.stack([rng.binomial(200, 0.6, 3), rng.binomial(200, 0.3, 3)])
    b = stats.bootstrap_rates(hits, n, draws, rng)
    point = stats.pooled_rates(hits, n)
    diff = stats.interval(point[0] - point[1], b[:, 0] - b[:, 1])
    assert diff.lo <= 0.3 <= diff.hi and diff.excludes(0.0)
    same = np.stack([rng.binomial(200, 0.4, 3), rng.binomial(200, 0.4, 3)])
    b = stats.bootstrap_rates(same, n, draws, rng)
    point = stats.pooled_rates(same, n)
    assert not stats.interval(point[0] - point[1], b[:, 0] - b[:, 1]).excludes(0.0)


def test_steps_to_level_interpolates_and_censors():
    steps = np.array([0, 10, 20, 30])
    curves = np.array([[0.0, 0.2, 0.6, 0.8],    # crosses 0.4 halfway between 10 and 20
                       [0.5, 0.6, 0.7, 0.9],    # already there at step 0
                       [0.0, 0.1, 0.2, 0.3]])   # never: censored
    got = stats.steps_to_level(curves, steps, 0.4)
    assert got[0] == pytest.approx(15.0) and got[1] == 0.0 and np.isinf(got[2])
    assert np.isnan(stats.difference(np.inf, np.inf)) and stats.difference(np.inf, 5.0) == np.inf
    iv = stats.interval(15.0, np.array([10.0, 15.0, 20.0, np.inf] * 50))
    assert iv.lo == 10.0 and iv.hi == np.inf  # an infinite bound stays infinite


def test_normalise_group_mean_and_area():
    rates = np.array([[0.25, 1.0, 0.5]])
    z = stats.normalise(rates, np.array([0.25, 0.25, 1.0]))
    assert z[0, 0] == 0.0 and z[0, 1] == 1.0 and np.isnan(z[0, 2])  # the only concept of its kind: no chance
    assert stats.group_mean(z, np.array([True, True, True]))[0] == pytest.approx(0.5)  # NaN ignored
    assert stats.area_under(np.array([0.0, 1.0, 1.0]), np.array([0, 10, 30])) == pytest.approx(25 / 30)


def _grid(flow_curve, eps_curve, old_flow, old_eps, n=400, seeds=3) -> Grid:
    """Counts with exact rates: new concept 'a' follows the given curves, old concept 'b' the old ones."""
    steps = (0, 100, 200, 300)
    rates = np.zeros((2, seeds, len(steps), 2))
    rates[0, :, :, 0], rates[1, :, :, 0] = flow_curve, eps_curve
    rates[0, :, :, 1], rates[1, :, :, 1] = old_flow, old_eps
    nn = np.full(rates.shape, n)
    ctrl_n = np.full(rates.shape[:3], n)
    ctrl = np.zeros(rates.shape, np.int64)
    ctrl[..., 0] = n // 2  # control images on the new concept: half, where chance is 1/2
    return Grid(("flow", "ddpm"), tuple(range(seeds)), steps, ("a", "b"), ("character", "character"),
                np.round(rates * n).astype(np.int64), nn, ctrl, ctrl_n, np.array([0.5, 0.5]))


def test_analysis_finds_the_faster_arm_and_the_forgetting():
    grid = _grid(flow_curve=[0.5, 0.9, 1.0, 1.0], eps_curve=[0.5, 0.55, 0.7, 0.9],
                 old_flow=[0.5, 0.6, 0.7, 0.75], old_eps=[1.0, 1.0, 1.0, 1.0])
    a = analyse(grid, {"a": "new", "b": "old"}, level=0.5, reps=400)
    h = a.headline
    assert a.best == pytest.approx(1.0) and a.level == pytest.approx(0.5)
    # corrected curves: flow 0, .8, 1, 1 -> reaches .5 at 62.5; ε 0, .1, .4, .8 -> at 225
    assert h["steps_to_level"]["flow"]["value"] == pytest.approx(62.5)
    assert h["steps_to_level"]["ddpm"]["value"] == pytest.approx(225.0)
    assert h["steps_diff"]["hi"] < 0  # flow faster, and the interval says so
    assert h["area_diff"]["lo"] > 0 and h["final_diff"]["value"] == pytest.approx(0.2)
    # the base (ε, step 0) draws the old concept always: flow's 0.75 is a drop of 0.5 corrected, ε's none
    assert h["forgetting"]["flow"]["value"] == pytest.approx(-0.5) and h["forgetting"]["flow"]["hi"] < 0
    assert h["forgetting"]["ddpm"]["value"] == pytest.approx(0.0)
    assert h["control"]["character"]["chance_share"] == 0.5 and h["control"]["character"]["flow"]["value"] == 0.5
    rows = {r["concept"]: r for r in a.concepts}
    assert rows["a"]["group"] == "new" and rows["a"]["diff"]["value"] == pytest.approx(0.1)
    assert {(r["seed"], r["arm"]) for r in a.per_seed} == {(s, arm) for s in range(3) for arm in ("flow", "ddpm")}
    assert len(a.curves) == 2 * 2 * 4 and len(a.difference) == 4
    assert len(a.points) == 2 * 4 * 2 and all(p["lo"] <= p["value"] <= p["hi"] for p in a.points)


def test_analysis_with_nothing_learned_has_no_level():
    flat = [0.5, 0.5, 0.5, 0.5]
    a = analyse(_grid(flat, flat, flat, flat), {"a": "new", "b": "old"}, reps=200)
    assert a.level is None and "steps_diff" not in a.headline
