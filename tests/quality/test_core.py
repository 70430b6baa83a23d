"""Pure quality logic: year pooling, within-year ranks, label order, determinism, rejects."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_contracts.errors import ConfigError, StageError
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA
from pipeline_config.load import load_config
from pipeline_config.quality import QualityConfig
from tasks.quality import core
from tasks.quality.stage import build_quality
from tests.quality.data import post, posts_table, random_posts, tags_table


def _run(rows, cfg=None, tag_ids=None, tag_weight=None):
    posts = posts_table(rows)
    ids = tag_ids if tag_ids is not None else [r["id"] for r in rows]
    return build_quality(posts, tags_table(ids, tag_weight), cfg or QualityConfig(min_posts_per_year=20))


def _by_id(table: pa.Table) -> dict[int, dict]:
    return {r["id"]: r for r in table.to_pylist()}


def test_pool_years_merges_small_years_with_their_smaller_neighbour():
    years = np.array([2005] * 3 + [2006] * 2 + [2010] * 50 + [2011] * 60)
    groups = core.pool_years(years, 10)
    assert [(g.first, g.last, g.count) for g in groups] == [(2005, 2010, 55), (2011, 2011, 60)]
    assert core.group_index(np.array([2005, 2006, 2010, 2011]), groups).tolist() == [0, 0, 0, 1]
    # big enough years stay apart; a lone year is its own group
    assert [g.name for g in core.pool_years(years, 2)] == ["2005", "2006", "2010", "2011"]
    assert [g.name for g in core.pool_years(np.array([2020, 2020]), 100)] == ["2020"]


def test_percentile_rank_is_within_group_with_shared_ties():
    values = np.array([1, 2, 2, 3, 100, 200])
    group = np.array([0, 0, 0, 0, 1, 1])
    ranks = core.percentile_rank(values, group)
    np.testing.assert_allclose(ranks, [0.125, 0.5, 0.5, 0.875, 0.25, 0.75])


def test_year_normalisation_puts_old_high_score_above_same_score_recent_post():
    # 2012: scores 0..20 (the post with 20 is top of its year); 2023: scores 0..200 (20 is low)
    rows = [post(i, year=2012, score=i % 21) for i in range(1, 101)]
    rows += [post(1000 + i, year=2023, score=2 * (i % 101)) for i in range(100)]
    rows += [post(5000, year=2012, score=20, fav=40), post(6000, year=2023, score=20, fav=40)]
    quality, _, _, _ = _run(rows)
    got = _by_id(quality)
    old, recent = got[5000], got[6000]
    assert old["norm_score"] > 0.9 > 0.2 > recent["norm_score"]
    assert old["cluster"] > recent["cluster"]
    assert QUALITY_LABELS.index(old["label"]) == old["cluster"]


@pytest.mark.parametrize("method", ["kmeans", "percentile"])
def test_labels_are_monotone_in_score_within_a_year(method):
    rng = np.random.default_rng(1)
    scores = rng.lognormal(2.0, 1.0, 400).astype(int)
    rows = [post(i, year=2020, score=int(s)) for i, s in enumerate(scores)]
    cfg = QualityConfig(method=method, signals={"score": 1.0}, min_posts_per_year=20)
    quality, _, info, _ = _run(rows, cfg)
    t = quality.sort_by("id")
    order = np.argsort(scores, kind="stable")
    clusters = np.asarray(t.column("cluster").to_numpy())[order]
    assert np.all(np.diff(clusters) >= 0), "a higher score got a worse label"
    assert set(clusters.tolist()) == {0, 1, 2, 3}
    assert info["method"] == method
    labels = t.column("label").to_pylist()
    assert all(QUALITY_LABELS.index(l) == c for l, c in zip(labels, t.column("cluster").to_pylist()))


def test_kmeans_clusters_ordered_by_mean_norm_score_with_all_signals():
    quality, _, info, report = _run(random_posts(600), QualityConfig(min_posts_per_year=50))
    assert info["method"] == "kmeans"
    bounds = info["stats"]["boundaries"]
    means = [b["norm_mean"] for b in bounds]
    assert means == sorted(means) and len(set(means)) == 4
    assert [b["label"] for b in bounds] == list(QUALITY_LABELS)
    assert {"centre_score", "centre_fav_count", "centre_up_score", "centre_down_score"} <= set(bounds[0])
    assert sum(info["label_counts"].values()) == quality.num_rows == 600
    assert set(report.tables) == {"quality-boundaries", "quality-by-year", "quality-examples"}
    by_year = report.tables["quality-by-year"]
    assert [r["year"] for r in by_year] == [2012, 2016, 2020, 2023]
    assert sum(r[l] for r in by_year for l in QUALITY_LABELS) == 600
    examples = report.tables["quality-examples"]
    assert {e["label"] for e in examples} == set(QUALITY_LABELS)
    assert all(sum(e["label"] == l for e in examples) <= 8 for l in QUALITY_LABELS)


def test_percentile_cuts_split_norm_score():
    cfg = QualityConfig(method="percentile", percentile_cuts=(0.25, 0.5, 0.75), min_posts_per_year=1)
    rows = [post(i, year=2021, score=i, fav=i, down=0) for i in range(1, 101)]
    quality, _, info, _ = _run(rows, cfg)
    assert info["label_counts"] == {label: 25 for label in QUALITY_LABELS}
    bounds = info["stats"]["boundaries"]
    assert [(b["cut_from"], b["cut_to"]) for b in bounds] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]


def test_deterministic_and_independent_of_row_order():
    rows = random_posts(300, seed=3)
    cfg = QualityConfig(min_posts_per_year=30, seed=7)
    first = _run(rows, cfg)[0]
    shuffled = [rows[i] for i in np.random.default_rng(5).permutation(len(rows))]
    second = _run(shuffled, cfg)[0]
    assert first.equals(second)
    assert [(f.name, f.type) for f in first.schema] == [(f.name, f.type) for f in QUALITY_SCHEMA]
    assert first.column("id").to_pylist() == sorted(r["id"] for r in rows)


def test_unusable_rows_become_rejects_with_reasons():
    rows = random_posts(40)
    rows += [post(1, score=None), post(2, year=None), post(3, score=5)]
    rows[-1]["fav_count"] = None
    quality, rejects, _, _ = _run(rows, tag_ids=[r["id"] for r in rows] + [424242])
    reasons = {r["id"]: r["reason"] for r in rejects.to_pylist()}
    assert reasons == {1: "no_score", 2: "no_date", 3: "missing_signal", 424242: "no_metadata"}
    assert "fav_count" in next(r["detail"] for r in rejects.to_pylist() if r["id"] == 3)
    assert quality.num_rows == 40 and not set(reasons) & set(quality.column("id").to_pylist())


def test_tag_ids_select_the_samples():
    rows = random_posts(60)
    quality, _, _, _ = _run(rows, tag_ids=[r["id"] for r in rows[:30]])
    assert sorted(quality.column("id").to_pylist()) == sorted(r["id"] for r in rows[:30])


def test_no_usable_row_stops_the_stage():
    with pytest.raises(StageError, match="usable score"):
        _run([post(1, score=None), post(2, score=None)])


def test_too_few_distinct_rows_fall_back_to_percentile_and_say_so():
    rows = [post(i, score=5, fav=10, down=0) for i in range(10)] + [post(99, score=50, fav=100, down=0)]
    _, _, info, report = _run(rows)
    assert info["method"] == "percentile"
    assert "distinct" in info["stats"]["note"] and "Note:" in report.summary_md


def test_extra_feature_from_tags_joins_kmeans_features():
    rows = random_posts(200)
    weights = list(np.linspace(0.5, 1.5, 200))
    cfg = QualityConfig(min_posts_per_year=20, extra_features={"tag_weight": 1.0})
    _, _, info, _ = _run(rows, cfg, tag_weight=weights)
    assert info["stats"]["features"][-1] == "tag_weight"
    assert "centre_tag_weight" in info["stats"]["boundaries"][0]
    with pytest.raises(ConfigError, match="numeric columns"):
        _run(rows, QualityConfig(extra_features={"nope": 1.0}))
    with pytest.raises(ConfigError, match="not numeric"):
        _run(rows, QualityConfig(extra_features={"rating": 1.0}))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown signal"):
        load_config({"quality": {"signals": {"views": 1.0}}})
    with pytest.raises(ConfigError, match="percentile_cuts"):
        load_config({"quality": {"percentile_cuts": [0.5, 0.4, 0.9]}})
    with pytest.raises(ConfigError, match="method"):
        load_config({"quality": {"method": "dbscan"}})
