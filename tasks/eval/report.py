"""Eval tables, the learning-curve plot and the summary text."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_contracts.eval import EvalCheckpoint


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def summary_rows(rows: list[dict[str, Any]], checkpoints: Sequence[EvalCheckpoint]) -> list[dict[str, Any]]:
    """One row per checkpoint: mean hit rate / lift / tag hit per kind (control rows excluded)."""
    out = []
    for ck in checkpoints:
        mine = [r for r in rows if r["checkpoint"] == ck.id]
        row: dict[str, Any] = {"checkpoint": ck.id, "label": ck.label, "objective": ck.objective, "step": ck.step}
        for kind in ("character", "artist"):
            rk = [r for r in mine if r["kind"] == kind]
            if not rk:
                continue
            row[f"{kind}_probe_hit_rate"] = _mean([r["probe_hit_rate"] for r in rk])
            row[f"{kind}_lift"] = _mean([r["lift"] for r in rk])
            row[f"{kind}_chance"] = _mean([r["probe_chance"] for r in rk])
            row[f"{kind}_tag_hit_rate"] = _mean([r["tag_hit_rate"] for r in rk])
        control = [r for r in mine if r["kind"] == "control"]
        row["control_tag_false_positive"] = _mean([r["tag_hit_rate"] for r in control])
        out.append(row)
    return out


def phase_rows(rows: list[dict[str, Any]], checkpoints: Sequence[EvalCheckpoint], phases: dict[str, str]
               ) -> list[dict[str, Any]]:
    """A run in phases: per concept, the probe hit rate of each phase's final checkpoint and the change from the
    first phase to the last (negative: the later phase forgot some of it). [] with fewer than two phases."""
    finals: dict[str, EvalCheckpoint] = {}
    for ck in checkpoints:
        name = phases.get(ck.run)
        if name is not None and (name not in finals or ck.step >= finals[name].step):
            finals[name] = ck
    if len(finals) < 2:
        return []
    order = [name for name in dict.fromkeys(phases.values()) if name in finals]
    by = {(r["checkpoint"], r["concept"]): r for r in rows if r["kind"] in ("character", "artist")}
    out = []
    for concept, kind in dict.fromkeys((r["concept"], r["kind"]) for r in rows if r["kind"] in ("character", "artist")):
        row: dict[str, Any] = {"concept": concept, "kind": kind}
        for name in order:
            hit = by.get((finals[name].id, concept))
            row[name] = None if hit is None else hit["probe_hit_rate"]
        first, last = row[order[0]], row[order[-1]]
        row["change"] = None if first is None or last is None else round(last - first, 4)
        out.append(row)
    return out


def phase_markdown(rows: list[dict[str, Any]]) -> str:
    """One line on what the later phase kept of the earlier one's concepts."""
    changes = [r["change"] for r in rows if r["change"] is not None]
    if not changes:
        return ""
    names = [k for k in rows[0] if k not in ("concept", "kind", "change")]
    worst = min(rows, key=lambda r: r["change"] if r["change"] is not None else 0.0)
    return (f"\n- phases {' -> '.join(names)}: probe hit rate change per concept, mean {np.mean(changes):+.3f}, "
            f"largest drop {worst['change']:+.3f} ({worst['concept']}); table `phases`\n")


def learning_curve_plot(rows: list[dict[str, Any]], checkpoints: Sequence[EvalCheckpoint], path: Path) -> bool:
    """Mean probe hit rate (and tag hit rate where known) against training step, one line per objective.

    Base-model points (step 0) join the line of the objective they were sampled with; extra checkpoints
    with an unknown step (-1) are left out of the plot (they are in the table).
    """
    from tasks.common.visuals import new_figure

    summary = summary_rows(rows, checkpoints)
    kinds = [k for k in ("character", "artist") if any(f"{k}_probe_hit_rate" in s for s in summary)]
    if not kinds:
        return False
    has_tag = any(s.get(f"{k}_tag_hit_rate") is not None for s in summary for k in kinds)
    fig = new_figure(11 if has_tag else 6.5, 4.2)  # object API: no pyplot state shared between threads
    axes = fig.subplots(1, 2 if has_tag else 1, squeeze=False)
    styles = {"character": "-", "artist": "--"}
    for ax_i, (metric, title) in enumerate([("probe_hit_rate", "probe hit rate (nearest centroid)"),
                                            ("tag_hit_rate", "tagger hit rate (own tag > threshold)")][:1 + has_tag]):
        ax = axes[0][ax_i]
        for objective in dict.fromkeys(s["objective"] for s in summary):
            for kind in kinds:
                key = f"{kind}_{metric}"
                pts = sorted((s["step"], s[key]) for s in summary
                             if s["objective"] == objective and s["step"] >= 0 and s.get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[kind], marker="o",
                            label=f"{objective}: {kind}s")
        if metric == "probe_hit_rate":
            for kind in kinds:
                chance = next((s[f"{kind}_chance"] for s in summary if s.get(f"{kind}_chance") is not None), None)
                if chance is not None:
                    ax.axhline(chance, color="grey", linestyle=styles[kind], linewidth=0.8,
                               label=f"chance ({kind}s)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_ylabel("share of images")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.9)  # "best": where it hides the fewest points
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return True


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def probe_quality(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """kind -> (leave-one-out accuracy of the probe on the training images, chance), from the first checkpoint."""
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["kind"] in ("character", "artist") and r["kind"] not in out and r["probe_ref_accuracy"] is not None:
            out[r["kind"]] = (float(r["probe_ref_accuracy"]), float(r["probe_chance"]))
    return out


def summary_markdown(summary: list[dict[str, Any]], cfg, concepts, tag_idx: dict[str, int], dropped: list[str],
                     tagger_name: str, quality: dict[str, tuple[float, float]] | None = None) -> str:
    kinds = list(dict.fromkeys(c.kind for c in concepts))
    n_chars = sum(1 for c in concepts if c.kind == "character")
    lines = [
        f"### eval: {len(summary)} checkpoint(s) x {len(concepts)} concept(s) "
        f"({', '.join(f'{sum(1 for c in concepts if c.kind == k)} {k}s' for k in kinds)}) + "
        f"{len(cfg.control_prompts)} control prompt(s)",
        f"- {cfg.images_per_concept} images each: {cfg.sampler}, {cfg.steps} steps, CFG {cfg.cfg_scale:g}, "
        f"{cfg.width}x{cfg.height}, seeds {cfg.seed}..{cfg.seed + cfg.images_per_concept - 1} for every checkpoint",
        f"- probe: nearest centroid over **{cfg.probe_space}** embeddings of up to {cfg.reference_images} training "
        "images per concept; hit = the image is closest to its own concept; lift = hit rate minus the share of "
        "control images (prompts naming no concept) that land on the concept",
        f"- tagger `{tagger_name}`: {len(tag_idx)}/{n_chars} evaluated characters are among its labels"
        + ("" if tag_idx else " (no tag hit rates: fictional or unlabelled characters; WD has no artist tags)"),
    ]
    if cfg.probe_space == "latent":
        lines.append("- latent space: generated latents vs the training images encoded by each checkpoint's VAE "
                     "(use it when the VAE or tagger is a random stand-in, as in the demo)")
    for kind, (acc, chance) in (quality or {}).items():
        if chance >= 1.0:
            lines.append(f"- only one {kind} qualifies: its probe hit rate is 1 by construction (see lift)")
            continue
        weak = acc < chance + 0.25 * (1 - chance)
        lines.append(f"- probe accuracy on the {kind}s' own training images (leave-one-out): {acc:.2f}, chance "
                     f"{chance:.2f}" + (f" — **too close to chance: the {kind} hit rates carry little signal**"
                                        if weak else ""))
    if dropped:
        lines.append(f"- dropped (no readable reference image): {', '.join(dropped)}")
    head = ["checkpoint", "step"]
    for k in kinds:
        head += [f"{k} hit", f"{k} lift", f"{k} chance"]
    head.append("tag hit (chars)")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["label"], str(s["step"])]
        for k in kinds:
            cells += [_fmt(s.get(f"{k}_probe_hit_rate")), _fmt(s.get(f"{k}_lift")), _fmt(s.get(f"{k}_chance"))]
        cells.append(_fmt(s.get("character_tag_hit_rate")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
