"""Merging tagger output into Danbooru tags: strict cuts, ratings, MCut, provenance, blacklist."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline_config.tag import TagConfig
from tasks.tag.labels import load_labels
from tasks.tag.merge import Merger, MergeRules, mcut_threshold


@pytest.fixture(scope="module")
def labels(real_csv):
    return load_labels(real_csv)


def _probs(labels, values: dict[str, float], floor: float = 0.01) -> np.ndarray:
    p = np.full(len(labels), floor, np.float32)
    for tag, v in values.items():
        p[labels.index[tag]] = v
    return p


def test_real_label_file_parses(labels):
    assert len(labels) == 10861
    assert [labels.names[i] for i in labels.rating_idx] == ["general", "sensitive", "questionable", "explicit"]
    assert len(labels.general_idx) == 8106 and len(labels.character_idx) == 2751
    assert "don't_say_\"lazy\"" in labels.index  # quoted CSV field
    assert labels.names[labels.character_idx[0]] == "hatsune_miku"


def test_thresholds_are_strict(labels):
    merger = Merger(labels, MergeRules())
    p = _probs(labels, {"1girl": 0.35, "solo": np.nextafter(np.float32(0.35), np.float32(1)),
                        "hatsune_miku": 0.85, "kagamine_rin": 0.86})
    row = merger.merge(p, [], [])
    assert "1girl" not in row["general"] and "solo" in row["general"]
    assert row["character"] == ["kagamine_rin"]


def test_ratings_never_become_tags(labels):
    merger = Merger(labels, MergeRules(general_threshold=0.0, character_threshold=0.0))
    p = _probs(labels, {"general": 0.1, "sensitive": 0.2, "questionable": 0.99, "explicit": 0.7}, floor=0.0)
    row = merger.merge(p, ["general"], [])  # even a Danbooru tag spelled like a rating is not judged by it
    assert not {"sensitive", "questionable", "explicit"} & set(row["general"] + row["character"])
    assert row["rating"] == "questionable"
    assert row["rating_probs"] == pytest.approx([0.1, 0.2, 0.99, 0.7])
    assert not row["disputed"]


def test_merge_keeps_danbooru_adds_tagger_with_provenance(labels):
    merger = Merger(labels, MergeRules(blacklist=frozenset({"simple_background"})))
    p = _probs(labels, {"1girl": 0.97, "long_hair": 0.6, "smile": 0.2, "simple_background": 0.9,
                        "hatsune_miku": 0.95, "kagamine_rin": 0.001, "twintails": 0.01, "solo": 0.5})
    row = merger.merge(p, ["solo", "twintails", "some_unknown_tag", "simple_background", "solo"],
                       ["kagamine_rin"])
    # Danbooru order first (deduplicated, blacklist removed), then tagger additions by probability.
    assert row["general"] == ["solo", "twintails", "some_unknown_tag", "1girl", "long_hair"]
    assert row["character"] == ["kagamine_rin", "hatsune_miku"]  # Danbooru character kept despite 0.001
    assert [(a["tag"], round(a["prob"], 2)) for a in row["added"]] == [("1girl", 0.97), ("long_hair", 0.6),
                                                                        ("hatsune_miku", 0.95)]
    # Disputed: Danbooru tags the tagger knows and scored < 0.05; unknown tags are not judged.
    assert [d["tag"] for d in row["disputed"]] == ["kagamine_rin", "twintails"]
    assert all("_" in t for t in ("long_hair", "hatsune_miku"))  # stored with underscores


def test_add_characters_off(labels):
    merger = Merger(labels, MergeRules(add_characters=False))
    row = merger.merge(_probs(labels, {"hatsune_miku": 0.99}), [], ["kagamine_rin"])
    assert row["character"] == ["kagamine_rin"] and not row["added"]


def test_mcut_threshold_hand_example():
    # sorted: .9 .8 .3 .25 .1 -> gaps .1 .5 .05 .15 -> largest between .8 and .3 -> cut .55
    assert mcut_threshold(np.array([0.3, 0.9, 0.1, 0.8, 0.25])) == pytest.approx(0.55)
    assert mcut_threshold(np.array([0.4])) == pytest.approx(0.2)


def test_mcut_mode_and_character_floor(labels):
    merger = Merger(labels, MergeRules(mode="mcut", character_mcut_floor=0.15))
    p = _probs(labels, {"1girl": 0.9, "solo": 0.8, "smile": 0.3, "hatsune_miku": 0.12, "kagamine_rin": 0.05},
               floor=0.0)
    row = merger.merge(p, [], [])
    assert row["general"] == ["1girl", "solo"]  # gap .8 -> .3 is the largest: cut .55, smile left out
    assert row["character"] == []  # mcut would be 0.085; the floor 0.15 keeps 0.12 out
    p[labels.index["hatsune_miku"]] = 0.4
    assert merger.merge(p, [], [])["character"] == ["hatsune_miku"]


def test_rules_from_config():
    cfg = TagConfig(general_threshold=0.4, blacklist=["long hair", "solo"], mode="mcut")
    rules = MergeRules.from_config(cfg)
    assert rules.general_threshold == 0.4 and rules.mode == "mcut"
    assert rules.blacklist == {"long_hair", "solo"}  # stored spelling


def test_malformed_label_files_fail_clearly(tmp_path):
    from data_contracts.errors import ConfigError

    bad_header = tmp_path / "a.csv"
    bad_header.write_text("id,tag\n1,x\n")
    with pytest.raises(ConfigError, match="header expected tag_id,name,category,count"):
        load_labels(bad_header)
    bad_cat = tmp_path / "b.csv"
    bad_cat.write_text("tag_id,name,category,count\n1,general,9,5\n2,some_artist,1,3\n")
    with pytest.raises(ConfigError, match=r"b.csv:3: category expected one of 9, 0, 4, found 1"):
        load_labels(bad_cat)
    no_ratings = tmp_path / "c.csv"
    no_ratings.write_text("tag_id,name,category,count\n1,1girl,0,5\n")
    with pytest.raises(ConfigError, match="four rating rows"):
        load_labels(no_ratings)
