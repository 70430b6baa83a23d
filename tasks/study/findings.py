"""The report's paragraph on what the data supports and what it does not, written from the numbers.

Every claim is conditioned on an interval: a difference is stated only when its interval excludes 0, learning only
when an arm's chance-corrected hit rate is above 0 with its interval, forgetting only when the base knew the old
concepts. The limits (scale, base model, samplers, seeds, probe) are always stated.
"""
from __future__ import annotations

from typing import Any

from tasks.study.analysis import Analysis
from tasks.study.context import ReportContext

ARM_NAME = {"flow": "the flow arm", "ddpm": "the ε arm"}


def fmt_num(x: float, digits: int = 2) -> str:
    if x != x:  # NaN
        return "n/a"
    if x in (float("inf"), float("-inf")):
        return "∞" if x > 0 else "−∞"  # steps: a level not reached within the run
    return f"{x:.{digits}f}"


def fmt_iv(iv: dict[str, float], digits: int = 2) -> str:
    """`value [lo, hi]`."""
    return f"{fmt_num(iv['value'], digits)} [{fmt_num(iv['lo'], digits)}, {fmt_num(iv['hi'], digits)}]"


def fmt_steps(iv: dict[str, float]) -> str:
    """Steps to a level: "not reached" for a point estimate beyond the run, ∞ for such a bound."""
    head = "not reached" if iv["value"] == float("inf") else fmt_num(iv["value"], 0)
    return f"{head} [{fmt_num(iv['lo'], 0)}, {fmt_num(iv['hi'], 0)}]"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _weak_probes(ctx_probe: dict[str, tuple[float, float]]) -> list[str]:
    return [k for k, (acc, chance) in ctx_probe.items() if chance < 1.0 and acc < chance + 0.25 * (1 - chance)]


def _above(iv: dict[str, float]) -> bool:
    return iv["lo"] > 0


def _below(iv: dict[str, float]) -> bool:
    return iv["hi"] < 0


def supported(a: Analysis, ctx: ReportContext, probe_accuracy: dict[str, tuple[float, float]]) -> str:
    h: dict[str, Any] = a.headline
    pct = int(round(100 * h["confidence"]))
    out: list[str] = []
    weak = _weak_probes(probe_accuracy)
    if weak:
        out.append(f"The probe barely tells the {' and '.join(k + 's' for k in weak)} apart on their own training "
                   "images, so their hit rates carry little signal.")
    learned = {arm: _above(h["final"][arm]) for arm in a.arms}
    finals = "; ".join(f"{ARM_NAME[arm]} {fmt_iv(h['final'][arm])}" for arm in a.arms)
    if not any(learned.values()):
        out.append(f"Neither arm drew the new concepts above chance by the last checkpoint (chance-corrected hit "
                   f"rate, {pct} % intervals: {finals}): this run shows no learning of the new concepts, so it "
                   "cannot say which objective learns them faster.")
    else:
        who = " and ".join(ARM_NAME[arm] for arm, ok in learned.items() if ok)
        out.append(f"By step {a.steps[-1]}, {who} drew the new concepts above chance (chance-corrected hit rate, 0 = "
                   f"chance, 1 = every image; {pct} % intervals over seeds and images: {finals}).")
        out.append(_speed(a, h))
        area = h["area_diff"]
        if _above(area) or _below(area):
            out.append(f"Over the whole run the flow curve lies {'above' if _above(area) else 'below'} the ε curve "
                       f"(area difference {fmt_iv(area, 3)}).")
        else:
            out.append(f"The areas under the two curves do not differ resolvably ({fmt_iv(area, 3)}).")
    out.append(_forgetting(a, h))
    out.append(_control(h))
    return " ".join(s for s in out if s)


def _speed(a: Analysis, h: dict[str, Any]) -> str:
    if "steps_diff" not in h:
        return ""
    d, reach_iv = h["steps_diff"], h["steps_to_level"]
    level = f"{h['level_fraction']:.0%} of the best mean value ({a.level:.2f} corrected)"
    reach = "; ".join(f"{ARM_NAME[arm]} {fmt_steps(reach_iv[arm])}" for arm in a.arms)
    undecided = h.get("steps_undecided", 0.0)
    note = f"; {undecided:.0%} of the bootstrap replicates had neither arm reach it" if undecided >= 0.01 else ""
    detail = f"(steps to level: {reach}; flow − ε {fmt_iv(d, 0)} steps{note})"
    if _below(d) or _above(d):
        first, second = ("flow", "ddpm") if _below(d) else ("ddpm", "flow")
        if reach_iv[second]["value"] == float("inf"):
            how = (f"{ARM_NAME[first]} reached {level} at step {reach_iv[first]['value']:.0f}; {ARM_NAME[second]} "
                   f"did not within the run's {a.steps[-1]} steps")
        else:
            how = (f"{ARM_NAME[first]} reached {level} {abs(d['value']):.0f} steps before "
                   f"{ARM_NAME[second]}")
        return f"{how[0].upper()}{how[1:]}, and the interval of the difference excludes 0 {detail}."
    return (f"The data do not resolve which objective reaches {level} first: the interval of the difference "
            f"includes 0 {detail}.")


def _forgetting(a: Analysis, h: dict[str, Any]) -> str:
    base = h["base_old"]
    if not _above(base):
        return (f"The base itself did not draw the old concepts above chance ({fmt_iv(base)}), so forgetting "
                "cannot be measured in this run.")
    parts = []
    for arm in a.arms:
        iv = h["forgetting"][arm]
        verdict = "lost part of them" if _below(iv) else "gained on them" if _above(iv) else "kept them (no resolvable change)"
        parts.append(f"{ARM_NAME[arm]} {verdict}: {fmt_iv(iv)}")
    return (f"On the old concepts (the base draws them at {fmt_iv(base)} when sampled as the ε model it is), by the "
            f"last checkpoint {'; '.join(parts)} (change of the corrected hit rate vs the base; the flow arm's "
            "includes relearning the noise-level map its new objective needs).")


def _control(h: dict[str, Any]) -> str:
    parts = []
    for kind, c in h.get("control", {}).items():
        share = c["chance_share"]
        over = [arm for arm in ("flow", "ddpm") if arm in c and c[arm]["lo"] > share]
        if over:
            parts.append(f"{' and '.join(ARM_NAME[a] for a in over)} put more control images (prompts naming no "
                         f"concept) on new {kind}s than chance ({share:.2f}): "
                         + "; ".join(f"{ARM_NAME[a]} {fmt_iv(c[a])}" for a in over))
    return (" ".join(p + "." for p in parts)) if parts else ""


def limits(ctx: ReportContext, a: Analysis) -> str:
    """What the data do not support: always stated."""
    model = ctx.model.rsplit("/", 1)[-1] or ctx.model
    size = f"a {ctx.unet_params:.0f}M-parameter UNet" if ctx.unet_params else "this UNet"
    base = ctx.base_train
    arm = ctx.arm_train
    seeds = len(ctx.seeds)
    samplers = "; ".join(f"{ARM_NAME.get(k, k)}: {v}" for k, v in ctx.samplers.items())
    probe = ctx.eval.get("probe_space", "latent")
    return (f"What it does not show: anything beyond this scale — {size} (`{model}`) at {ctx.resolution}² on "
            f"{ctx.posts.get('new', 0)} posts of {plural(len(ctx.new_characters), 'new character')} and "
            f"{plural(len(ctx.new_artists), 'new artist')}, {a.steps[-1]} steps of batch {arm.get('batch', '?')}; a base that "
            f"is itself ε-trained here for {base.get('steps', '?')} steps from `{model}`, not NAI-v2's; one learning "
            f"rate ({arm.get('lr', '?')}) shared by both arms, which may suit one objective better; these samplers "
            f"and settings only ({samplers}); {seeds} training seed{'s' if seeds != 1 else ''}, so the seed-to-seed "
            f"spread is known only roughly; and a nearest-centroid probe in {probe} space among the evaluated "
            "concepts, which measures whether images look more like one concept's training images than the "
            "others', not how good they are.")
