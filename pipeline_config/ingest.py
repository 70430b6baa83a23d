"""Config of the ingest stage: Danbooru queries (or an offline dump) -> verified images + post metadata.

Two sources:
- `danbooru_api`: crawl `/posts.json` with cursor paging (`page=b<id>`), then download and verify every
  file. `api.base_url: "embedded:minibooru"` (the default) generates the mini-booru of `embedded` into
  `<runtime.cache_dir>` and serves it on a free loopback port for the duration of the stage: the crawl
  then runs over real HTTP exactly as against Danbooru.
- `danbooru_dump`: JSON Lines or Parquet of post records in the API's shape plus an images folder or tar
  shards (the layout of `packages/minibooru/minibooru/dump.py`).

`update` (`fm run ingest --update`): instead of crawling again, extend the newest output of the same config
with what changed on Danbooru since it was made (tasks/ingest/update.py). Its keys are not part of the
from-scratch fingerprint; an update output's fingerprint holds them, the output it extends and its snapshot.

Credentials never live in the config: it names the environment variables that hold them.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section, execution_field

EMBEDDED_URL = "embedded:minibooru"
# Extensions the verifier can decode; anything else (zip, mp4, webm, swf, ...) is rejected as unsupported_ext.
# AVIF counts only where this Pillow was built with libavif (the Pillow >= 11.2.1 wheels are).
OPTIONAL_EXTS = {"avif": "avif"}  # extension -> PIL.features name
DECODABLE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")


def _pillow_supports(feature: str) -> bool:
    try:
        from PIL import features

        return bool(features.check(feature))
    except Exception:  # noqa: BLE001 - an old Pillow without the feature name, or no Pillow at all
        return False


DECODABLE_EXTS += tuple(ext for ext, feature in OPTIONAL_EXTS.items() if _pillow_supports(feature))

# Metatags that do not count against Danbooru's tag limit (REFERENCE.md); `order:` and plain tags count.
FREE_METATAGS = ("rating", "score", "status", "width", "height", "md5", "date", "limit")
RATINGS = ("g", "s", "q", "e")


def counted_tags(tags: str) -> list[str]:
    """The search terms of a query that count against the tag limit (plain/negated tags, `order:`...)."""
    counted = []
    for term in tags.split():
        name, sep, _ = term.lstrip("-~").partition(":")
        if sep and name.lower() in FREE_METATAGS:
            continue
        counted.append(term)
    return counted


class QueryConfig(Section):
    """One Danbooru search. Queries run in order; a post found by an earlier query is not taken again."""

    tags: str  # Danbooru search syntax, e.g. "hoshino_ai_(oshi_no_ko) rating:g,s"
    quota: int = Field(1000, ge=1)  # posts this query contributes after filters and dedupe (before download)
    name: str | None = None  # label in stats/reports; defaults to `tags`

    @property
    def label(self) -> str:
        return self.name or self.tags or "(all posts)"


class ApiConfig(Section):
    """The Danbooru HTTP client. Defaults are polite for danbooru.donmai.us."""

    base_url: str = EMBEDDED_URL  # https://danbooru.donmai.us, or "embedded:minibooru"
    login_env: str | None = "DANBOORU_LOGIN"  # env var holding the account name (unset = anonymous)
    api_key_env: str | None = "DANBOORU_API_KEY"  # env var holding the API key (set both or neither)
    user_agent: str = "booruflow/0.1 (dataset ingest)"
    requests_per_s: float = Field(1.5, gt=0)  # /posts.json page requests per second
    concurrency: int = Field(8, ge=1, le=256)  # image downloads in flight
    downloads_per_s: float | None = Field(None, gt=0)  # image requests per second; None = only `concurrency`
    timeout_s: float = Field(60.0, gt=0)  # connect / silence-between-reads limit; a whole request gets 10x
    max_retries: int = Field(5, ge=0)  # retries of 429 / 5xx / timeouts / dropped connections
    backoff_s: float = Field(1.0, ge=0)  # first back-off; doubles each retry, with ±50 % jitter
    backoff_max_s: float = Field(120.0, ge=0)
    slowdown_s: float = Field(60.0, ge=0)  # after a 429: pause this long without Retry-After, and keep the
    #                                        whole crawler at half rate for this long after the pause
    page_limit: int = Field(200, ge=1, le=200)  # posts per page (Danbooru caps at 200)
    tag_limit: int = Field(2, ge=1)  # 2 for anonymous/Member, 6 for Gold+ accounts
    content_retries: int = Field(1, ge=0)  # re-downloads of a file that arrived wrong (md5_mismatch,
    #                                         not_an_image, truncated) before it becomes a reject

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != EMBEDDED_URL and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s) URL or {EMBEDDED_URL!r}")
        return value.rstrip("/")


class DumpConfig(Section):
    """An offline dump (source: danbooru_dump)."""

    posts_path: str | None = None  # .jsonl / .jsonl.gz / .json / .parquet file (or a folder of them)
    # folder of images or of .tar shards; None = what dump.json lists, else `images/` or `*.tar` beside the posts
    images_path: str | None = None


class FilterConfig(Section):
    """Global filters; a post that fails one becomes a rejects row with the reason in brackets."""

    ratings: list[Literal["g", "s", "q", "e"]] = Field(default_factory=lambda: list(RATINGS))  # [rating]
    min_score: int | None = None  # [low_score]
    min_width: int = Field(256, ge=0)  # [too_small]
    min_height: int = Field(256, ge=0)  # [too_small]
    exclude_tags: list[str] = Field(  # any category matches [excluded_tag]
        default_factory=lambda: ["comic", "4koma", "animated", "video", "photo_(medium)"]
    )
    file_exts: list[str] = Field(default_factory=lambda: ["jpg", "png", "webp"])  # [unsupported_ext]
    date_from: dt.date | None = None  # inclusive, on created_at (UTC) [out_of_range]
    date_to: dt.date | None = None  # inclusive [out_of_range]
    exclude_deleted: bool = True  # [deleted]
    exclude_banned: bool = True  # [banned]

    @field_validator("file_exts")
    @classmethod
    def _exts(cls, value: list[str]) -> list[str]:
        value = [v.lower().lstrip(".") for v in value]
        missing = [v for v in value if v in OPTIONAL_EXTS and v not in DECODABLE_EXTS]
        if missing:
            raise ValueError(f"{missing}: this Pillow cannot decode {', '.join(missing).upper()}, so such files "
                             "could not be verified; install a Pillow with AVIF support (`pip install -U "
                             "'pillow>=11.2.1'`: the wheels bundle libavif; a source build needs libavif) so that "
                             "PIL.features.check('avif') is True, or drop it from filters.file_exts")
        bad = [v for v in value if v not in DECODABLE_EXTS]
        if bad:
            raise ValueError(f"{bad} cannot be verified as images; choose from {list(DECODABLE_EXTS)}")
        return value


class VerifyConfig(Section):
    """Checks every file passes before it enters the image pool."""

    max_pixels: int = Field(100_000_000, ge=1)  # width*height above this is a decompression_bomb
    workers: int = Field(0, ge=0)  # decoders running at once; 0 = one per CPU core
    # process: decode in worker processes, so the crawler's event loop never waits for the GIL (fastest);
    # thread: decode in threads of the stage's process (no worker start-up; tiny runs, tests).
    mode: Literal["process", "thread"] = "process"


class EmbeddedConfig(Section):
    """The generated mini-booru served when api.base_url is "embedded:minibooru"."""

    posts: int = Field(300, ge=1)
    seed: int = 0
    max_side: int = Field(768, ge=64)
    # Image sizes: classic (the mini-booru's own draw: portrait / square / landscape at a few ratios) or danbooru
    # (Danbooru-like: mostly 2:3 and 3:4 portrait, some square and landscape, a few tall and wide strips up to
    # 1:4 / 4:1, so that every kohya bucket at 512² gets images once max_side >= 1024; the gpu-check preset).
    # Left out of the fingerprint while classic: outputs made before this option keep their fingerprints.
    aspect: Literal["classic", "danbooru"] = Field("classic", exclude_if=lambda value: value == "classic")
    # Fraction of the posts that are near-duplicates of an earlier post, as on Danbooru: colour variants (most of
    # them parent_id-linked to the original), crops of 2-5 %, re-encodes (JPEG quality, PNG<->JPEG, resize);
    # truth.json records which post each is of (exercises the dedup stage). Left out of the fingerprint while 0.
    near_duplicates: float = Field(0.0, ge=0.0, le=0.5, exclude_if=lambda value: value == 0)


class UpdateConfig(Section):
    """`fm run ingest --update`: a new output that extends the newest one of this config (tasks/ingest/update.py).

    Per query it crawls the posts above the newest known one (`page=a<id>`), re-crawls in full the posts uploaded
    in the last `recheck_days` (where Danbooru's deletions, expunges and tag fixes mostly happen), and walks
    `<query> order:change` back to the previous snapshot (minus `overlap_hours`) for every older post whose tags,
    rating or deleted/banned status changed since.
    """

    enabled: bool = False  # set by `fm run ingest --update` and the deployments' `update` parameter
    # Posts uploaded in the last N days are crawled again in full: their removals (expunged, retagged out of a
    # query) are seen too. Older posts are re-checked through order:change only (a change that keeps them in the
    # query), unless recheck_known.
    recheck_days: float = Field(30.0, ge=0, le=36500)
    # The order:change re-check reaches this far before the previous snapshot (clock skew, replication lag).
    overlap_hours: float = Field(24.0, ge=0, le=24 * 365)
    # Also re-fetch every older known post by id (`id:1,2,...`, api.page_limit a request): finds posts that left a
    # query or were expunged, which order:change cannot show. Costs about as many requests as a full crawl.
    recheck_known: bool = False

    def identity(self) -> dict:
        """What of these settings decides an update's output (in its fingerprint)."""
        return self.model_dump(mode="json", exclude={"enabled"})


class IngestConfig(Section):
    source: Literal["danbooru_api", "danbooru_dump"] = "danbooru_api"
    api: ApiConfig = ApiConfig()
    # Empty = one query with no tags (every post), allowed only for the embedded server and dumps.
    queries: list[QueryConfig] = Field(default_factory=list)
    dump: DumpConfig = DumpConfig()
    filters: FilterConfig = FilterConfig()
    verify: VerifyConfig = VerifyConfig()
    # The summary warns for characters below this count: the characters the queries name (a query tag that
    # turns out to be a character tag), or every character found when no query names one.
    min_per_character: int = Field(500, ge=0)
    # Before 2022 rating "s" meant safe (now "g"). auto: records with the old field set (no media_asset,
    # since-removed lock/pool fields) are read as legacy; legacy/current force one reading.
    legacy_ratings: Literal["auto", "legacy", "current"] = "auto"
    embedded: EmbeddedConfig = EmbeddedConfig()
    # Under runtime.task_runner dask/ray the crawl runs first, then the downloads are spread over the runner's
    # workers in shards of this many posts (tasks/ingest/shards.py). Which worker fetched a file does not
    # change the output, so this is left out of the fingerprint.
    shard_posts: int = execution_field(2048, ge=1)
    # `fm run ingest --update`. Left out of the from-scratch fingerprint (an update's own fingerprint holds it).
    update: UpdateConfig = execution_field(UpdateConfig())

    @model_validator(mode="after")
    def _check_update(self) -> "IngestConfig":
        if self.update.enabled and self.source != "danbooru_api":
            raise ValueError("update.enabled (`--update`) needs source danbooru_api: a dump has no newer posts to "
                             "ask for; point dump.posts_path at the newer dump and run without --update")
        return self

    @model_validator(mode="after")
    def _check_queries(self) -> "IngestConfig":
        labels = set()
        for i, query in enumerate(self.queries):
            counted = counted_tags(query.tags)
            if self.source == "danbooru_api" and len(counted) > self.api.tag_limit:
                raise ValueError(
                    f"queries[{i}].tags {query.tags!r} uses {len(counted)} tags ({' '.join(counted)}) but "
                    f"api.tag_limit is {self.api.tag_limit} (Danbooru allows 2 for anonymous/Member accounts, "
                    "6 for Gold); drop tags or use free metatags (rating:, score:, date:, ...)"
                )
            if query.label in labels:
                raise ValueError(f"queries[{i}]: the label {query.label!r} is used twice; give it a `name`")
            labels.add(query.label)
        return self
