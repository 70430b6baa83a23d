"""The `fm` command line: run stages in-process, inspect outputs, serve deployments, start a local stack."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_contracts.errors import BooruflowError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="demo", help="preset name (demo, nai-v2-fm) or YAML path")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. -o train.lr=1e-5 (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    # Validate before anything starts: a typo must not cost a Prefect server's start-up.
    from pipeline_config.load import load_config
    from tasks.registry import select_stages

    load_config(args.config, args.override)
    select_stages(args.stages or None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["BOORUFLOW_CLI_PROGRESS"] = "1"  # rich progress bars for in-process runs on a terminal
    from flows.fm import fm

    results = fm(config=args.config, stages=args.stages or None, overrides=args.override, force=args.force,
                 ab=args.ab)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="booruflow outputs")
    for col in ("stage", "state", "fingerprint", "rows", "output"):
        table.add_column(col)
    for r in results:
        rows = ", ".join(f"{k}={v}" for k, v in r["row_counts"].items())
        name = f"{r['stage']} ({r['objective']})" if "objective" in r else r["stage"]
        table.add_row(name, "cached" if r["cached"] else "built", r["fingerprint"], rows, r["output"])
    console = Console()
    console.print(table)
    for r in results:  # full paths (the table may truncate them)
        console.print(f"{r['stage']:>8}: {r['output']}/manifest.json", soft_wrap=True)
    train = next((r for r in results if r["stage"] == "train"), None)
    if train:
        console.print(f"checkpoint: {train['output']}/model.safetensors (diffusers: {train['output']}/diffusers)",
                      soft_wrap=True)
        console.print(f"samples:    {train['output']}/samples/", soft_wrap=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_contracts.registry import manifest_class
    from data_contracts.store import ArtifactStore
    from data_contracts.verify import verify_output
    from pipeline_config.load import load_config
    from tasks.registry import check_stage

    stage = check_stage(args.stage)
    cfg = load_config(args.config, args.override)
    store = ArtifactStore.for_config(cfg)
    manifest = store.read_manifest(manifest_class(stage), args.fingerprint)
    result = verify_output(store, manifest, checksums=not args.quick)
    print(f"{stage} {manifest.fingerprint}: {store.output_url(stage, manifest.fingerprint)}")
    print("rows: " + (", ".join(f"{k}={v}" for k, v in manifest.row_counts.items()) or "-")
          + f"; {len(manifest.files)} files, {sum(f.size for f in manifest.files) / 2**20:.1f} MiB; "
          f"created {manifest.created_at}")
    if args.json:
        print(manifest.to_json())
    what = "size" if args.quick else "size + sha256"
    if result.ok:
        print(f"OK: {result.files} files verified ({what}), row counts match their tables", file=sys.stderr)
        return 0
    for problem in result.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(result.problems)} problem(s): rerun `fm run {stage} --force` to rebuild this output",
          file=sys.stderr)
    return 1


def start_file_server(config: str):
    """Serve the config's data root read-only on loopback; flow runs learn the URL from the environment."""
    from flows.fileserver import FileServer
    from pipeline_config.load import load_config

    cfg = load_config(config)
    fs_cfg = cfg.runtime.file_server
    server = FileServer(cfg.data_root, fs_cfg.host, fs_cfg.port).start()
    os.environ["BOORUFLOW_FILES_URL"] = server.url
    os.environ["BOORUFLOW_FILES_ROOT"] = str(Path(cfg.data_root).resolve())
    print(f"serving {cfg.data_root} read-only at {server.url}")
    return server


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve_all

    if args.files:
        start_file_server(args.config)
    serve_all(args.config, limit=args.limit, gpu_slots=args.gpu_slots)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from flows.deploy import DEFAULT_API_URL, serve_all, start_local_server

    api_url = os.environ.get("PREFECT_API_URL") or DEFAULT_API_URL
    proc = start_local_server(api_url, Path(".data/prefect-server.log"))
    os.environ["PREFECT_API_URL"] = api_url
    if proc is not None:
        print(f"started a local Prefect server at {api_url} (pid {proc.pid}, log .data/prefect-server.log)")
    if args.files:
        start_file_server(args.config)
    print(f"UI: {api_url.removesuffix('/api')}  —  in another shell: "
          f"PREFECT_API_URL={api_url} prefect deployment run fm/full --watch")
    serve_all(args.config, limit=args.limit, gpu_slots=args.gpu_slots)
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    import time

    from flows.fileserver import FileServer

    server = FileServer(args.root, args.host, args.port).start()
    print(f"serving {args.root} read-only at {server.url} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from data_contracts.registry import manifest_class
    from data_contracts.store import ArtifactStore
    from pipeline_config.load import load_config
    from tasks.sample.main import sample_main

    checkpoint = args.checkpoint
    cache_dir = args.cache_dir
    if checkpoint == "current":  # the current train output of the config
        cfg = load_config(args.config, args.override)
        store = ArtifactStore.for_config(cfg)
        manifest = store.read_manifest(manifest_class("train"))
        checkpoint = str(store.path(manifest, manifest.checkpoint))
        cache_dir = cache_dir or cfg.runtime.cache_dir
    with Progress(transient=True) as bar:
        task = bar.add_task("sampling", total=None)
        paths = sample_main(
            checkpoint, args.prompt, args.negative, out_dir=args.out, steps=args.steps, cfg=args.cfg,
            shift=args.shift, sampler=args.sampler, schedule=args.schedule, seed=args.seed, width=args.width,
            height=args.height, batch_size=args.batch_size, images_per_prompt=args.images_per_prompt,
            clip_skip=args.clip_skip, cache_dir=cache_dir or ".data/cache", device=args.device,
            base_model=args.base_model, progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    for path in paths:
        print(path)
    return 0


def cmd_train_node(args: argparse.Namespace) -> int:
    """One more machine of a multi-node training run: the same worker, this machine's accelerate config."""
    from tasks.train.launch import launch_accelerate

    run_file = Path(args.run_file)
    if not run_file.is_file():
        raise BooruflowError(f"{run_file} does not exist: give the run.json path the train stage logged "
                             "(its work folder must be on storage every machine reads)")
    launch_accelerate(run_file, 0, config_file=args.accelerate_config, on_line=print, on_event=lambda e: None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm", description="booruflow: Danbooru -> flow-matching SD1.5")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run stages in-process (default: all, in DAG order)")
    p.add_argument("stages", nargs="*", help="stage names; none = the whole pipeline")
    p.add_argument("--force", action="store_true", help="rebuild the selected stages even if cached")
    p.add_argument("--ab", action="store_true",
                   help="train with the flow and the DDPM objective (same data and steps), evaluate both")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="print and verify the current manifest of a stage")
    p.add_argument("stage")
    p.add_argument("--fingerprint", default=None, help="a specific output instead of the current one")
    p.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=True,
                   help="print the manifest JSON after the summary (default: on)")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    for name, func, text in (("serve", cmd_serve, "serve fm/full and fm/<stage> against PREFECT_API_URL"),
                             ("up", cmd_up, "start a local Prefect server if none answers, then serve")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", default="demo", help="default config of the deployments")
        p.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
        p.add_argument("--gpu-slots", type=int, default=1,
                       help="GPU stages (tag, cache, train, eval) that may run at once on this host")
        p.add_argument("--files", action=argparse.BooleanOptionalAction, default=name == "up",
                       help="serve the data root read-only over HTTP for image artifacts (default: on for up)")
        p.set_defaults(func=func)
    p = sub.add_parser("sample", help="generate images from a checkpoint the pipeline made")
    p.add_argument("checkpoint", help="single-file .safetensors, diffusers folder, training-step folder, "
                                      "or 'current' (the current train output of -c/--config)")
    p.add_argument("prompt", nargs="+", help="one or more prompts (A1111 weighting syntax)")
    p.add_argument("--negative", default="", help="negative prompt (one for all)")
    p.add_argument("--out", default="samples", help="output folder (PNGs with A1111 parameters + grid.png)")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--shift", type=float, default=None, help="default: the checkpoint's recommended shift, else 3")
    p.add_argument("--sampler", default="euler", choices=["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde"])
    p.add_argument("--schedule", default="diffusers", choices=["diffusers", "simple"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-model", default=None, help="base checkpoint for a training-step folder")
    p.add_argument("--cache-dir", default=None)
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train-node", help="join a multi-node training run from another machine")
    p.add_argument("run_file", help="the run.json the train stage logged (on shared storage)")
    p.add_argument("--accelerate-config", required=True,
                   help="this machine's accelerate config (same cluster, its own machine_rank)")
    p.set_defaults(func=cmd_train_node)

    p = sub.add_parser("files", help="serve a data root read-only over HTTP (for image artifacts)")
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4210)
    p.set_defaults(func=cmd_files)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BooruflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
