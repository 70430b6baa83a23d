"""bucket.select: a training phase's data selection (issue #22), alone and through the real stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.errors import ConfigError, StageError
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import REJECTS_SCHEMA, read_table
from pipeline_config.bucket import BucketConfig, BucketSelect
from pipeline_config.load import load_config, section_digest
from tasks.bucket import core
from tasks.bucket.stage import SPEC
from tasks.common.stage import run_stage
from tests.bucket.test_stage import _commit_quality
from tests.quality.data import commit_ingest, post
from tests.stage_helpers import commit_output

TAGS = pa.list_(pa.string())


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")


def _post(i: int, *, width=1024, height=1024, rating="g", general=("1girl",), meta=(), character=()) -> dict:
    row = post(i, width=width, height=height)
    row.update(rating=rating, tags_general=list(general), tags_meta=list(meta), tags_character=list(character))
    return row


def _commit_labels(store, labels: dict[int, str]):
    ids = sorted(labels)
    table = pa.table({"id": ids, "year": [2020] * len(ids), "norm_score": [0.5] * len(ids),
                      "label": [labels[i] for i in ids], "cluster": [QUALITY_LABELS.index(labels[i]) for i in ids]})
    counts = {lb: list(labels.values()).count(lb) for lb in set(labels.values())}
    return commit_output(store, QualityManifest, {"quality.parquet": (table, QUALITY_SCHEMA)},
                         fields={"method": "kmeans", "label_counts": counts})


def _run(store, select: dict, **bucket):
    out = run_stage(SPEC, load_config({"bucket": {"select": select, **bucket}}), store)
    m = out.manifest
    kept = sorted(read_table(store.path(m, "buckets.parquet"), BUCKETS_SCHEMA).column("id").to_pylist())
    rejects = {r["id"]: (r["reason"], r["detail"])
               for r in read_table(store.path(m, "rejects.parquet"), REJECTS_SCHEMA).to_pylist()}
    return out, kept, rejects


# --- config -------------------------------------------------------------------------------------------

def test_default_select_is_left_out_of_the_fingerprint_and_selects_all():
    cfg = BucketConfig()
    assert not cfg.select.active
    full = cfg.model_dump(mode="json")
    assert "select" not in cfg.fingerprint_dict()
    assert cfg.fingerprint_dict() == {k: v for k, v in full.items() if k != "select"}
    # spelled-out defaults are the same selection: same fingerprint
    spelled = load_config({"bucket": {"select": {"quality_labels": [], "min_pixels": 0, "ratings": []}}})
    assert section_digest(spelled, "bucket") == section_digest(load_config({}), "bucket")
    assert section_digest(load_config("demo"), "bucket") == section_digest(
        load_config("demo", ["bucket.select.min_pixels=0"]), "bucket")
    # an active selection is part of it
    active = load_config({"bucket": {"select": {"min_pixels": 1048576}}})
    assert active.bucket.fingerprint_dict()["select"]["min_pixels"] == 1048576
    assert section_digest(active, "bucket") != section_digest(load_config({}), "bucket")
    s = core.select_posts(cfg.select, np.array([10.0, np.nan]), np.array([10.0, 5.0]))
    assert s.mask.tolist() == [True, True] and s.reasons == ["", ""] and s.rule_counts == {}


def test_invalid_quality_label_or_rating_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"bucket\.select\.quality_labels.*'great score'.*"
                                          r"'worst score', 'bad score', 'good score', 'masterpiece'"):
        load_config({"bucket": {"select": {"quality_labels": ["masterpiece", "great score"]}}})
    with pytest.raises(ConfigError, match=r"bucket\.select\.ratings.*'x'.*'g', 's', 'q', 'e'"):
        load_config({}, ["bucket.select.ratings=[g, x]"])
    with pytest.raises(ConfigError, match="both required and excluded"):
        load_config({"bucket": {"select": {"require_tags": ["solo"], "exclude_tags": ["solo"]}}})
    with pytest.raises(ConfigError, match="bucket.select.min_pixels"):
        load_config({}, ["bucket.select.min_pixels=-1"])
    with pytest.raises(ConfigError, match="unknown key 'bucket.select.min_pixel'; did you mean 'min_pixels'"):
        load_config({}, ["bucket.select.min_pixel=5"])


# --- select_posts ---------------------------------------------------------------------------------------

W = np.array([1024, 1024, 2000, 800, np.nan], np.float64)
H = np.array([1024, 768, 600, 1200, np.nan], np.float64)


def test_each_rule_alone():
    labels = pa.array(["masterpiece", "bad score", "good score", None, "worst score"])
    s = core.select_posts(BucketSelect(quality_labels=["masterpiece", "good score"]), W, H, label=labels)
    assert s.mask.tolist() == [True, False, True, False, False]
    assert s.reasons[1] == "quality_label 'bad score' not in [masterpiece, good score]"
    assert s.reasons[3] == "quality_label None not in [masterpiece, good score]"
    assert s.rule_counts == {"quality_label": 3}

    s = core.select_posts(BucketSelect(min_pixels=1024 * 1024), W, H)
    assert s.mask.tolist() == [True, False, True, False, True]  # unknown size: left to bad_size
    assert s.reasons[1] == "1024x768 < min_pixels 1048576"
    assert s.reasons[3] == "800x1200 < min_pixels 1048576"

    s = core.select_posts(BucketSelect(min_side=800), W, H)
    assert s.mask.tolist() == [True, False, False, True, True]
    assert s.reasons[2] == "2000x600: short side < min_side 800"

    s = core.select_posts(BucketSelect(ratings=["g", "s"]), W, H, rating=["g", "s", "e", "q", None])
    assert s.mask.tolist() == [True, True, False, False, False]
    assert s.reasons[2] == "rating 'e' not in [g, s]" and s.rule_counts == {"rating": 3}

    general = pa.array([["1girl", "solo"], ["2girls"], None, ["solo"], []], TAGS)
    meta = pa.array([[], ["comic"], ["solo"], [], ["highres"]], TAGS)
    s = core.select_posts(BucketSelect(require_tags=["solo"]), W, H, tags=[general, meta])
    assert s.mask.tolist() == [True, False, True, True, False]  # any tag column counts
    assert s.reasons[1] == s.reasons[4] == "lacks tag 'solo'"
    s = core.select_posts(BucketSelect(exclude_tags=["comic", "highres"]), W, H, tags=[general, meta])
    assert s.mask.tolist() == [True, False, True, True, False]
    assert s.reasons[1] == "has excluded tag 'comic'" and s.reasons[4] == "has excluded tag 'highres'"
    assert s.rule_counts == {"exclude_tags": 2}


def test_rules_combined_every_failing_rule_in_the_reason():
    sel = BucketSelect(quality_labels=["masterpiece"], min_pixels=1_000_000, ratings=["g"],
                       require_tags=["solo", "1girl"], exclude_tags=["comic"])
    labels = ["masterpiece", "masterpiece", "bad score", "masterpiece", "masterpiece"]
    ratings = pa.chunked_array([["g", "g"], ["e", "g", "g"]])
    general = pa.chunked_array([pa.array([["1girl", "solo"], ["1girl", "solo"]], TAGS),
                                pa.array([["solo"], ["1girl", "solo", "comic"], ["1girl", "solo"]], TAGS)])
    s = core.select_posts(sel, W, H, label=labels, rating=ratings, tags=[general])
    assert s.mask.tolist() == [True, False, False, False, True]
    assert s.reasons[0] == "" and s.reasons[4] == ""
    assert s.reasons[1] == "1024x768 < min_pixels 1000000"
    assert s.reasons[2] == "quality_label 'bad score' not in [masterpiece]; rating 'e' not in [g]; lacks tag '1girl'"
    assert s.reasons[3] == "800x1200 < min_pixels 1000000; has excluded tag 'comic'"
    assert s.rule_counts == {"quality_label": 1, "rating": 1, "min_pixels": 2, "require_tags": 1, "exclude_tags": 1}
    assert s.selected == 2


def test_selection_columns_only_when_needed():
    assert core.selection_columns(BucketSelect()) == ([], [])
    assert core.selection_columns(BucketSelect(min_pixels=5)) == ([], [])
    assert core.selection_columns(BucketSelect(quality_labels=["masterpiece"], ratings=["g"])) == (["label"], ["rating"])
    assert core.selection_columns(BucketSelect(exclude_tags=["comic"]))[1] == [
        "tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta"]


# --- the real stage ---------------------------------------------------------------------------------------

def _phase_rows() -> tuple[list[dict], dict[int, str]]:
    rows, labels = [], {}
    for i in range(1, 41):
        big = i <= 30
        rows.append(_post(i, width=1200 if big else 900, height=1200 if big else 700,
                          rating="e" if i % 10 == 0 else "g",
                          general=("1girl", "solo") if i % 4 else ("1girl",),
                          meta=("comic",) if i % 7 == 0 else (), character=("hatsune_miku",) if i == 3 else ()))
        labels[i] = ["masterpiece", "good score", "bad score", "worst score"][i % 4]
    return rows, labels


def test_stage_rejects_not_selected_with_reasons(store):
    rows, labels = _phase_rows()
    commit_ingest(store, rows)
    _commit_labels(store, labels)
    out, kept, rejects = _run(store, {"quality_labels": ["masterpiece", "good score"], "min_pixels": 1024 * 1024})
    expect = [i for i in range(1, 41) if i <= 30 and labels[i] in ("masterpiece", "good score")]
    assert kept == expect
    assert {i for i, (reason, _) in rejects.items()} == set(range(1, 41)) - set(expect)
    assert all(reason == "not_selected" for reason, _ in rejects.values())
    assert rejects[2][1] == "quality_label 'bad score' not in [masterpiece, good score]"  # labels[2] = bad score
    assert rejects[33][1] == "900x700 < min_pixels 1048576"
    assert rejects[34][1] == "quality_label 'bad score' not in [masterpiece, good score]; 900x700 < min_pixels 1048576"
    sel = out.manifest.stats["selection"]
    assert sel == {"selected": len(expect), "of": 40, "not_selected_by_rule": {"quality_label": 20, "min_pixels": 10}}
    assert out.manifest.stats["reject_reasons"] == {"not_selected": 40 - len(expect)}
    assert (f"selection (bucket.select): {len(expect)} of 40 posts selected; "
            "not selected by rule: quality_label 20, min_pixels 10") in out.report.summary_md


def test_stage_tags_and_ratings(store):
    rows, labels = _phase_rows()
    commit_ingest(store, rows)
    _commit_quality(store, [r["id"] for r in rows])  # every label "good score"
    out, kept, rejects = _run(store, {"ratings": ["g", "s"], "require_tags": ["solo"], "exclude_tags": ["comic"]})
    expect = [i for i in range(1, 41) if i % 10 and i % 4 and i % 7]
    assert kept == expect
    assert rejects[10] == ("not_selected", "rating 'e' not in [g, s]")
    assert rejects[4] == ("not_selected", "lacks tag 'solo'")
    assert rejects[7] == ("not_selected", "has excluded tag 'comic'")
    assert rejects[20] == ("not_selected", "rating 'e' not in [g, s]; lacks tag 'solo'")
    # a character tag counts as a tag too
    out, kept, _ = _run(store, {"require_tags": ["hatsune_miku"]})
    assert kept == [3]


def test_small_bucket_merging_sees_only_the_selected_posts(store):
    rows = [_post(i, width=1000, height=1000, general=("solo",)) for i in range(1, 11)]
    rows += [_post(i, width=1100, height=850, general=("solo",)) for i in range(11, 14)]  # 576x448
    rows += [_post(i, width=1100, height=850, general=()) for i in range(14, 30)]  # 576x448, not selected
    commit_ingest(store, rows)
    _commit_quality(store, [r["id"] for r in rows])
    everything = run_stage(SPEC, load_config({"bucket": {"min_bucket_samples": 8}}), store)
    assert everything.manifest.bucket_counts == {"512x512": 10, "576x448": 19}  # no selection: no merge
    out, kept, rejects = _run(store, {"require_tags": ["solo"]}, min_bucket_samples=8)
    assert kept == list(range(1, 14))
    assert out.manifest.bucket_counts == {"512x512": 13}  # the 3 selected 576x448 merge: 16 others don't count
    assert out.manifest.stats["merged"] == {"576x448": "512x512"}
    assert {r for r, _ in rejects.values()} == {"not_selected"}


def test_default_config_stage_output_unchanged_and_extra_columns_not_read(store, monkeypatch):
    rows, labels = _phase_rows()
    commit_ingest(store, rows)
    _commit_labels(store, labels)
    read = []
    import tasks.bucket.stage as stage

    real = stage.read_upstream

    def spy(store_, manifest, name, schema, columns):
        read.append((name, list(columns)))
        return real(store_, manifest, name, schema, columns)

    monkeypatch.setattr(stage, "read_upstream", spy)
    out = run_stage(SPEC, load_config({}), store)
    assert ("quality", ["id"]) in read and ("posts", ["id", "width", "height"]) in read
    assert "selection" not in out.manifest.stats and "selection" not in out.report.summary_md
    assert out.manifest.row_counts == {"buckets": 40, "rejects": 0}
    read.clear()
    _run(store, {"ratings": ["g"], "quality_labels": ["masterpiece"]})
    assert ("quality", ["id", "label"]) in read and ("posts", ["id", "width", "height", "rating"]) in read


def test_selection_that_leaves_nothing_is_a_clear_stage_error(store):
    rows, labels = _phase_rows()
    commit_ingest(store, rows)
    _commit_quality(store, [r["id"] for r in rows])  # all "good score"
    with pytest.raises(StageError, match=r"bucket\.select leaves no post out of 40 \(failing by rule: "
                                         r"quality_label 40\); loosen bucket\.select"):
        run_stage(SPEC, load_config({"bucket": {"select": {"quality_labels": ["masterpiece"]}}}), store)
