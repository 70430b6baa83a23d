"""Merge tagger predictions into a post's Danbooru tags, keeping provenance.

- general   = Danbooru general (order kept) ∪ tagger general with prob > cut (by prob), minus blacklist;
- character = Danbooru characters (kept) ∪ tagger characters with prob > character cut when
              add_characters, minus blacklist;
- added     = what the tagger contributed, with its probability;
- disputed  = Danbooru general/character tags the tagger knows and scored below disagree_below (they stay
              in the final tags: this is an audit trail, not a filter);
- ratings   = the four rating probabilities, never thresholded, plus their argmax.
Cuts are strict (prob > threshold) as in the WD reference. MCut mode cuts each image's category at the
midpoint of the largest gap of its sorted probabilities (the character cut floored at
character_mcut_floor). Tags keep Danbooru spelling (underscores); rendering is tasks/captions.py's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tasks.tag.labels import CHARACTER, GENERAL, RATING_NAMES, Labels


@dataclass(frozen=True)
class MergeRules:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    mode: str = "threshold"  # threshold | mcut
    character_mcut_floor: float = 0.15
    blacklist: frozenset[str] = frozenset()
    add_characters: bool = True
    disagree_below: float = 0.05

    @classmethod
    def from_config(cls, cfg: Any) -> "MergeRules":
        return cls(
            general_threshold=cfg.general_threshold,
            character_threshold=cfg.character_threshold,
            mode=cfg.mode,
            character_mcut_floor=cfg.character_mcut_floor,
            blacklist=frozenset(cfg.blacklist),
            add_characters=cfg.add_characters,
            disagree_below=cfg.disagree_below,
        )


def mcut_threshold(probs: np.ndarray) -> float:
    """Midpoint of the largest gap between consecutive sorted probabilities (MCut)."""
    if len(probs) < 2:
        return 0.0 if len(probs) == 0 else float(probs[0]) / 2
    desc = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    gap = int(np.argmax(desc[:-1] - desc[1:]))
    return float((desc[gap] + desc[gap + 1]) / 2)


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """Category rows are contiguous blocks in the WD label files: a slice indexes without copying."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


class Merger:
    """Precomputed label indices; `merge` turns one image's probabilities + Danbooru tags into a row."""

    def __init__(self, labels: Labels, rules: MergeRules) -> None:
        self.labels = labels
        self.rules = rules
        self.names = np.asarray(labels.names, dtype=object)
        self.general_idx = _as_slice(labels.general_idx)
        self.character_idx = _as_slice(labels.character_idx)
        self.rating_idx = _as_slice(labels.rating_idx)
        # Danbooru tags the tagger can judge: its general and character rows only (never the ratings).
        self.judged = {n: i for n, i in labels.index.items() if labels.categories[i] in (GENERAL, CHARACTER)}

    def cuts(self, probs: np.ndarray) -> tuple[float, float]:
        r = self.rules
        if r.mode == "mcut":
            return (mcut_threshold(probs[self.general_idx]),
                    max(r.character_mcut_floor, mcut_threshold(probs[self.character_idx])))
        return r.general_threshold, r.character_threshold

    def _picked(self, probs: np.ndarray, idx: slice | np.ndarray, cut: float) -> list[tuple[str, float]]:
        p = probs[idx]
        keep = np.flatnonzero(p > cut)  # strictly greater, as the reference
        keep = keep[np.argsort(-p[keep], kind="stable")]
        names = self.names[idx][keep]
        return list(zip(names.tolist(), p[keep].tolist()))

    def merge(self, probs: np.ndarray, danbooru_general: Sequence[str] | None,
              danbooru_character: Sequence[str] | None) -> dict[str, Any]:
        black = self.rules.blacklist
        general = [t for t in dict.fromkeys(danbooru_general or []) if t not in black]
        character = [t for t in dict.fromkeys(danbooru_character or []) if t not in black]
        have_g, have_c = set(general), set(character)
        cut_g, cut_c = self.cuts(probs)
        added: list[dict[str, Any]] = []
        for tag, p in self._picked(probs, self.general_idx, cut_g):
            if tag not in have_g and tag not in black:
                general.append(tag)
                added.append({"tag": tag, "prob": p})
        if self.rules.add_characters:
            for tag, p in self._picked(probs, self.character_idx, cut_c):
                if tag not in have_c and tag not in black:
                    character.append(tag)
                    added.append({"tag": tag, "prob": p})
        disputed = []
        for tag in list(have_g) + list(have_c):
            i = self.judged.get(tag)
            if i is not None and probs[i] < self.rules.disagree_below:
                disputed.append({"tag": tag, "prob": float(probs[i])})
        disputed.sort(key=lambda d: (d["prob"], d["tag"]))
        ratings = probs[self.rating_idx].astype(np.float32)
        return {
            "general": general,
            "character": character,
            "added": added,
            "disputed": disputed,
            "rating_probs": [float(v) for v in ratings],
            "rating": RATING_NAMES[int(np.argmax(ratings))],
        }
