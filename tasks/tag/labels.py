"""The WD tagger label file `selected_tags.csv`: tag_id,name,category,count.

Category 9 = rating (the first four rows: general, sensitive, questionable, explicit), 0 = general,
4 = character. Names keep Danbooru spelling (underscores); the row order is the model's output order.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_contracts.errors import ConfigError
from data_contracts.tag import RATING_NAMES  # the contract's order = the label file's rating rows

RATING, GENERAL, CHARACTER = 9, 0, 4
KNOWN_CATEGORIES = {RATING, GENERAL, CHARACTER}


@dataclass(frozen=True, eq=False)
class Labels:
    names: list[str]
    categories: np.ndarray  # int16 [C]
    counts: np.ndarray  # int64 [C]
    source: str = ""
    index: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def rating_idx(self) -> np.ndarray:
        return np.flatnonzero(self.categories == RATING)

    @property
    def general_idx(self) -> np.ndarray:
        return np.flatnonzero(self.categories == GENERAL)

    @property
    def character_idx(self) -> np.ndarray:
        return np.flatnonzero(self.categories == CHARACTER)

    def check_output_size(self, n_outputs: int, model_where: str) -> None:
        """The CSV must have exactly one row per model output."""
        if n_outputs != len(self):
            raise ConfigError(
                f"{self.source}: the label file has {len(self)} tag rows but the model {model_where} outputs "
                f"{n_outputs} probabilities — use the selected_tags.csv that ships with this model"
            )


def load_labels(path: Path) -> Labels:
    """Parse selected_tags.csv; a malformed file is a ConfigError naming the row and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: label file not found (a tagger folder needs selected_tags.csv)")
    names: list[str] = []
    cats: list[int] = []
    counts: list[int] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"name", "category", "count"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(
                f"{path}: header expected tag_id,name,category,count, found {','.join(reader.fieldnames or [])}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                cat, count = int(row["category"]), int(row["count"])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}:{line}: category and count must be integers ({exc})") from exc
            if cat not in KNOWN_CATEGORIES:
                raise ConfigError(f"{path}:{line}: category expected one of 9, 0, 4, found {cat}")
            names.append(row["name"])
            cats.append(cat)
            counts.append(count)
    if [names[i] for i in range(len(names)) if cats[i] == RATING] != list(RATING_NAMES):
        raise ConfigError(f"{path}: expected the four rating rows {', '.join(RATING_NAMES)} (category 9)")
    return Labels(
        names=names,
        categories=np.asarray(cats, dtype=np.int16),
        counts=np.asarray(counts, dtype=np.int64),
        source=str(path),
        index={n: i for i, n in enumerate(names)},
    )


def prior_logits(labels: Labels) -> np.ndarray:
    """logit(count_i / N), N = the sum of the four rating counts (every post has exactly one rating).

    Used as the tiny tagger's head bias so a random model predicts each tag at its Danbooru frequency:
    a handful of very common general tags pass 0.35 and no character passes 0.85, like a real tagger
    on an average image, instead of thousands of tags at p≈0.5.
    """
    total = float(labels.counts[labels.rating_idx].sum())
    p = np.clip(labels.counts / max(total, 1.0), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)
