"""Generate a deterministic "mini-booru": Danbooru-shaped posts, their images, the tag table and ground truth.

Layout of a generated folder (`generate_minibooru(out_dir, ...)`):

    posts.jsonl      one post per line, ids ascending (newest last), in the CURRENT Danbooru /posts.json field set
                     and key order (media_asset with variants, tag_string_* per category, tag_count_*), as an
                     anonymous/Member viewer gets it. URLs are host-relative:
                       file_url          /data/original/<md5[0:2]>/<md5[2:4]>/<md5>.<file_ext>
                       large_file_url    /data/sample/<..>/<..>/sample-<md5>.jpg when has_large (width > 850),
                                         sample-<md5>.webm for ugoira (zip; not served), else = file_url
                       preview_file_url  /data/180x180/<..>/<..>/<md5>.jpg (null for swf)
                     the server prefixes its own base URL when serving. Posts the viewer may not see (banned,
                     restricted) carry no md5/file_url/large_file_url/preview_file_url and their media_asset no
                     md5/variants, exactly like the API; no file is generated for them.
    tags.json        /tags.json records (id, name, post_count, category, created_at, updated_at, is_deprecated,
                     words); post_count counts the generated posts (deleted ones included, as on Danbooru).
    images/<md5>.<ext>   the original file of every visible post (videos/ugoira/flash are opaque bytes that no
                     image decoder opens; ugoira is a real zip of JPEG frames).
    truth.json       {"posts": {"<id>": {characters, series, artist, general (every true general tag, before
                     the random dropping that imitates incomplete Danbooru tagging), md5 (a stand-in for hidden
                     posts), file_ext, has_file, composition, background, rating, hidden, year}},
                     "characters": {tag: {series, look}}, "series": {...}, "artists": {tag: {style}}}
                     A planted near-duplicate (`near_duplicates` > 0) also has variant_of (the original's id),
                     variant_kind ("colour" | "crop" | "reencode"), variant_edit (what was done, e.g.
                     "hair:black->navy", "crop:l0.03,t0.02;resized", "jpeg:q90->q62", "png->jpg",
                     "resize:0.72") and variant_parent (whether its parent_id names the original).
    minibooru.json   the completion marker, written last: parameters, counts, universe lists (and, with
                     near_duplicates > 0, "variants": {kind: count}).

"highres"/"absurdres" thresholds scale with max_side (1600x1200 / 3200x2400 with max_side playing 3400 px), so a
768 px mini-booru still has both.

Image sizes (`aspect`): "classic" (the default, the mini-booru's original draw: portrait / square / landscape at a
few ratios, plus rare tall/wide strips) or "danbooru" (a Danbooru-like spread for bucketing at real scale: mostly
2:3 and 3:4 portrait, some square, some landscape, and a few tall and wide strips up to 1:4 / 4:1, so that kohya's
17 buckets at 512² all get images when max_side >= 1024). Every post is drawn from its own seeded generator, so
posts are rendered in worker processes when there are many (`workers`), with the same bytes as a serial run.

Near-duplicates (`near_duplicates`, a fraction of the posts; 0.0, the default, generates exactly what the generator
made before the option existed): that share of ordinary posts is replaced by an edit of an EARLIER visible
jpg/png/webp post of the same booru, as Danbooru has them. The variant has a later id and created_at than its
original, is active (not deleted, banned or restricted), gets a new file (new md5) and a score of its own
(usually lower than the original's):
  colour    (40 %) a colour variant: the original scene re-rendered with the first figure's hair in another
            colour of about the same lightness (hair tags follow: "<new>_hair", often "alternate_hair_color"),
            or with the background's palette hue-rotated (a plain colour/gradient background changes its
            "<tint>_background" tag). Same file type. parent_id = the original for 85 % of them (uploaders
            link colour variant sets), and the original gets has_children.
  crop      (25 %) 2-5 % cut off one (60 %), two (30 %) or all four edges, then scaled back to the original's
            long side (half of them) or not, re-encoded in the original's file type. No parent_id.
  reencode  (35 %) another JPEG quality, PNG<->JPEG (webp -> jpg/png), or a resize to 50-85 % (some upscales
            up to max_side). No parent_id.
Each variant shares the original's posted character, copyright and artist tags and most of its general tags
(a few dropped, a few that the original's tagger missed added); meta tags follow the new size. Colour variants
are uploaded together with their original (mostly the post just before them, minutes later); crops and
re-encodes are of any earlier post (often years later), so an original can have several variants. Variants are
never the original of another variant.
"""
from __future__ import annotations

import colorsys
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import zipfile
from bisect import bisect_left
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from .render import COLOURS, Figure, Look, Scene, Style, _hue_sat_matrix, placeholder, render_scene

MARKER = "minibooru.json"
GENERATOR_VERSION = 1
ASPECTS = ("classic", "danbooru")
DEFAULT_ASPECT = "classic"
MAX_NEAR_DUPLICATES = 0.5  # at most half the posts are edits of another
VARIANT_KINDS = ("colour", "crop", "reencode")
# Below this many posts a generation runs in this process: worker start-up (~0.5 s) outweighs the gain.
PARALLEL_MIN_POSTS = 1000
MIN_YEAR, MAX_YEAR = 2005, 2026
_END = datetime(2026, 10, 31, tzinfo=timezone.utc)

# --------------------------------------------------------------------------------------------- universe


@dataclass(frozen=True)
class Series:
    tag: str
    background: str  # render.draw_background kind
    bg_tags: tuple[str, ...]
    palette: tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]
    tint: str  # colour word of the palette's base, used for "<tint>_background"
    weight: float


@dataclass(frozen=True)
class Character:
    tag: str
    series: str
    look: Look
    weight: float


@dataclass(frozen=True)
class Artist:
    tag: str
    style: Style
    weight: float


SERIES: tuple[Series, ...] = (
    Series("starlit_stage", "stars", ("night_sky", "starry_sky", "sky", "night", "outdoors"),
           ((44, 40, 120), (120, 80, 200), (255, 236, 140)), "blue", 1.3),
    Series("hanasaki_gakuen", "petals", ("cherry_blossoms", "petals", "tree", "outdoors"),
           ((250, 190, 214), (255, 150, 190), (255, 255, 255)), "pink", 1.1),
    Series("azure_tides", "waves", ("ocean", "sky", "horizon", "sun", "outdoors"),
           ((30, 110, 190), (120, 200, 240), (255, 255, 255)), "blue", 0.8),
    Series("neon_district_77", "city", ("cityscape", "building", "night", "outdoors"),
           ((250, 120, 60), (110, 40, 140), (255, 240, 120)), "orange", 1.0),
    Series("verdant_saga", "forest", ("forest", "nature", "tree", "outdoors"),
           ((90, 160, 90), (30, 110, 60), (70, 140, 50)), "green", 0.9),
    Series("houkago_diary", "classroom", ("classroom", "indoors", "chalkboard", "window"),
           ((236, 220, 190), (150, 100, 60), (255, 255, 255)), "yellow", 1.0),
)

CHARACTERS: tuple[Character, ...] = (
    Character("aoi_kanata_(starlit_stage)", "starlit_stage",
              Look("blue", "long", "yellow", "dress", "white", "star_hair_ornament", "yellow"), 1.6),
    Character("hoshino_mirai_(starlit_stage)", "starlit_stage",
              Look("pink", "twintails", "blue", "dress", "pink", "hair_ribbon", "red"), 1.3),
    Character("kurosaki_ren_(starlit_stage)", "starlit_stage",
              Look("black", "short", "red", "jacket", "black", "headphones", "red", male=True), 0.7),
    Character("momoi_hana_(hanasaki_gakuen)", "hanasaki_gakuen",
              Look("brown", "medium", "green", "school_uniform", "navy", "hair_flower", "pink"), 1.2),
    Character("shiraishi_yuki_(hanasaki_gakuen)", "hanasaki_gakuen",
              Look("white", "long", "red", "kimono", "red", "hairband", "blue"), 1.0),
    Character("minato_shizuku_(azure_tides)", "azure_tides",
              Look("aqua", "ponytail", "purple", "hoodie", "white", "hair_ribbon", "blue"), 1.0),
    Character("kaito_(azure_tides)", "azure_tides",
              Look("orange", "short", "blue", "hoodie", "blue", "goggles", "orange", male=True), 0.6),
    Character("akane_(neon_district_77)", "neon_district_77",
              Look("red", "short", "yellow", "jacket", "black", "glasses", "blue"), 1.1),
    Character("lila_(neon_district_77)", "neon_district_77",
              Look("green", "twintails", "pink", "hoodie", "purple", "cat_ears"), 0.9),
    Character("vex_(neon_district_77)", "neon_district_77",
              Look("purple", "short", "green", "armor", "purple", "none", male=True), 0.5),
    Character("elenore_(verdant_saga)", "verdant_saga",
              Look("blonde", "long", "green", "armor", "blue", "hairband", "red"), 1.2),
    Character("sylph_(verdant_saga)", "verdant_saga",
              Look("grey", "medium", "aqua", "dress", "green", "witch_hat", "purple"), 0.8),
    Character("tachibana_mei_(houkago_diary)", "houkago_diary",
              Look("black", "long", "brown", "school_uniform", "navy", "glasses", "red"), 1.0),
    Character("kuroe_rin_(houkago_diary)", "houkago_diary",
              Look("purple", "ponytail", "red", "maid", "black", "hair_ribbon", "white"), 0.9),
)

ARTISTS: tuple[Artist, ...] = (
    Artist("kumoi_tsubasa", Style(line=1.5, shading="flat", jpeg_quality=92), 1.3),
    Artist("nekomata_(nekomata_works)", Style(line=3.5, shading="cel", posterize_bits=0, hue_shift_deg=-8,
                                               saturation=1.15, jpeg_quality=90), 1.0),
    Artist("hoshizora_pen", Style(line=0.0, shading="gradient", saturation=0.85, grain=6.0, jpeg_quality=93), 1.0),
    Artist("mizuiro_32", Style(line=2.0, line_rgb=(90, 50, 40), shading="gradient", posterize_bits=4,
                               hue_shift_deg=10, jpeg_quality=88), 0.8),
    Artist("kageyama_k", Style(line=1.0, shading="cel", grain=10.0, saturation=1.05, jpeg_quality=94), 0.7),
)

# Tag spellings the truth uses for traits (all real Danbooru tags).
HAIR_COLOUR_TAG = {c: f"{c}_hair" for c in COLOURS}
EYE_TAG = {c: f"{c}_eyes" for c in COLOURS}
CUT_TAGS = {
    "short": ("short_hair",),
    "medium": ("medium_hair",),
    "long": ("long_hair",),
    "twintails": ("twintails", "long_hair"),
    "ponytail": ("ponytail", "long_hair"),
}
OUTFIT_TAGS = {
    "school_uniform": ("school_uniform", "serafuku", "sailor_collar", "neckerchief", "red_neckerchief"),
    "dress": ("dress", "{c}_dress", "puffy_sleeves", "frills"),
    "hoodie": ("hoodie", "{c}_hoodie", "hood_down", "drawstring", "long_sleeves"),
    "armor": ("armor", "breastplate", "shoulder_armor"),
    "kimono": ("japanese_clothes", "kimono", "{c}_kimono", "obi", "sash", "wide_sleeves"),
    "maid": ("maid", "apron", "black_dress", "dress"),
    "jacket": ("jacket", "{c}_jacket", "shirt", "white_shirt", "collared_shirt", "necktie", "red_necktie"),
}
LOWER_TAGS = {  # only visible when the legs are in frame
    "school_uniform": ("skirt", "pleated_skirt"),
    "kimono": (),
    "dress": (),
    "maid": (),
}
ACCESSORY_TAGS = {
    "hair_ribbon": ("hair_ribbon", "hair_bow", "{c}_ribbon"),
    "hairband": ("hairband", "{c}_hairband"),
    "witch_hat": ("hat", "witch_hat"),
    "glasses": ("glasses", "{c}-framed_eyewear"),
    "hair_flower": ("hair_flower", "hair_ornament", "flower"),
    "cat_ears": ("animal_ears", "cat_ears"),
    "headphones": ("headphones",),
    "star_hair_ornament": ("hair_ornament", "star_hair_ornament"),
    "goggles": ("goggles", "goggles_on_head"),
    "none": (),
}
COMPOSITION_TAGS = {"portrait": ("portrait",), "upper_body": ("upper_body",), "cowboy_shot": ("cowboy_shot",),
                    "full_body": ("full_body", "standing")}
TAG_CATEGORY = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5}
UNSUPPORTED_EXTS = ("mp4", "zip", "swf")


def look_tags(look: Look, composition: str, closed_eyes: bool) -> list[str]:
    """The general tags a character's visible traits earn (Danbooru spelling)."""
    tags = [HAIR_COLOUR_TAG[look.hair], *CUT_TAGS[look.cut]]
    if not closed_eyes:
        tags.append(EYE_TAG[look.eyes])
    for t in OUTFIT_TAGS[look.outfit]:
        tags.append(t.format(c=look.outfit_colour))
    if composition in ("cowboy_shot", "full_body"):
        tags.extend(LOWER_TAGS.get(look.outfit, ("pants",) if look.male else ("shorts",)))
        if not look.male and look.outfit not in ("hoodie", "armor", "jacket"):
            tags.append("legs")
    for t in ACCESSORY_TAGS[look.accessory]:
        tags.append(t.format(c=look.accessory_colour))
    if look.male:
        tags.append("male_focus")
    return tags


# -------------------------------------------------------------------------------------------- the result


@dataclass
class MiniBooru:
    """A generated mini-booru folder."""

    root: Path
    n_posts: int
    seed: int
    max_side: int
    characters: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    artists: list[str] = field(default_factory=list)
    aspect: str = DEFAULT_ASPECT
    near_duplicates: float = 0.0

    @property
    def posts_path(self) -> Path:
        return self.root / "posts.jsonl"

    @property
    def tags_path(self) -> Path:
        return self.root / "tags.json"

    @property
    def truth_path(self) -> Path:
        return self.root / "truth.json"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def load_posts(self) -> list[dict]:
        with self.posts_path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def load_tags(self) -> list[dict]:
        return json.loads(self.tags_path.read_text(encoding="utf-8"))

    def load_truth(self) -> dict:
        """{"posts": {"<id>": {...}}, "characters": {...}, "series": {...}, "artists": {...}}"""
        return json.loads(self.truth_path.read_text(encoding="utf-8"))

    def image_path(self, md5: str, ext: str) -> Path:
        return self.images_dir / f"{md5}.{ext}"

    @classmethod
    def open(cls, root: Path) -> "MiniBooru":
        meta = json.loads((Path(root) / MARKER).read_text(encoding="utf-8"))
        return cls(Path(root), meta["n_posts"], meta["seed"], meta["max_side"], meta["characters"], meta["series"],
                   meta["artists"], meta.get("aspect", DEFAULT_ASPECT), meta.get("near_duplicates", 0.0))


# ------------------------------------------------------------------------------------------- generation


def _params(n_posts: int, seed: int, max_side: int, aspect: str = DEFAULT_ASPECT, near_duplicates: float = 0.0) -> dict:
    """What decides a generation (its cache key, written into the marker). The default aspect and
    near_duplicates 0 are left out, so markers and folders made without them are the same as before the
    options existed."""
    params = {"n_posts": n_posts, "seed": seed, "max_side": max_side, "version": GENERATOR_VERSION}
    if aspect != DEFAULT_ASPECT:
        params["aspect"] = aspect
    if near_duplicates:
        params["near_duplicates"] = float(near_duplicates)
    return params


def _cache_key(params: dict) -> tuple:
    return (params.get("n_posts"), params.get("seed"), params.get("max_side"), params.get("version"),
            params.get("aspect", DEFAULT_ASPECT), float(params.get("near_duplicates", 0.0)))


def default_workers(n_posts: int) -> int:
    """Worker processes for a generation of n_posts: 1 (this process) below PARALLEL_MIN_POSTS, else one per
    usable CPU core."""
    if n_posts < PARALLEL_MIN_POSTS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_posts // 100))


def generate_minibooru(out_dir: Path, n_posts: int = 300, seed: int = 0, *, max_side: int = 768,
                       aspect: str = DEFAULT_ASPECT, near_duplicates: float = 0.0,
                       workers: int | None = None) -> MiniBooru:
    """Generate (or reuse) a mini-booru in `out_dir`; deterministic by (n_posts, seed, max_side, aspect,
    near_duplicates).

    near_duplicates: the fraction of posts that are edits of an earlier post (see the module doc; 0 = none, the
    output of the generator before the option existed).
    workers: processes that render the posts (None = `default_workers(n_posts)`); the output does not depend on it.
    """
    out_dir = Path(out_dir)
    if n_posts < 1:
        raise ValueError("n_posts must be >= 1")
    if max_side < 64:
        raise ValueError("max_side must be >= 64")
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, found {aspect!r}")
    _check_near_duplicates(near_duplicates)
    if workers is not None and workers < 1:
        raise ValueError("workers must be >= 1")
    params = _params(n_posts, seed, max_side, aspect, near_duplicates)
    marker = out_dir / MARKER
    if marker.exists():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
        if _cache_key(meta) == _cache_key(params):
            return MiniBooru.open(out_dir)
        marker.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    images = out_dir / "images"
    if images.exists():  # a different or interrupted generation: start clean
        shutil.rmtree(images)
    images.mkdir()

    plans = _plan_posts(n_posts, seed, max_side, aspect)
    if near_duplicates:
        plans = _plant_variants(plans, seed, max_side, near_duplicates)
    posts: list[dict] = []
    truth_posts: dict[str, dict] = {}
    for post, truth in _materialise_all(plans, images, max_side, workers or default_workers(n_posts)):
        posts.append(post)
        truth_posts[str(post["id"])] = truth
    _link_parents(posts, plans)
    if near_duplicates:
        _link_variants(posts, plans)

    _atomic_write(out_dir / "posts.jsonl", "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in posts))
    _atomic_write(out_dir / "tags.json", json.dumps(build_tags(posts), indent=0))
    truth = {
        "posts": truth_posts,
        "characters": {c.tag: {"series": c.series, "look": c.look.__dict__} for c in CHARACTERS},
        "series": {s.tag: {"background": s.background, "palette": s.palette} for s in SERIES},
        "artists": {a.tag: {"style": a.style.__dict__} for a in ARTISTS},
    }
    _atomic_write(out_dir / "truth.json", json.dumps(truth))
    meta = {**params, "characters": [c.tag for c in CHARACTERS],
            "series": [s.tag for s in SERIES], "artists": [a.tag for a in ARTISTS],
            "posts_with_images": sum(1 for p in posts if "md5" in p), "ids": [posts[0]["id"], posts[-1]["id"]]}
    if near_duplicates:
        kinds = [plan["variant"]["kind"] for plan in plans if plan.get("variant")]
        meta["variants"] = {k: kinds.count(k) for k in VARIANT_KINDS}
    _atomic_write(marker, json.dumps(meta, indent=1))
    return MiniBooru.open(out_dir)


def _materialise_all(plans: list[dict], images: Path, max_side: int, workers: int) -> list[tuple[dict, dict]]:
    """(post, truth) of every plan, in plan order. Each post draws only from its own generator (seeded by its plan)
    and writes only its own file, so worker processes give the same bytes as this process alone. Spawned, not
    forked: the caller may be a threaded process (the ingest stage under Prefect)."""
    job = functools.partial(_materialise, images=images, max_side=max_side)
    if workers <= 1 or len(plans) < 2:
        return [job(plan) for plan in plans]
    workers = min(workers, len(plans))
    chunk = max(1, len(plans) // (workers * 8))  # small chunks: render cost varies with the drawn size
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(job, plans, chunksize=chunk))


def planned_sizes(n_posts: int, seed: int = 0, *, max_side: int = 768, aspect: str = DEFAULT_ASPECT,
                  near_duplicates: float = 0.0) -> list[dict]:
    """Each post's image size and kind as `generate_minibooru` would make them, without rendering anything
    (milliseconds per thousand posts): {"id", "role", "width", "height", "deleted", "banned", "restricted"}.
    role is "" for an ordinary picture, "variant" for a planted near-duplicate, else the special kind (gif, mp4,
    zip, swf, comic, small, tall, wide, ...)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, found {aspect!r}")
    _check_near_duplicates(near_duplicates)
    plans = _plan_posts(n_posts, seed, max_side, aspect)
    if near_duplicates:
        plans = _plant_variants(plans, seed, max_side, near_duplicates)
    out = []
    for plan in plans:
        if plan.get("variant"):
            src = plan["variant"]["source"]
            src_rng = np.random.default_rng(src["seed"])
            src_drawn = _draw_scene(src, src_rng, max_side)  # the original's first draws: its scene, its file type
            src_ext = _file_ext(src, src_rng)
            edit = _variant_edit(plan, np.random.default_rng(plan["seed"]), src_drawn, src_ext, max_side)
            width, height = edit["size"]
        else:
            scene = _draw_scene(plan, np.random.default_rng(plan["seed"]), max_side).scene  # the first draws of a post
            width, height = scene.width, scene.height
        out.append({"id": plan["id"], "role": plan["role"], "width": width, "height": height,
                    "deleted": plan["deleted"], "banned": plan["banned"], "restricted": plan["restricted"]})
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Specials each generation has at least once (when n_posts allows), so small test boorus cover every path.
_FORCED = ("png_rgba", "webp", "png", "gif", "mp4", "zip", "swf", "comic", "small", "small", "tall", "wide",
           "deleted", "deleted", "banned", "restricted", "restricted", "multi", "original", "square")


_FILE_ROLES = {"png_rgba", "webp", "png", "gif", "mp4", "zip", "swf", "comic", "small", "tall", "wide", "square"}


def _plan_posts(n: int, seed: int, max_side: int, aspect: str = DEFAULT_ASPECT) -> list[dict]:
    rng = np.random.default_rng([seed, n, max_side, 0x6D62])
    # created_at: more posts in later years; ids follow time with random gaps
    years = np.arange(MIN_YEAR, MAX_YEAR + 1)
    yw = np.exp(0.13 * (years - MIN_YEAR))
    yw /= yw.sum()
    year_of = rng.choice(years, size=n, p=yw)
    stamps = []
    for y in year_of:
        y0 = datetime(int(y), 1, 1, tzinfo=timezone.utc)
        y1 = min(datetime(int(y) + 1, 1, 1, tzinfo=timezone.utc), _END)
        stamps.append(y0 + timedelta(seconds=float(rng.uniform(0, (y1 - y0).total_seconds()))))
    stamps.sort()
    ids = 1000 + np.cumsum(rng.integers(1, 60, size=n))

    roles: dict[int, str] = {}
    if n >= 8:
        forced = _FORCED[: max(0, min(len(_FORCED), n // 3))]
        for idx, role in zip(rng.permutation(n)[: len(forced)], forced):
            roles[int(idx)] = role

    cw = np.array([c.weight for c in CHARACTERS])
    aw = np.array([a.weight for a in ARTISTS])
    plans = []
    for i in range(n):
        role = roles.get(i, "")
        u = rng.random()
        if not role:
            if u < 0.02:
                role = "png"
            elif u < 0.045:
                role = "webp"
            elif u < 0.05:
                role = "gif"
            elif u < 0.06:
                role = "mp4"
            elif u < 0.066:
                role = "zip"
            elif u < 0.069:
                role = "swf"
            elif u < 0.09:
                role = "comic"
            elif u < 0.11:
                role = "small"
            elif u < 0.12:
                role = "tall" if rng.random() < 0.5 else "wide"
        year = stamps[i].year
        char_idx = int(rng.choice(len(CHARACTERS), p=cw / cw.sum()))
        ch = CHARACTERS[char_idx]
        characters = [ch]
        original = role == "original" or (not role and rng.random() < 0.05)
        if original:
            characters = []
        elif role == "multi" or rng.random() < 0.1:
            mates = [c for c in CHARACTERS if c.series == ch.series and c.tag != ch.tag]
            if mates:
                characters.append(mates[int(rng.integers(len(mates)))])
        series = next(s for s in SERIES if s.tag == ch.series)
        artist = ARTISTS[int(rng.choice(len(ARTISTS), p=aw / aw.sum()))]

        # status flags (independent of the image kind, except forced roles)
        deleted = role == "deleted" or rng.random() < 0.035
        banned = role == "banned" or rng.random() < 0.008
        restricted = role == "restricted" or rng.random() < 0.015
        if role in _FILE_ROLES:  # keep every forced file kind visible
            banned = restricted = False

        rating = str(rng.choice(["g", "s", "q", "e"], p=[0.5, 0.31, 0.12, 0.07]))
        # heavy-tailed score whose median grows with the year; explicit/questionable score a bit higher
        mu = 0.2 + 0.17 * (year - MIN_YEAR) + {"g": 0.0, "s": 0.15, "q": 0.3, "e": 0.45}[rating]
        score = int(np.floor(np.exp(rng.normal(mu, 0.95))))
        if rng.random() < 0.02:
            score = int(score * rng.uniform(4, 12))  # viral posts
        if deleted:
            score = int(score * 0.3) - int(rng.integers(0, 4))
        down = -int(rng.poisson(0.05 + 0.02 * (year - MIN_YEAR) + (1.5 if deleted else 0)))
        up = max(0, score - down)
        score = up + down
        fav = max(0, int(round(up * rng.uniform(0.8, 1.6) + rng.poisson(0.5 + 0.1 * (year - MIN_YEAR)))))

        plans.append({
            "index": i, "id": int(ids[i]), "created": stamps[i], "role": role, "series": series, "characters": characters,
            "artist": artist, "rating": rating, "score": score, "up": up, "down": down, "fav": fav,
            "deleted": deleted, "banned": banned, "restricted": restricted and not banned, "original": original,
            "seed": int(rng.integers(0, 2**31 - 1)), "max_side": max_side, "aspect": aspect,
        })
    return plans


# aspect "danbooru": (width / height, share of the ordinary posts) — canvas presets dominate real uploads.
_DANBOORU_RATIOS = (
    (2 / 3, 0.24), (3 / 4, 0.15), (1 / 2 ** 0.5, 0.08), (4 / 5, 0.05), (9 / 16, 0.06), (1 / 2, 0.03),  # portrait 61 %
    (1.0, 0.13),  # square
    (4 / 3, 0.05), (3 / 2, 0.04), (16 / 9, 0.06), (5 / 4, 0.01), (2.0, 0.01),  # landscape 17 %
)
_DANBOORU_STRIPS = 0.09  # the rest: tall (half) and wide (half) strips, full max_side long ...
_STRIP_RATIOS = (2.5, 3.0, 3.5, 3.75, 4.0)  # ... at these long:short ratios, equally often (a 1:4 strip at
#                                              max_side 1024 is 256 px wide: the smallest side 512² buckets take)
_JITTER = 0.025  # log-ratio spread of the 30 % of pictures that are not an exact preset ratio


def _danbooru_size(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    """A Danbooru-like size: mostly 2:3 / 3:4 portrait, some square and landscape, a few tall and wide strips."""
    u = rng.random()
    if u < _DANBOORU_STRIPS:
        tall = u < _DANBOORU_STRIPS / 2
        ratio = float(_STRIP_RATIOS[int(rng.integers(len(_STRIP_RATIOS)))])
        # never wider than the largest ratio (so the short side stays >= max_side / 4)
        ratio *= float(np.exp(rng.uniform(-_JITTER, 0.0 if ratio == max(_STRIP_RATIOS) else _JITTER)))
        short = max(16, round(max_side / ratio))
        return (short, max_side) if tall else (max_side, short)
    ratios = np.array([r for r, _ in _DANBOORU_RATIOS])
    weights = np.array([w for _, w in _DANBOORU_RATIOS])
    ratio = float(ratios[int(rng.choice(len(ratios), p=weights / weights.sum()))])
    if rng.random() < 0.3:
        ratio *= float(np.exp(rng.uniform(-_JITTER, _JITTER)))
    long_side = max(64, int(rng.uniform(0.55, 1.0) * max_side))
    if ratio <= 1:
        return max(16, round(long_side * ratio)), long_side
    return long_side, max(16, round(long_side / ratio))


def _size(rng: np.random.Generator, role: str, max_side: int, aspect: str = DEFAULT_ASPECT) -> tuple[int, int]:
    if aspect == "danbooru" and not role:  # special roles (tall, wide, small, square, comic...) keep their sizes
        return _danbooru_size(rng, max_side)
    if role == "tall":
        ratio = rng.uniform(2.6, 3.5)
        h = max_side
        return max(32, int(h / ratio)), h
    if role == "wide":
        ratio = rng.uniform(2.6, 3.5)
        w = max_side
        return w, max(32, int(w / ratio))
    u = rng.random()
    if role == "square" or (not role and 0.6 <= u < 0.75):
        ratio = 1.0
    elif u < 0.6:
        ratio = float(rng.choice([2 / 3, 3 / 4, 4 / 5, 9 / 16, 0.7]))  # portrait (w/h)
    else:
        ratio = float(rng.choice([3 / 2, 4 / 3, 16 / 9, 1.25]))
    long_side = int(rng.integers(110, 250)) if role == "small" else int(rng.uniform(0.55, 1.0) * max_side)
    long_side = max(64, long_side) if role != "small" else long_side
    if ratio <= 1:
        return max(16, int(round(long_side * ratio))), long_side
    return long_side, max(16, int(round(long_side / ratio)))


@dataclasses.dataclass
class _Drawn:
    """What the scene step decided: the picture to render and the tags that are true of it."""

    scene: Scene
    general: list[str]  # every true general tag
    composition: str
    background: str


@dataclasses.dataclass
class _File:
    ext: str
    md5: str
    file_size: int
    duration: float | None
    pixel_hash: str
    has_file: bool
    meta: list[str]  # file-kind meta tags (animated, video, ...)
    data: bytes | None = None  # the file's bytes (None for hidden posts and when not kept)


def _materialise(plan: dict, images: Path, max_side: int) -> tuple[dict, dict]:
    """Render the post's file (if any) and build its Danbooru record + ground truth.

    scene -> file -> tags -> record, all drawing from one generator seeded by the plan: the order of the steps
    is the order of the draws, so it must stay as it is for a given GENERATOR_VERSION (same booru, same bytes).
    """
    if plan.get("variant"):
        return _materialise_variant(plan, images, max_side)
    rng = np.random.default_rng(plan["seed"])
    drawn = _draw_scene(plan, rng, max_side)
    file = _make_file(plan, rng, drawn.scene, images)
    general, characters, copyright_tags, meta = _observed_tags(plan, rng, drawn, file, max_side)
    record = _post_record(plan, rng, md5=file.md5, ext=file.ext, width=drawn.scene.width,
                          height=drawn.scene.height, file_size=file.file_size, duration=file.duration,
                          pixel_hash=file.pixel_hash or hashlib.md5(file.md5.encode()).hexdigest(),
                          general=general, character=characters, copyright=copyright_tags,
                          artist=[plan["artist"].tag], meta=meta, hidden=plan["banned"] or plan["restricted"])
    series: Series = plan["series"]
    truth = {
        "characters": sorted(c.tag for c in plan["characters"]),
        "series": [series.tag] if not plan["original"] else ["original"],
        "artist": plan["artist"].tag, "general": sorted(set(drawn.general)), "md5": file.md5, "file_ext": file.ext,
        "has_file": file.has_file, "composition": drawn.composition, "background": drawn.background,
        "rating": plan["rating"], "hidden": plan["banned"] or plan["restricted"], "year": plan["created"].year,
    }
    return record, truth


def _draw_scene(plan: dict, rng: np.random.Generator, max_side: int) -> _Drawn:
    """Size, composition, background and figures of the picture, and the general tags true of it."""
    role = plan["role"]
    series: Series = plan["series"]
    artist: Artist = plan["artist"]
    chars: list[Character] = plan["characters"]
    width, height = _size(rng, role, max_side, plan.get("aspect", DEFAULT_ASPECT))

    composition = str(rng.choice(["portrait", "upper_body", "cowboy_shot", "full_body"], p=[0.2, 0.45, 0.2, 0.15]))
    if height < width * 0.6 and composition in ("cowboy_shot", "full_body"):
        composition = "upper_body"
    u = rng.random()
    if role == "png_rgba":
        background = "transparent"
    elif u < 0.55:
        background = series.background
    elif u < 0.75:
        background = "white"
    elif u < 0.85:
        background = "grey"
    elif u < 0.93:
        background = "colour"
    else:
        background = "gradient"

    looks: list[Look] = [c.look for c in chars]
    if not looks:  # an original character with random traits
        male = rng.random() < 0.2
        looks = [Look(hair=str(rng.choice(list(HAIR_COLOUR_TAG))), cut=str(rng.choice(list(CUT_TAGS))),
                      eyes=str(rng.choice(["blue", "red", "green", "purple", "yellow", "brown"])),
                      outfit=str(rng.choice(list(OUTFIT_TAGS))), outfit_colour=str(rng.choice(["white", "black", "blue", "red"])),
                      accessory=str(rng.choice(list(ACCESSORY_TAGS))), accessory_colour="red", male=male)]
    figures = []
    general: list[str] = []
    for lk in looks:
        expression = str(rng.choice(["smile", "open_mouth", "closed_mouth"], p=[0.5, 0.25, 0.25]))
        closed = rng.random() < 0.07
        blush = rng.random() < 0.3
        at_viewer = rng.random() < 0.72
        figures.append(Figure(lk, expression, closed, blush, at_viewer))
        general += look_tags(lk, composition, closed)
        general.append(expression)
        if closed:
            general.append("closed_eyes")
        if blush:
            general.append("blush")
        if expression == "open_mouth" and rng.random() < 0.5:
            general.append("smile")  # open-mouthed smile
        general.append("looking_at_viewer" if at_viewer and not closed else "looking_to_the_side")
    general += _count_tags(looks)
    general += COMPOSITION_TAGS[composition]
    general += _background_tags(background, series)

    comic_panels = 0
    greyscale = False
    if role == "comic":
        comic_panels = 4 if rng.random() < 0.5 else 3
        height = max_side
        width = max(64, int(max_side * rng.uniform(0.32, 0.5))) if comic_panels == 4 else int(max_side * 0.7)
        general = [t for t in general if t not in COMPOSITION_TAGS[composition] and t not in series.bg_tags]
        general += ["comic", "speech_bubble"] + (["4koma"] if comic_panels == 4 else [])
        greyscale = rng.random() < 0.4
        if greyscale:
            general += ["monochrome", "greyscale"]
            general = [t for t in general if not re.search(r"_(hair|eyes)$", t)]

    scene = Scene(width, height, tuple(figures), background, series.palette, artist.style, composition,
                  comic_panels, greyscale, seed=plan["seed"])
    return _Drawn(scene, general, composition, background)


def _count_tags(looks: list[Look]) -> list[str]:
    """1girl / 2girls / 1boy / solo / multiple_girls ... from the figures."""
    tags = []
    n_girls = sum(1 for lk in looks if not lk.male)
    n_boys = len(looks) - n_girls
    if n_girls:
        tags.append(f"{n_girls}girl" if n_girls == 1 else f"{n_girls}girls")
    if n_boys:
        tags.append(f"{n_boys}boy" if n_boys == 1 else f"{n_boys}boys")
    if len(looks) == 1:
        tags.append("solo")
    if n_girls > 1:
        tags.append("multiple_girls")
    if n_boys > 1:
        tags.append("multiple_boys")
    return tags


def _background_tags(background: str, series: Series) -> list[str]:
    if background == series.background:
        return list(series.bg_tags)
    return {"white": ["simple_background", "white_background"],
            "grey": ["simple_background", "grey_background"],
            "colour": ["simple_background", f"{series.tint}_background"],
            "gradient": ["gradient_background", f"{series.tint}_background"],
            "transparent": ["transparent_background"]}.get(background, [])


def _file_ext(plan: dict, rng: np.random.Generator) -> str:
    """The post's file type (the first draw of the file step)."""
    role = plan["role"]
    ext = {"png": "png", "png_rgba": "png", "webp": "webp", "gif": "gif", "mp4": "mp4", "zip": "zip", "swf": "swf"}.get(role, "jpg")
    if role == "" and rng.random() < 0.1:
        ext = "png"
    return ext


def _make_file(plan: dict, rng: np.random.Generator, scene: Scene, images: Path | None) -> _File:
    """The post's file: rendered and encoded into `images/<md5>.<ext>` (none for posts the API hides).
    images None: nothing is written, the bytes come back in `_File.data` (a variant replaying its original)."""
    ext = _file_ext(plan, rng)
    meta: list[str] = []
    duration = None
    hidden = plan["banned"] or plan["restricted"]

    pixel_hash = ""
    data: bytes | None = None
    if ext in UNSUPPORTED_EXTS:
        meta += {"mp4": ["animated", "video", "sound"] if rng.random() < 0.5 else ["animated", "video"],
                 "zip": ["animated", "ugoira"], "swf": ["animated", "flash"]}[ext]
        duration = None if ext == "swf" else 1.0
    if hidden:
        # hidden posts: the API never shows their file, so only the metadata is generated; a stable
        # pseudo md5 keeps truth.json consistent.
        data = None
    elif ext in UNSUPPORTED_EXTS:
        data, duration = _opaque_file(ext, rng, scene.width, scene.height)
    else:
        img = render_scene(scene)
        if ext == "gif":
            frames = [img.convert("RGB"), render_scene(dataclasses.replace(scene, seed=scene.seed + 1))]
            buf = io.BytesIO()
            frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
            data, duration = buf.getvalue(), 0.4
            meta += ["animated", "animated_gif"]
        else:
            data = _encode(img, ext, plan["artist"].style.jpeg_quality)
        pixel_hash = hashlib.md5(img.tobytes()).hexdigest()

    if data is not None:
        md5 = hashlib.md5(data).hexdigest()
        if images is not None:
            (images / f"{md5}.{ext}").write_bytes(data)
        file_size = len(data)
    else:
        md5 = hashlib.md5(f"hidden-{plan['id']}-{plan['seed']}".encode()).hexdigest()
        file_size = int(rng.integers(80_000, 900_000))
    return _File(ext, md5, file_size, duration, pixel_hash, data is not None, meta, data if images is None else None)


def _observed_tags(plan: dict, rng: np.random.Generator, drawn: _Drawn, file: _File,
                   max_side: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """The tags the post carries on the booru: (general, character, copyright, meta). Like Danbooru's, they
    are incomplete: some true general and character tags are dropped."""
    meta = list(file.meta) + _size_meta(drawn.scene.width, drawn.scene.height, max_side)
    if rng.random() < 0.3:
        meta.append("commentary" if rng.random() < 0.6 else "commentary_request")
    if rng.random() < 0.04:
        meta.append("bad_id")
        meta.append("bad_pixiv_id")
    if plan["role"] == "comic" and rng.random() < 0.5:
        meta.append("translated")
    if plan["banned"]:
        meta.append("banned_artist")

    kept = []
    for t in sorted(set(drawn.general)):  # Danbooru tags are incomplete: drop some true tags
        p = 0.03 if t in {"1girl", "1boy", "solo", "2girls", "multiple_girls", "comic"} else 0.14
        if rng.random() >= p:
            kept.append(t)
    characters = sorted({c.tag for c in plan["characters"] if rng.random() >= 0.02})
    copyright_tags = ["original"] if plan["original"] else [plan["series"].tag]
    return kept, characters, copyright_tags, sorted(set(meta))


def _size_meta(width: int, height: int, max_side: int) -> list[str]:
    """highres / absurdres, with the largest generated side playing the part of a 3400 px original."""
    s = max_side / 3400.0
    meta = []
    if (width >= 1600 * s and height >= 1200 * s) or (width >= 1200 * s and height >= 1600 * s):
        meta.append("highres")
    if (width >= 3200 * s and height >= 2400 * s) or (width >= 2400 * s and height >= 3200 * s):
        meta.append("absurdres")
    return meta


def _encode(img: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=False)
    elif ext == "png":
        img.save(buf, "PNG", compress_level=3)
    elif ext == "webp":
        img.convert("RGB").save(buf, "WEBP", quality=85, method=2)
    else:
        raise ValueError(ext)
    return buf.getvalue()


def _opaque_file(ext: str, rng: np.random.Generator, width: int, height: int) -> tuple[bytes, float | None]:
    """Deterministic stand-in bytes for file types the pipeline does not ingest (never decoded as images)."""
    body = rng.integers(0, 256, size=int(rng.integers(20_000, 60_000)), dtype=np.uint8).tobytes()
    if ext == "mp4":
        return b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + body, round(float(rng.uniform(2, 30)), 3)
    if ext == "zip":  # an ugoira: a zip of JPEG frames
        buf = io.BytesIO()
        frame = io.BytesIO()
        placeholder(min(width, 256), min(height, 256)).save(frame, "JPEG", quality=80)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for k in range(3):
                info = zipfile.ZipInfo(f"{k:06d}.jpg", date_time=(2020, 1, 1, 0, 0, 0))
                zf.writestr(info, frame.getvalue())
        return buf.getvalue(), 0.3
    return b"FWS\x0a" + len(body).to_bytes(4, "little") + body, None


def _iso(dt: datetime) -> str:
    """Danbooru's timestamp format in US Eastern time (DST approximated by month)."""
    off = -4 if 4 <= dt.month <= 10 else -5
    local = dt.astimezone(timezone(timedelta(hours=off)))
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}" + f"{off:+03d}:00"


def image_url(kind: str, md5: str, ext: str) -> str:
    """Host-relative URL of an original or variant file ('original', '180x180', '360x360', '720x720', 'sample', 'full')."""
    name = f"sample-{md5}.{ext}" if kind == "sample" else f"{md5}.{ext}"
    return f"/data/{kind}/{md5[0:2]}/{md5[2:4]}/{name}"


def _fit(w: int, h: int, mw: int | None, mh: int | None) -> tuple[int, int]:
    scale = 1.0
    if mw:
        scale = min(scale, mw / w)
    if mh:
        scale = min(scale, mh / h)
    return max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def variant_list(md5: str, ext: str, width: int, height: int, animated: bool) -> list[dict]:
    """media_asset.variants as Danbooru computes them (MediaAsset#variant_types)."""
    out = []
    if ext != "swf":
        for t, m, vext in (("180x180", 180, "jpg"), ("360x360", 360, "jpg"), ("720x720", 720, "webp")):
            vw, vh = _fit(width, height, m, m)
            out.append({"type": t, "url": image_url(t, md5, vext), "width": vw, "height": vh, "file_ext": vext})
    static = ext in ("jpg", "png", "gif", "webp") and not animated
    if ext == "zip" or (static and width > 850):
        vext = "webm" if animated else "jpg"
        vw, vh = _fit(width, height, 850, None)
        out.append({"type": "sample", "url": image_url("sample", md5, vext), "width": vw, "height": vh, "file_ext": vext})
    if ext == "webp":
        out.append({"type": "full", "url": image_url("full", md5, "jpg"), "width": width, "height": height, "file_ext": "jpg"})
    out.append({"type": "original", "url": image_url("original", md5, ext), "width": width, "height": height, "file_ext": ext})
    return out


def _file_key(rng: np.random.Generator) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[int(i)] for i in rng.integers(0, 62, size=9))


def _post_record(plan: dict, rng: np.random.Generator, *, md5: str, ext: str, width: int, height: int, file_size: int,
                 duration: float | None, pixel_hash: str, general: list[str], character: list[str],
                 copyright: list[str], artist: list[str], meta: list[str], hidden: bool) -> dict:
    created: datetime = plan["created"]
    updated = min(created + timedelta(seconds=float(rng.exponential(86400 * 30))), _END)
    asset_created = created - timedelta(seconds=float(rng.uniform(5, 600)))
    all_tags = sorted(set(general + character + copyright + artist + meta))
    pixiv_id = int(rng.integers(1_000_000, 130_000_000)) if rng.random() < 0.55 else None
    if pixiv_id:
        source = f"https://www.pixiv.net/artworks/{pixiv_id}"
    elif rng.random() < 0.6:
        source = f"https://twitter.com/{artist[0].split('_(')[0]}/status/{int(rng.integers(10**17, 10**18))}"
    else:
        source = ""
    animated = duration is not None
    has_large = ext == "zip" or (ext in ("jpg", "png", "webp", "gif") and not animated and width > 850)
    variants = variant_list(md5, ext, width, height, animated)
    asset = {
        "id": 1_000_000 + plan["index"] * 7 + int(rng.integers(0, 7)),
        "created_at": _iso(asset_created), "updated_at": _iso(asset_created + timedelta(seconds=2)),
        "md5": md5, "file_ext": ext, "file_size": file_size, "image_width": width, "image_height": height,
        "duration": duration, "status": "active", "file_key": _file_key(rng), "is_public": True,
        "pixel_hash": pixel_hash, "variants": variants,
    }
    post = {
        "id": plan["id"], "created_at": _iso(created), "uploader_id": int(rng.integers(10_000, 1_300_000)),
        "score": plan["score"], "source": source, "md5": md5, "last_comment_bumped_at": None,
        "rating": plan["rating"], "image_width": width, "image_height": height, "tag_string": " ".join(all_tags),
        "fav_count": plan["fav"], "file_ext": ext, "last_noted_at": None, "parent_id": None, "has_children": False,
        "approver_id": int(rng.integers(1000, 1_300_000)) if rng.random() < 0.4 else None,
        "tag_count_general": len(general), "tag_count_artist": len(artist), "tag_count_character": len(character),
        "tag_count_copyright": len(copyright), "file_size": file_size, "up_score": plan["up"],
        "down_score": plan["down"], "is_pending": False, "is_flagged": False, "is_deleted": plan["deleted"],
        "tag_count": len(all_tags), "updated_at": _iso(updated), "is_banned": plan["banned"], "pixiv_id": pixiv_id,
        "last_commented_at": None, "has_active_children": False, "bit_flags": 0, "tag_count_meta": len(meta),
        "has_large": has_large, "has_visible_children": False, "media_asset": asset,
        "tag_string_general": " ".join(general), "tag_string_character": " ".join(character),
        "tag_string_copyright": " ".join(copyright), "tag_string_artist": " ".join(artist),
        "tag_string_meta": " ".join(meta),
        "file_url": image_url("original", md5, ext),
        "large_file_url": image_url("sample", md5, "jpg") if has_large and ext != "zip" else
        (image_url("sample", md5, "webm") if ext == "zip" else image_url("original", md5, ext)),
        "preview_file_url": image_url("180x180", md5, "jpg") if ext != "swf" else None,
    }
    if hidden:
        hide_file_fields(post)
    return post


def hide_file_fields(post: dict) -> dict:
    """What Danbooru's PostPolicy does for a post the viewer may not see (in place; returns the post)."""
    for k in ("md5", "file_url", "large_file_url", "preview_file_url"):
        post.pop(k, None)
    asset = post.get("media_asset")
    if isinstance(asset, dict):
        asset.pop("md5", None)
        asset.pop("variants", None)  # their URLs would reveal the md5
    return post


def _link_parents(posts: list[dict], plans: list[dict]) -> None:
    """~5% of posts are children of an earlier post of the same character (alternate versions)."""
    rng = np.random.default_rng([plans[0]["seed"] if plans else 0, len(posts), 0x70])
    by_char: dict[str, list[int]] = {}
    for i, plan in enumerate(plans):
        key = plan["characters"][0].tag if plan["characters"] else ""
        # a planted variant is linked (or not) by _link_variants only
        if key and by_char.get(key) and not plan.get("variant") and rng.random() < 0.05:
            parent_idx = by_char[key][int(rng.integers(len(by_char[key])))]
            parent, child = posts[parent_idx], posts[i]
            child["parent_id"] = parent["id"]
            parent["has_children"] = True
            parent["has_visible_children"] = True
            if not child["is_deleted"]:
                parent["has_active_children"] = True
        if key:
            by_char.setdefault(key, []).append(i)


# ------------------------------------------------------------------------------------------ near-duplicates

# Posts a variant may be made of: visible, active still pictures (jpg/png/webp) without transparency or panels.
_VARIANT_SOURCE_ROLES = frozenset({"", "png", "webp", "square", "multi", "original"})
_VARIANT_KIND_P = (0.40, 0.25, 0.35)  # colour, crop, reencode
_COLOUR_PARENT_P = 0.85  # colour variants whose uploader set parent_id to the original
_HAIR_LUMA_STEP = 40.0  # a recoloured hair keeps about its lightness (0..255 luma): a hue change, as artists do
_TINTS = ("blue", "pink", "green", "yellow", "orange", "purple", "red", "aqua")  # "<tint>_background" words


def _check_near_duplicates(value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= MAX_NEAR_DUPLICATES):
        raise ValueError(f"near_duplicates must be a fraction in [0, {MAX_NEAR_DUPLICATES}], found {value!r}")


def _luma(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _plant_variants(plans: list[dict], seed: int, max_side: int, fraction: float) -> list[dict]:
    """Replace round(fraction * n) ordinary posts by variants of earlier visible pictures (see the module doc).

    Draws from its own generator, after the plan of every post is made, so the originals are exactly the posts
    of a generation without variants. A variant keeps the id and seed of the post it replaces, and its created_at
    but for colour variants (minutes after the post before them)."""
    n = len(plans)
    rng = np.random.default_rng([seed, n, max_side, 0x6E64])
    source_ok = [p["role"] in _VARIANT_SOURCE_ROLES and not (p["deleted"] or p["banned"] or p["restricted"])
                 for p in plans]
    first = next((i for i, ok in enumerate(source_ok) if ok), n)
    pool = [i for i in range(first + 1, n) if plans[i]["role"] == ""]  # forced specials stay as they are
    k = min(int(round(fraction * n)), len(pool))
    if k == 0:
        return plans
    slots = sorted(int(i) for i in rng.choice(np.array(pool), size=k, replace=False))
    taken = set(slots)
    sources = [i for i in range(n) if source_ok[i] and i not in taken]  # never a variant of a variant
    out = list(plans)
    varied: list[int] = []  # originals that have a variant already (sets of several variants)
    for i in slots:
        m = bisect_left(sources, i)  # sources before the slot; >= 1 (the first source precedes every slot)
        u = rng.random()
        kind = VARIANT_KINDS[0] if u < _VARIANT_KIND_P[0] else VARIANT_KINDS[1] if u < sum(_VARIANT_KIND_P[:2]) \
            else VARIANT_KINDS[2]
        created = plans[i]["created"]
        if kind == "colour":  # uploaded together with its original: mostly the picture just before it
            j = sources[m - 1] if rng.random() < 0.7 else sources[m - 1 - int(rng.integers(min(m, 4)))]
            # ... minutes after the post before it (ids follow upload time, so it stays between its neighbours)
            before = plans[i - 1]["created"]
            after = plans[i + 1]["created"] if i + 1 < n else _END
            gap = min(float(rng.uniform(60.0, 3 * 3600.0)), (after - before).total_seconds() / 2)
            created = before + timedelta(seconds=max(gap, 0.001))
        elif varied and rng.random() < 0.25:
            j = varied[int(rng.integers(len(varied)))]
        else:
            j = sources[int(rng.integers(m))]
        if j not in varied:
            varied.append(j)
        parent = kind == "colour" and bool(rng.random() < _COLOUR_PARENT_P)
        src, slot = plans[j], plans[i]
        # a score of its own, usually below the original's (the first upload collected the votes)
        s0 = src["score"]
        if rng.random() < 0.8:
            score = int(np.floor(s0 * rng.uniform(0.05, 0.7)))
        else:
            score = int(np.floor(s0 * rng.uniform(1.05, 1.6))) + 1
        if score == s0:
            score = s0 - 1 if s0 > 0 else s0 + 1
        down = -int(rng.poisson(0.1))
        up = max(0, score - down)
        fav = max(0, int(round(up * rng.uniform(0.8, 1.6))))
        out[i] = {**src, "index": i, "id": slot["id"], "created": created, "role": "variant",
                  "score": up + down, "up": up, "down": down, "fav": fav,
                  "deleted": False, "banned": False, "restricted": False, "seed": slot["seed"],
                  "variant": {"source": src, "kind": kind, "parent": parent}}
    return out


def _rotate_hue(rgb: tuple[int, int, int], deg: float) -> tuple[int, int, int]:
    """The colour with its hue rotated by `deg` around the grey axis (YIQ: the luma stays)."""
    m = _hue_sat_matrix(deg, 1.0)
    r, g, b = rgb
    out = (int(np.clip(round(m[4 * k] * r + m[4 * k + 1] * g + m[4 * k + 2] * b), 0, 255)) for k in range(3))
    return tuple(out)  # type: ignore[return-value]


def _hue(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0]


def _tint_word(rgb: tuple[int, int, int], not_this: str) -> str:
    """The tint word (of _TINTS, other than `not_this`) nearest in hue to rgb."""
    h = _hue(rgb)
    return min((t for t in _TINTS if t != not_this),
               key=lambda t: (min(abs(_hue(COLOURS[t]) - h), 1 - abs(_hue(COLOURS[t]) - h)), t))


def _variant_edit(plan: dict, rng: np.random.Generator, src: _Drawn, src_ext: str, max_side: int) -> dict:
    """The edit that makes the variant (the first draws of a variant): kind, details, its size and file type.
    planned_sizes calls it too (no rendering)."""
    kind = plan["variant"]["kind"]
    scene = src.scene
    w, h = scene.width, scene.height
    quality = plan["artist"].style.jpeg_quality
    edit: dict = {"kind": kind, "size": (w, h), "ext": src_ext, "quality": quality}
    if kind == "colour":
        series: Series = plan["series"]
        if src.background not in ("white", "grey", "transparent") and rng.random() < 0.45:
            deg = float(rng.uniform(90.0, 270.0))
            palette = tuple(_rotate_hue(c, deg) for c in scene.palette)
            new_tint = _tint_word(_rotate_hue(COLOURS[series.tint], deg), series.tint)
            edit.update(sub="background", palette=palette, tint=(series.tint, new_tint),
                        text=f"background:{series.tint}->{new_tint}")
        else:
            old = scene.figures[0].look.hair
            step = {c: abs(_luma(COLOURS[c]) - _luma(COLOURS[old])) for c in HAIR_COLOUR_TAG if c != old}
            others = sorted(step, key=lambda c: (step[c], c))
            near = [c for c in others if step[c] <= _HAIR_LUMA_STEP] or others[:2]
            new = near[int(rng.integers(len(near)))]
            edit.update(sub="hair", hair=(old, new), text=f"hair:{old}->{new}")
    elif kind == "crop":
        u = rng.random()
        n_edges = 1 if u < 0.6 else 2 if u < 0.9 else 4  # mostly a border or a signature trimmed off
        frac = [0.0, 0.0, 0.0, 0.0]  # left, top, right, bottom
        for e in rng.permutation(4)[:n_edges]:
            frac[int(e)] = float(rng.uniform(0.02, 0.05))
        left, top = int(round(w * frac[0])), int(round(h * frac[1]))
        box = (left, top, w - int(round(w * frac[2])), h - int(round(h * frac[3])))
        cw, ch = box[2] - box[0], box[3] - box[1]
        resized = bool(rng.random() < 0.5)
        size = (cw, ch)
        if resized:  # scaled back up to the original's long side
            scale = max(w, h) / max(cw, ch)
            size = (max(1, int(round(cw * scale))), max(1, int(round(ch * scale))))
        label = ",".join(f"{side}{f:.3f}" for side, f in zip("ltrb", frac) if f)
        edit.update(sub="crop", box=box, size=size, resized=resized, quality=int(rng.integers(85, 96)),
                    text=f"crop:{label}" + (";resized" if resized else ""))
    else:
        u = rng.random()
        if src_ext == "jpg":
            sub = "quality" if u < 0.35 else "format" if u < 0.65 else "resize"
        else:
            sub = "format" if u < 0.55 else "resize"
        if sub == "quality":
            q = int(rng.integers(55, 86))  # the artists save at 88..94
            edit.update(sub=sub, quality=q, text=f"jpeg:q{quality}->q{q}")
        elif sub == "format":
            ext = {"jpg": "png", "png": "jpg"}.get(src_ext) or ("png" if rng.random() < 0.3 else "jpg")
            edit.update(sub=sub, ext=ext, quality=int(rng.integers(80, 96)), text=f"{src_ext}->{ext}")
        else:
            long_side = max(w, h)
            if rng.random() < 0.2 and long_side * 1.15 <= max_side:  # an upscaled re-upload
                f = float(rng.uniform(1.15, min(1.5, max_side / long_side)))
            else:
                f = float(rng.uniform(0.5, 0.85))
            size = (max(16, min(max_side, int(round(w * f)))), max(16, min(max_side, int(round(h * f)))))
            edit.update(sub=sub, size=size, quality=int(rng.integers(85, 95)), text=f"resize:{f:.2f}")
    return edit


def _materialise_variant(plan: dict, images: Path, max_side: int) -> tuple[dict, dict]:
    """A planted near-duplicate: the original replayed from its own seed (scene, file bytes, posted tags; nothing
    written), the edit applied, the result encoded and written, and the record built from the variant's own
    generator. Depends on nothing but the plan, like every post, so workers give the same bytes."""
    v = plan["variant"]
    src = v["source"]
    rng_src = np.random.default_rng(src["seed"])
    drawn = _draw_scene(src, rng_src, max_side)
    src_file = _make_file(src, rng_src, drawn.scene, None)
    src_general, characters, copyright_tags, src_meta = _observed_tags(src, rng_src, drawn, src_file, max_side)

    rng = np.random.default_rng(plan["seed"])
    edit = _variant_edit(plan, rng, drawn, src_file.ext, max_side)
    true_general = set(drawn.general)
    general = set(src_general)

    def swap(old: str, new: str, keep_old: bool = False) -> None:
        for tags in (true_general, general):
            if old in tags:
                if not keep_old:
                    tags.discard(old)
                tags.add(new)

    if edit["kind"] == "colour":
        scene = drawn.scene
        if edit["sub"] == "hair":
            old, new = edit["hair"]
            first, *rest = scene.figures
            figures = (dataclasses.replace(first, look=dataclasses.replace(first.look, hair=new)), *rest)
            scene = dataclasses.replace(scene, figures=figures)
            swap(HAIR_COLOUR_TAG[old], HAIR_COLOUR_TAG[new], keep_old=any(f.look.hair == old for f in rest))
            true_general.add("alternate_hair_color")
            if rng.random() < 0.6:
                general.add("alternate_hair_color")
        else:
            scene = dataclasses.replace(scene, palette=edit["palette"])
            if drawn.background in ("colour", "gradient"):
                old, new = edit["tint"]
                swap(f"{old}_background", f"{new}_background")
        img = render_scene(scene)
    else:
        with Image.open(io.BytesIO(src_file.data or b"")) as im:  # the original file as the booru serves it
            img = im.convert("RGB")
        if edit["sub"] == "crop":
            img = img.crop(edit["box"])
        if img.size != tuple(edit["size"]):
            img = img.resize(tuple(edit["size"]), Image.Resampling.LANCZOS)
    ext, (width, height) = edit["ext"], img.size
    data = _encode(img, ext, edit["quality"])
    md5 = hashlib.md5(data).hexdigest()
    (images / f"{md5}.{ext}").write_bytes(data)

    # tags: the original's, by another uploader: a few dropped, a few the original's tagger missed added
    missed = sorted(true_general - general)
    kept = [t for t in sorted(general) if rng.random() >= 0.04]
    kept += [t for t in missed if rng.random() < 0.3]
    meta = [t for t in src_meta if t not in ("highres", "absurdres")]
    if edit["kind"] != "colour" and rng.random() < 0.5:  # a re-upload rarely brings the artist's commentary
        meta = [t for t in meta if not t.startswith("commentary")]
    meta = sorted(set(meta + _size_meta(width, height, max_side)))
    record = _post_record(plan, rng, md5=md5, ext=ext, width=width, height=height, file_size=len(data),
                          duration=None, pixel_hash=hashlib.md5(img.tobytes()).hexdigest(), general=sorted(set(kept)),
                          character=characters, copyright=copyright_tags, artist=[src["artist"].tag], meta=meta,
                          hidden=False)
    series: Series = src["series"]
    truth = {
        "characters": sorted(c.tag for c in src["characters"]),
        "series": [series.tag] if not src["original"] else ["original"],
        "artist": src["artist"].tag, "general": sorted(true_general), "md5": md5, "file_ext": ext,
        "has_file": True, "composition": drawn.composition, "background": drawn.background,
        "rating": plan["rating"], "hidden": False, "year": plan["created"].year,
        "variant_of": src["id"], "variant_kind": edit["kind"], "variant_edit": edit["text"],
        "variant_parent": v["parent"],
    }
    return record, truth


def _link_variants(posts: list[dict], plans: list[dict]) -> None:
    """Colour variants whose uploader linked them: parent_id = the original (which gains children)."""
    for post, plan in zip(posts, plans):
        v = plan.get("variant")
        if v and v["parent"]:
            parent = posts[v["source"]["index"]]
            post["parent_id"] = parent["id"]
            parent["has_children"] = parent["has_visible_children"] = parent["has_active_children"] = True


_WORD = re.compile(r"[^a-z0-9]+")


def build_tags(posts: list[dict]) -> list[dict]:
    """The /tags.json table of the generated posts: real post counts, one category per tag."""
    counts: dict[str, int] = {}
    category: dict[str, int] = {}
    first: dict[str, str] = {}
    last: dict[str, str] = {}
    for p in posts:
        for cat, num in TAG_CATEGORY.items():
            for t in p[f"tag_string_{cat}"].split():
                counts[t] = counts.get(t, 0) + 1
                category[t] = num
                first.setdefault(t, p["created_at"])
                last[t] = p["updated_at"]
    # ids: older, more common tags got lower ids on the real site; mimic by (first use, name)
    names = sorted(counts, key=lambda t: (first[t], t))
    out = []
    for i, name in enumerate(names):
        out.append({
            "id": 1000 + i * 3, "name": name, "post_count": counts[name], "category": category[name],
            "created_at": first[name], "updated_at": max(last[name], first[name]), "is_deprecated": False,
            "words": [w for w in _WORD.split(name) if w],
        })
    out.sort(key=lambda r: -r["id"])  # Danbooru's default tag order: newest first
    return out
