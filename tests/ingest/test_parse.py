"""Post parsing against real Danbooru JSON (old and new field sets), dump shapes, nulls; and the filters."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_config.ingest import FilterConfig, IngestConfig, counted_tags
from tasks.ingest.filters import PostFilter
from tasks.ingest.parse import CATEGORIES, ParseError, Post, parse_post, to_datetime

FIXTURES = Path(__file__).parents[1] / "fixtures" / "danbooru"
OLD = json.loads((FIXTURES / "posts_index_2020_grabber.json").read_text())
NEW = json.loads((FIXTURES / "post_show_9969513_2025_booruhs.json").read_text())
RECORDS = OLD + [NEW]


def test_new_field_set_parses_every_contract_column():
    post = parse_post(NEW)
    assert post.id == 9969513 and post.md5 == "bd6cde0ec3b896251118d59b4d0e01b4"
    assert post.created_at == dt.datetime(2025, 9, 15, 23, 27, 31, 639000, tzinfo=dt.timezone.utc)
    assert (post.width, post.height, post.file_ext, post.file_size) == (2048, 2048, "jpg", 277355)
    assert (post.score, post.up_score, post.down_score, post.fav_count) == (4, 4, 0, 2)
    assert post.rating == "g" and post.parent_id is None
    assert post.tags_character == ("sangonomiya_kokomi",) and post.tags_copyright == ("genshin_impact",)
    assert post.tags_artist == ("mikurumikurumi",) and post.tags_meta == ("highres",)
    assert "pink_hair" in post.tags_general and "sangonomiya_kokomi" not in post.tags_general
    assert post.file_url.endswith("bd6cde0ec3b896251118d59b4d0e01b4.jpg")
    assert set(post.row()) == {f.name for f in __import__("data_contracts.ingest", fromlist=["x"]).POSTS_SCHEMA} - {
        "image_path", "query"}


def test_old_field_set_reads_safe_as_general():
    posts = [parse_post(r) for r in OLD]
    assert [p.id for p in posts] == list(range(4018204, 4018194, -1))
    assert all(p.md5 and p.file_url and p.width and p.height for p in posts)
    # 2020: rating "s" meant safe -> today's "g"; "q"/"e" keep their meaning
    assert {r["rating"] for r in OLD} >= {"s"}
    for raw, post in zip(OLD, posts):
        assert post.rating == {"s": "g"}.get(raw["rating"], raw["rating"])
    # forcing the current meaning keeps "s"
    assert parse_post(OLD[0], legacy_ratings="current").rating == OLD[0]["rating"]
    assert parse_post(NEW, legacy_ratings="auto").rating == "g"


def test_dump_shapes_strings_tag_lists_and_dates():
    raw = {  # Danbooru2021-style: numbers as strings, t/f booleans, tags as {name, category}
        "id": "4018204", "created_at": "2020-07-26 14:31:20.176 UTC", "score": "5", "up_score": "6",
        "down_score": "-1", "fav_count": "9", "rating": "s", "image_width": "1037", "image_height": "988",
        "file_ext": "PNG", "file_size": "913112", "md5": "4F39497EF8FCD059984C3B1FE86CF542", "is_deleted": "f",
        "is_banned": "t", "parent_id": "0", "pool_string": "",
        "tags": [{"id": "1", "name": "1girl", "category": "0"}, {"id": "2", "name": "chagara", "category": "1"},
                 {"id": "3", "name": "arknights", "category": "3"}, {"id": "4", "name": "eyjafjalla_(arknights)",
                                                                     "category": "4"},
                 {"id": "5", "name": "commentary", "category": "5"}],
    }
    post = parse_post(raw)
    assert post.id == 4018204 and post.score == 5 and post.down_score == -1 and post.width == 1037
    assert post.md5 == "4f39497ef8fcd059984c3b1fe86cf542" and post.file_ext == "png"
    assert post.is_banned and not post.is_deleted and post.parent_id is None
    assert post.rating == "g"  # legacy record (pool_string, no media_asset)
    assert post.tags_artist == ("chagara",) and post.tags_character == ("eyjafjalla_(arknights)",)
    assert post.created_at == dt.datetime(2020, 7, 26, 14, 31, 20, 176000, tzinfo=dt.timezone.utc)
    flat = parse_post({"id": 5, "tag_string": "a b a c"})
    assert flat.tags_general == ("a", "b", "c") and flat.md5 is None and flat.rating is None


@pytest.mark.parametrize("value,expected", [
    ("2025-09-15T19:27:31.639-04:00", dt.datetime(2025, 9, 15, 23, 27, 31, 639000, tzinfo=dt.timezone.utc)),
    ("2020-01-02T03:04:05Z", dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    ("2020-01-02 03:04:05 +0100", dt.datetime(2020, 1, 2, 2, 4, 5, tzinfo=dt.timezone.utc)),
    (1577934245, dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    (1577934245000, dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    ("yesterday", None), (None, None), ("", None),
])
def test_dates(value, expected):
    assert to_datetime(value) == expected


@pytest.mark.parametrize("bad", [{}, {"id": None}, {"id": "abc"}, {"id": -3}, [], "post"])
def test_records_without_an_id_raise_parse_error(bad):
    with pytest.raises(ParseError):
        parse_post(bad)


_junk = st.one_of(st.none(), st.text(max_size=8), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                  st.booleans(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                     st.integers(), max_size=2))


@st.composite
def mangled(draw):
    """A real record with fields dropped, nulled, retyped as strings, or junk added."""
    raw = dict(draw(st.sampled_from(RECORDS)))
    keys = sorted(k for k in raw if k != "id")
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys))):
        action = draw(st.sampled_from(["drop", "null", "str", "junk"]))
        if action == "drop":
            raw.pop(key)
        elif action == "null":
            raw[key] = None
        elif action == "str" and isinstance(raw[key], (int, float)) and not isinstance(raw[key], bool):
            raw[key] = str(raw[key])
        elif action == "junk":
            raw[key] = draw(_junk)
    for extra in draw(st.lists(st.text(min_size=1, max_size=12), max_size=3)):
        raw.setdefault(extra, draw(_junk))  # unknown fields are ignored
    return raw


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled())
def test_parse_survives_missing_null_and_junk_fields(raw):
    post = parse_post(raw)  # never raises while an id is there
    original = next(r for r in RECORDS if r["id"] == raw["id"])
    for key, attr in (("score", "score"), ("fav_count", "fav_count"), ("file_size", "file_size")):
        if raw.get(key) == original[key] or raw.get(key) == str(original[key]):
            assert getattr(post, attr) == original[key]
    if raw.get("md5") == original["md5"]:
        assert post.md5 == original["md5"]
    for cat in CATEGORIES:
        assert all(isinstance(t, str) and t and " " not in t for t in getattr(post, f"tags_{cat}"))
        if isinstance(raw.get(f"tag_string_{cat}"), str):
            assert getattr(post, f"tags_{cat}") == tuple(dict.fromkeys(raw[f"tag_string_{cat}"].split()))
    assert post.rating in (None, "g", "s", "q", "e")
    assert post.created_at is None or post.created_at.tzinfo is not None
    assert Post.from_json(json.loads(json.dumps(post.to_json()))) == post  # the journal round trip


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "md5", "rating", "score", "image_width", "tag_string", "tags",
                                        "created_at", "is_deleted", "media_asset", "file_ext", "parent_id"]),
                       _junk, max_size=12))
def test_parse_of_arbitrary_junk_raises_only_parse_error(raw):
    try:
        post = parse_post(raw)
    except ParseError:
        return
    assert post.id > 0


# --- filters -------------------------------------------------------------------------------------------


def _post(**kw) -> Post:
    base = parse_post(NEW)
    data = {**base.__dict__, **kw}
    return Post(**data)


@pytest.mark.parametrize("change,cfg,reason", [
    ({"is_deleted": True}, {}, "deleted"),
    ({"is_banned": True}, {}, "banned"),
    ({"md5": None}, {}, "restricted"),
    ({"file_url": None}, {}, "restricted"),
    ({"file_ext": "mp4"}, {}, "unsupported_ext"),
    ({"file_ext": "zip"}, {}, "unsupported_ext"),
    ({"width": 100}, {}, "too_small"),
    ({"rating": "e"}, {"ratings": ["g", "s"]}, "rating"),
    ({"score": 3}, {"min_score": 10}, "low_score"),
    ({"tags_meta": ("highres", "comic")}, {}, "excluded_tag"),
    ({}, {"date_from": "2025-09-16"}, "out_of_range"),
    ({}, {"date_to": "2025-09-14"}, "out_of_range"),
])
def test_each_filter_gives_its_reason(change, cfg, reason):
    rej = PostFilter(FilterConfig(**cfg), need_file_url=True).check(_post(**change))
    assert rej is not None and rej.reason == reason and rej.detail


def test_passing_post_and_dump_mode_needs_no_file_url():
    assert PostFilter(FilterConfig(), need_file_url=True).check(_post()) is None
    assert PostFilter(FilterConfig(date_from="2025-09-15", date_to="2025-09-15"), True).check(_post()) is None
    assert PostFilter(FilterConfig(), need_file_url=False).check(_post(file_url=None)) is None
    assert PostFilter(FilterConfig(exclude_deleted=False), True).check(_post(is_deleted=True)) is None


def test_config_rejects_queries_over_the_tag_limit_and_undecodable_types():
    assert counted_tags("a_(b) rating:g score:>=10 -comic order:score") == ["a_(b)", "-comic", "order:score"]
    IngestConfig(queries=[{"tags": "a b rating:g,s date:2020-01-01..", "quota": 5}])
    with pytest.raises(ValueError, match="tag_limit"):
        IngestConfig(queries=[{"tags": "a b c", "quota": 5}])
    IngestConfig(queries=[{"tags": "a b c"}], api={"tag_limit": 6})
    with pytest.raises(ValueError, match="cannot be verified"):
        FilterConfig(file_exts=["jpg", "mp4"])
    with pytest.raises(ValueError, match="used twice"):
        IngestConfig(queries=[{"tags": "a"}, {"tags": "a"}])
