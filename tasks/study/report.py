"""The study's report: one markdown page (setup, what the data support, headline table, curves, per-concept and
per-seed tables, samples side by side, how to run it) over the plots in the study folder; also the page
docs/flow_vs_ddpm.md shows before any run was recorded. Numbers come from analysis.Analysis, words about them from
findings.py."""
from __future__ import annotations

from typing import Any

from tasks.study.analysis import Analysis
from tasks.study.context import SD15_512_SAMPLES_PER_S, SD15_512_SOURCE, ReportContext
from tasks.study.findings import fmt_iv, fmt_steps, limits, supported

TITLE = "# Does flow matching learn new concepts faster than ε-prediction?"
ARM_LABEL = {"flow": "flow", "ddpm": "ε (ddpm)"}
RUN_COMMAND = ".venv/bin/fm study -c ab-study --write-doc"
MODULE_COMMAND = ".venv/bin/python -m flows.study -c ab-study --write-doc"
BARE_COMMAND = "python -m tasks.study -c ab-study --write-doc"  # no Prefect: a bare GPU box


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows]]


def _names(tags: list[str]) -> str:
    return ", ".join(f"`{t}`" for t in tags) or "none"


def _count(posts: int | None) -> str:
    return f" — {posts} posts" if posts is not None else ""


def setup_lines(ctx: ReportContext, a: Analysis | None = None) -> list[str]:
    b, t, e = ctx.base_train, ctx.arm_train, ctx.eval
    params = f", UNet {ctx.unet_params:.0f}M parameters" if ctx.unet_params else ""
    params += f", text encoder {ctx.text_params:.0f}M" if ctx.text_params else ""
    lines = [
        f"- **model**: `{ctx.model}`{params}; {ctx.resolution}² buckets",
        f"- **old concepts** (the base): every post with none of the new tags{_count(ctx.posts.get('base'))}; "
        f"the base trains ε (DDPM) for {b.get('steps', '?')} steps, batch {b.get('batch', '?')}, LR {b.get('lr', '?')}, "
        f"{b.get('optimizer', '?')}",
        f"- **new concepts** (both arms): characters {_names(ctx.new_characters)}, artists {_names(ctx.new_artists)} — "
        f"the posts whose characters are all new ones{_count(ctx.posts.get('new'))}",
        "- **arms**: from the base's export, the same data, "
        + (f"{t['steps']} steps ({t.get('epochs', '?')} epochs)" if t.get("steps") else f"{t.get('epochs', '?')} epochs")
        + f", batch {t.get('batch', '?')} × {t.get('grad_accum', 1)}, LR {t.get('lr', '?')}, "
        f"{t.get('optimizer', '?')}, training seeds {ctx.seeds}; flow: rectified flow, train shift "
        f"{t.get('shift', '?')}, {t.get('timestep_sampling', '?')} σ; ε: SD1.5's DDPM schedule",
        f"- **eval**: every checkpoint ({len(a.steps) if a else '≥ 7'} per arm, step 0 = the base) × every "
        f"character/artist with ≥ {e.get('min_samples', '?')} posts + {e.get('controls', '?')} control prompts, "
        f"{e.get('images_per_concept', '?')} images each per training seed ({e.get('width', '?')}×"
        f"{e.get('height', '?')}, {e.get('steps', '?')} steps, CFG {e.get('cfg', '?')}); hit = a nearest-centroid "
        f"probe in **{e.get('probe_space', '?')}** space puts the image on its own concept",
    ]
    for arm, text in ctx.samplers.items():
        lines.append(f"- **sampler, {ARM_LABEL.get(arm, arm)} arm**: {text}")
    return lines


def headline_rows(a: Analysis) -> list[list[str]]:
    h = a.headline
    rows = [
        ["new concepts, corrected hit rate at the last step", *(fmt_iv(h["final"][arm]) for arm in a.arms),
         fmt_iv(h["final_diff"])],
        ["new concepts, area under the curve (mean over the run)", *(fmt_iv(h["area"][arm], 3) for arm in a.arms),
         fmt_iv(h["area_diff"], 3)],
    ]
    if "steps_diff" in h:
        rows.append([f"steps to {h['level_fraction']:.0%} of the best ({a.level:.2f} corrected)",
                     *(fmt_steps(h["steps_to_level"][arm]) for arm in a.arms), fmt_iv(h["steps_diff"], 0)])
    rows.append(["old concepts, change vs the base (corrected)", *(fmt_iv(h["forgetting"][arm]) for arm in a.arms),
                 "–"])
    for kind, c in h.get("control", {}).items():
        rows.append([f"control images on a new {kind} (chance share {c['chance_share']:.2f})",
                     *(fmt_iv(c[arm]) for arm in a.arms), "–"])
    return rows


def concept_rows(a: Analysis, ctx: ReportContext) -> list[list[str]]:
    rows = []
    order = sorted(a.concepts, key=lambda r: (r["group"] != "new", r["kind"], r["concept"]))
    for r in order:
        posts = ctx.concept_posts.get(r["concept"], {})
        rows.append([f"`{r['concept']}`", r["kind"], r["group"], f"{posts.get('base', 0)} / {posts.get('new', 0)}",
                     f"{r['chance']:.2f}" if r["chance"] is not None else "–", fmt_iv(r["base"]),
                     *(fmt_iv(r[arm]) for arm in a.arms), fmt_iv(r["diff"]),
                     *(fmt_iv(r[f"{arm}_change"]) for arm in a.arms)])
    return rows


def seed_rows(a: Analysis) -> list[list[str]]:
    return [[str(r["seed"]), ARM_LABEL.get(r["arm"], r["arm"]), f"{r['final']:.2f}" if r["final"] is not None else "–",
             f"{r['area']:.3f}" if r["area"] is not None else "–",
             f"{r['steps_to_level']:.0f}" if r["reached"] else "not reached"] for r in a.per_seed]


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def cost_lines(ctx: ReportContext, a: Analysis | None = None) -> list[str]:
    """What the recorded run took, and what the same number of samples costs on SD1.5 at 512²."""
    # A ```text block, not ```bash: tests/docs runs every bash block of docs/ verbatim on the demo.
    lines = ["## Running it", "",
             "One command runs everything (stages are fingerprinted and cached: run it again after an interruption and "
             "it goes on where it stopped), prints where the study folder is and writes this page:", "", "```text",
             RUN_COMMAND + f"     # the same as {MODULE_COMMAND}",
             BARE_COMMAND + "        # the same study without Prefect (the same outputs)",
             "# the same experiment on a real SD1.5 / NAI-v2 checkpoint (a pretrained UNet wants a lower LR):",
             "fm study -c ab-study -o train.model=/models/nai-v2.safetensors -o cache.model=/models/nai-v2.safetensors \\",
             "    -o train.lr=2e-5 --write-doc",
             "# ... and at the seed's resolution: add -o bucket.resolution=512 -o eval.width=512 -o eval.height=512",
             "```", ""]
    cost = ctx.arm_cost()
    if cost and a is not None:
        runs = 2 * len(ctx.seeds)
        sd15 = cost["samples"] / SD15_512_SAMPLES_PER_S
        lines += [f"Measured here ({ctx.device or 'this machine'}): one arm trained {cost['samples']:.0f} samples in "
                  f"{duration(cost['wall_s'])} ({cost['samples_per_s']:.0f} samples/s); {runs} arm runs. The same "
                  f"samples through the full SD1.5 UNet at 512² take ≈ {duration(sd15)} an arm at "
                  f"{SD15_512_SAMPLES_PER_S} samples/s ({SD15_512_SOURCE}), ≈ {runs * sd15 / 3600:.1f} GPU-hours for "
                  f"the {runs} arm runs, plus the base and the evals.", ""]
    return lines


def study_markdown(a: Analysis, ctx: ReportContext, probe_accuracy: dict[str, tuple[float, float]],
                   images: dict[str, str], prefix: str = "") -> str:
    """The report page; image paths are `prefix` + the study folder's relative paths."""
    lines = [TITLE, "",
             f"_Written by the study from the recorded run of `{ctx.config_name}` (study output `{ctx.fingerprint}`; "
             f"evals {', '.join(f'seed {k}: `{v}`' for k, v in ctx.evals.items())})._", "",
             "## What the data support", "", supported(a, ctx, probe_accuracy), "", limits(ctx, a), "",
             "## Setup", "", *setup_lines(ctx, a), "",
             f"## Headline ({int(round(100 * a.headline['confidence']))} % bootstrap intervals over training seeds "
             "and images)", "",
             "Corrected hit rate = (hit rate − chance) / (1 − chance), averaged over the concepts of the group: 0 = "
             "chance, 1 = every image drawn as its concept.", "",
             *_table(["", *(ARM_LABEL.get(x, x) for x in a.arms), "flow − ε"], headline_rows(a)), ""]
    if "curves" in images:
        lines += ["## Learning curves", "",
                  "Step 0 is the base, sampled as each arm samples: through the flow sampler for the flow arm (an ε "
                  "model read as a flow model), as the ε model it is for the ε arm. Bands: the intervals above; every "
                  "(arm, step, concept) point with its interval is in `points.csv` of the study folder.", "",
                  f"![learning curves]({prefix}{images['curves']})", ""]
    if "differences" in images:
        lines += [f"![flow − ε, forgetting, control]({prefix}{images['differences']})", ""]
    lines += ["## Per concept (last step; change = last step − the base sampled as ε)", "",
              *_table(["concept", "kind", "group", "posts base / new", "chance", "base (ε)",
                       *(f"{ARM_LABEL.get(x, x)} last" for x in a.arms), "flow − ε",
                       *(f"{ARM_LABEL.get(x, x)} change" for x in a.arms)], concept_rows(a, ctx)), "",
              "## Per training seed (new concepts, corrected)", "",
              *_table(["seed", "arm", "last", "area", "steps to level"], seed_rows(a)), ""]
    if "samples" in images:
        lines += ["## Samples side by side at matched steps", "", f"![samples]({prefix}{images['samples']})", ""]
    lines += cost_lines(ctx, a)
    return "\n".join(lines) + "\n"


def placeholder_markdown(ctx: ReportContext) -> str:
    """The page before a run is recorded: what will be measured and the command that records it."""
    lines = [TITLE, "", "_No run has been recorded yet._ This page is written by the study (tasks/study/) from its "
             "recorded run; until then it says what the run measures and how to make it.", "",
             "## What the run measures", "",
             "A shared base is ε-trained on the mini-booru's \"old\" concepts; two arms start from its export and learn "
             "\"new\" characters and artists held out of the base — the flow arm switching objective, the ε arm "
             "continuing — on the same data, steps, batch, optimiser and training seeds. Every arm exports evenly "
             "spaced checkpoints; eval draws each new and old concept and the control prompts at every checkpoint, "
             "each arm with the sampler of its objective. The report gives per-concept hit rates with bootstrap "
             "intervals over training seeds and images, the control images' false-positive share, steps to a "
             "hit-rate level per arm and seed, the flow − ε difference with its interval, the old concepts' change "
             "vs the base, samples side by side at matched steps, and a paragraph on what the numbers support.", "",
             "## Setup (the `ab-study` preset)", "", *setup_lines(ctx), "", *cost_lines(ctx)]
    return "\n".join(lines) + "\n"


def table_rows(a: Analysis, ctx: ReportContext) -> list[dict[str, Any]]:
    """The per-concept table as plain rows (the Prefect table artifact)."""
    out = []
    for r in a.concepts:
        posts = ctx.concept_posts.get(r["concept"], {})
        row: dict[str, Any] = {"concept": r["concept"], "kind": r["kind"], "group": r["group"],
                               "posts_base": posts.get("base", 0), "posts_new": posts.get("new", 0),
                               "chance": r["chance"], "base": fmt_iv(r["base"])}
        for arm in a.arms:
            row[f"{arm}_last"] = fmt_iv(r[arm])
            row[f"{arm}_change"] = fmt_iv(r[f"{arm}_change"])
        row["flow_minus_eps"] = fmt_iv(r["diff"])
        out.append(row)
    return out
