"""The `fm` command line: run stages in-process, inspect outputs, serve deployments, start a local stack."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import textwrap
import threading
from pathlib import Path
from urllib.parse import urlparse

from data_contracts.errors import BooruflowError
from tasks.common.sizes import human_size


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (flags as on/off); help that already names its default is left alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text.lower() or "%(default)" in text or action.default in (None, [], argparse.SUPPRESS):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        if isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="demo", help="preset name (demo, nai-v2-fm, gpu-check) or YAML path")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. -o train.lr=1e-5 (repeatable; default: none)")


def _print_findings(findings, file=sys.stdout) -> None:
    from flows.preflight import format_finding

    for finding in findings:
        print(format_finding(finding), file=file)


def quiet_third_party_output() -> None:
    """No tqdm bars from library loaders in run logs (the stages report their own progress); inherited by
    the flow-run processes of `fm up` / `fm serve`. Export TQDM_DISABLE=0 to see them again."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's env default for `disable` (diffusers' shard/step bars)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars


def prefect_defaults() -> None:
    """Defaults for the Prefect that `fm` starts or talks to; an exported value wins.

    A run without PREFECT_API_URL starts a temporary server whose first start creates and migrates a new
    database: Prefect waits 20 s for it, which a loaded 2-core machine does not always meet (the run then
    fails before any stage starts). 120 s costs nothing when the server is quick."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run_preflight(cfg, stages: list[str]) -> bool:
    """`fm check`'s checks before a run starts anything; False (after printing why) on an error.

    Only problems are printed. The Danbooru probe gets 3 s, and its failure is a warning here: a run whose
    ingest output is already complete never crawls.
    """
    from flows.preflight import has_errors, preflight

    findings = [f._replace(level="warn") if f.check == "danbooru" and f.level == "error" else f
                for f in preflight(cfg, stages, timeout_s=3.0)]
    problems = [f for f in findings if f.level != "ok"]
    _print_findings(problems, file=sys.stderr)
    if has_errors(findings):
        print(f"error: preflight found {sum(f.level == 'error' for f in findings)} problem(s) (the ✗ lines); "
              "fix them, see all checks with `fm check`, or skip with --no-preflight", file=sys.stderr)
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    # Validate before anything starts: a typo must not cost a Prefect server's start-up.
    from flows.fm import run_overrides
    from pipeline_config.load import load_config
    from tasks.registry import select_stages

    cfg = load_config(args.config, run_overrides(args.override, args.update))
    stages = select_stages(args.stages or None)
    if args.update and "ingest" not in stages:
        raise BooruflowError("--update refreshes the ingest stage: run it with ingest among the stages "
                             "(`fm run ingest --update`, or `fm run --update` for the whole pipeline)")
    if not args.no_preflight and not run_preflight(cfg, stages):
        return 2
    quiet_third_party_output()
    os.environ["BOORUFLOW_CLI_PROGRESS"] = "1"  # rich progress bars for in-process runs on a terminal
    from flows.fm import fm

    results = fm(config=args.config, stages=args.stages or None, overrides=args.override, force=args.force,
                 ab=args.ab, phase=args.phase, update=args.update)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="booruflow outputs")
    for col in ("stage", "state", "fingerprint", "rows", "output"):
        table.add_column(col)
    for r in results:
        rows = ", ".join(f"{k}={v}" for k, v in r["row_counts"].items())
        name = f"{r['stage']} ({r['objective']})" if "objective" in r else r["stage"]
        name = f"{name} [{r['phase']}]" if r.get("phase") else name
        table.add_row(name, "cached" if r["cached"] else "built", r["fingerprint"], rows, r["output"])
    console = Console()
    console.print(table)
    for r in results:  # full paths (the table may truncate them)
        console.print(f"{r['stage']:>8}: {r['output']}/manifest.json", soft_wrap=True)
    train = next((r for r in reversed(results) if r["stage"] == "train"), None)  # the last phase's
    if train:
        from data_contracts.store import ArtifactStore
        from data_contracts.train import TrainManifest

        cfg = load_config(args.config, args.override)
        checkpoint = ArtifactStore.for_config(cfg).read_manifest(TrainManifest, train["fingerprint"]).checkpoint
        console.print(f"checkpoint: {train['output']}/{checkpoint} (diffusers: {train['output']}/diffusers)",
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


def start_file_server(cfg, port: int | None = None):
    """Serve the config's data root read-only on loopback; flow runs learn the URL from the environment."""
    from flows.deploy import StackError
    from flows.fileserver import FileServer

    fs_cfg = cfg.runtime.file_server
    if "://" in cfg.data_root:
        print(f"data_root {cfg.data_root} is object storage: no file server (image artifacts link to the store)")
        return None
    try:
        server = FileServer(cfg.data_root, fs_cfg.host, port or fs_cfg.port).start()
    except OSError as exc:
        from flows.deploy import port_owner

        port = port or fs_cfg.port
        raise StackError(f"the data file server cannot listen on {fs_cfg.host}:{port} ({exc.strerror}; held by "
                         f"{port_owner(port)}); choose another: --files-port {port + 1}, or --no-files") from None
    os.environ["BOORUFLOW_FILES_URL"] = server.url
    os.environ["BOORUFLOW_FILES_ROOT"] = str(Path(cfg.data_root).resolve())
    print(f"serving {cfg.data_root} read-only at {server.url}")
    return server


_unwinding = threading.Event()  # set once `fm up` has caught the interrupt and is stopping what it started


def _unwind_on_signals(retry_s: float = 0.2) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so `finally` stops what this process started (Prefect's runner
    replaces the SIGTERM handler with its own graceful stop once it serves; serve then returns).
    A KeyboardInterrupt raised by a signal handler can land in a finaliser (`__del__`), where Python reports it
    to sys.unraisablehook ("Exception ignored") and goes on as if nothing happened (measured: a SIGTERM swallowed
    by asyncio's transport __del__ left `fm up` serving). So a swallowed one is sent again, `retry_s` later --
    only then: an unwinding that is under way (stopping a server takes seconds) is never cut by a resend."""
    _unwinding.clear()

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = sys.unraisablehook

    def resend_swallowed(unraisable: object) -> None:
        exc = getattr(unraisable, "exc_value", None)
        name = str(exc) if isinstance(exc, KeyboardInterrupt) else ""
        if name in ("SIGTERM", "SIGHUP") and not _unwinding.is_set():
            signum = signal.Signals[name]

            def again() -> None:
                if not _unwinding.is_set() and signal.getsignal(signum) is handler:
                    os.kill(os.getpid(), signum)

            timer = threading.Timer(retry_s, again)
            timer.daemon = True
            timer.start()
        previous(unraisable)  # type: ignore[arg-type]

    sys.unraisablehook = resend_swallowed
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def prefect_command() -> str:
    """How to call this environment's `prefect` from any shell: the venv is usually not activated."""
    exe = Path(sys.executable)
    script = exe.parent / "prefect"
    return shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(str(exe))} -m prefect"


def print_serving(api_url: str, config: str) -> None:
    """What is served and a command that starts a run from any shell (the venv need not be activated)."""
    from flows.deploy import deployment_names

    ui = api_url.rstrip("/").removesuffix("/api")
    print(f"UI: {ui}  (deployments: {ui}/deployments)")
    print(f"serving {', '.join(deployment_names())} (default config {config}; runs until Ctrl-C)")
    print(f"in another shell: PREFECT_API_URL={api_url} {prefect_command()} deployment run fm/full --watch",
          flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import api_healthy, configured_api_url, serve_all
    from pipeline_config.load import load_config

    cfg = load_config(args.config, args.override)
    api_url = configured_api_url()
    if not api_url:
        raise BooruflowError("no Prefect server: `fm serve` serves against an existing one. Run `fm up` (starts a "
                             "local server, then serves), or export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if not api_healthy(api_url):
        raise BooruflowError(f"no Prefect server answers at PREFECT_API_URL={api_url} (GET /health); start it "
                             "(`prefect server start`), or run `fm up` instead")
    quiet_third_party_output()
    server = start_file_server(cfg, args.files_port) if args.files else None
    print_serving(api_url, args.config)
    try:
        serve_all(args.config, limit=args.limit, gpu_slots=args.gpu_slots, overrides=args.override)
    finally:
        if server is not None:
            server.stop()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from flows.deploy import (DEFAULT_PORT, api_healthy, api_url_for, check_files_port, port_owner, serve_all,
                              start_local_server, stop_server, use_api_url)
    from pipeline_config.load import load_config

    cfg = load_config(args.config, args.override)  # a typo fails before any server starts
    if args.port is not None:
        api_url = api_url_for(args.port)
    else:
        api_url = os.environ.get("PREFECT_API_URL") or api_url_for(DEFAULT_PORT)
    files_port = args.files_port or cfg.runtime.file_server.port
    quiet_third_party_output()
    _unwind_on_signals()
    proc, files = None, None
    try:
        if api_healthy(api_url):
            port = urlparse(api_url).port or DEFAULT_PORT
            print(f"a Prefect server already answers at {api_url}: {port_owner(port)}; using it "
                  "(it keeps running when this `fm up` stops)")
        if args.files:
            check_files_port(cfg.runtime.file_server.host, files_port)  # before a server is started for nothing
        log_path = Path(".data/prefect-server.log")
        proc = start_local_server(api_url, log_path)
        if proc is not None:
            print(f"started a local Prefect server at {api_url} (pid {proc.pid}, log {log_path}); "
                  "it stops with this `fm up`")
        use_api_url(api_url)  # before serve_all imports Prefect: no temporary server beside ours
        if args.files:
            files = start_file_server(cfg, files_port)
        print_serving(api_url, args.config)
        serve_all(args.config, limit=args.limit, gpu_slots=args.gpu_slots, overrides=args.override)
    except KeyboardInterrupt:
        print("fm up: stopping", file=sys.stderr)
        return 130
    finally:
        _unwinding.set()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if files is not None:
            files.stop()
        if proc is not None:
            stop_server(proc)
            print(f"stopped the Prefect server (pid {proc.pid})", flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from flows.preflight import check_config, check_stages, preflight

    cfg, findings = check_config(args.config, args.override)
    stages, more = check_stages(args.stages)
    findings += more
    if cfg is not None and stages:
        findings += preflight(cfg, stages, network=not args.offline, timeout_s=args.timeout)
    _print_findings(findings)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    verdict = "ready to run" if not errors else "fix the ✗ lines before running"
    print(f"{errors} error(s), {warnings} warning(s): {verdict}")
    return 1 if errors else 0


def _lock_holder(store, stage: str) -> str | None:
    """Who holds the stage's lock right now (None: nobody), without taking it for longer than a probe."""
    import json
    import time

    from data_contracts.lock import LOCAL_NAME, REMOTE_NAME, describe

    if store.is_local:
        import fcntl

        path = Path(store.output_path(stage, LOCAL_NAME))
        if not path.is_file():
            return None
        with open(path) as fh:
            try:  # shared and non-blocking: a held (exclusive) stage lock refuses it
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = fh.read()
                try:
                    return describe(json.loads(text) if text.strip() else None)
                except ValueError:
                    return describe(None)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None
    try:
        lease = json.loads(store.fs.cat_file(store.output_path(stage, REMOTE_NAME)))
    except (FileNotFoundError, ValueError):
        return None
    fresh = time.time() - float(lease.get("heartbeat", 0)) < 120  # StageLock's stale_after_s
    return describe(lease) if fresh else None


def _work_in_progress(store, stage: str) -> list[str]:
    from data_contracts.store import WORK_DIR

    try:
        entries = store.fs.ls(store.output_path(stage, WORK_DIR), detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(str(e)).name for e in entries if not Path(str(e)).name.startswith("."))


def _age(created_at: str) -> str:
    from datetime import datetime, timezone

    try:
        seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(created_at)).total_seconds()
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _update_of(manifest, expected: str | None) -> str | None:
    """For an ingest output made by `--update` on the config's own crawl: what to say of it (it is as current as
    the from-scratch crawl its fingerprint differs from); None otherwise."""
    record = manifest.update_record() if manifest is not None and manifest.stage == "ingest" else None
    if record is None or expected is None or record.lineage != expected:
        return None
    return f"an update (snapshot {record.snapshot[:19]}) of the crawl {expected}"


def stage_status(cfg, store) -> list[dict[str, str]]:
    """One row per stage: state (locked / in progress / complete / stale / missing), rows, size, age, path.

    stale: the current output is not what the config would build now (its fingerprint differs, or an
    upstream stage is itself stale or missing), so the next run rebuilds it.
    """
    from data_contracts.registry import manifest_class
    from tasks.common.stage import compute_fingerprint, upstream_manifests
    from tasks.registry import implemented_stages, stage_spec

    rows: list[dict[str, str]] = []
    fresh: dict[str, bool] = {}  # stage -> its current output is what the config builds now
    for stage in implemented_stages():
        spec = stage_spec(stage)
        current = store.current(stage)
        manifest, unreadable = None, ""
        if current:
            try:
                manifest = store.read_manifest(manifest_class(stage), current)
            except BooruflowError as exc:  # e.g. an older contract version: the next run rebuilds it
                unreadable = str(exc)
        behind = [up for up in spec.upstream if not fresh.get(up)]
        expected, why = None, ""
        if behind:
            why = f"upstream {', '.join(behind)} not up to date"
        else:
            try:
                expected = compute_fingerprint(spec, cfg, upstream_manifests(spec, store))
            except (BooruflowError, OSError) as exc:
                why = f"cannot compute its fingerprint: {exc}"
        fresh[stage] = manifest is not None and current == expected
        update = _update_of(manifest, expected)
        fresh[stage] = fresh[stage] or update is not None
        holder, work = _lock_holder(store, stage), _work_in_progress(store, stage)
        if holder:
            state, note = "locked", f"running: {holder}"
        elif work:
            state, note = "in progress", f"unfinished _work/{', _work/'.join(work)} (a rerun resumes or restarts it)"
        elif current is None:
            state, note = "missing", f"run `fm run {stage}`" + (f" ({why})" if why else "")
        elif fresh[stage]:
            state, note = "complete", update or ""
        else:
            state = "stale"
            note = unreadable or why or f"config or upstream changed: the next run builds {expected}"
        rows.append({
            "stage": stage, "state": state, "fingerprint": current or "-",
            "rows": ", ".join(f"{k}={v}" for k, v in manifest.row_counts.items()) if manifest else "-",
            "size": human_size(sum(f.size for f in manifest.files)) if manifest else "-",
            "age": _age(manifest.created_at) if manifest else "-",
            "path": store.output_url(stage, current) if current else "-", "note": note,
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from data_contracts.store import ArtifactStore
    from pipeline_config.load import load_config

    cfg = load_config(args.config, args.override)
    if "://" not in cfg.data_root and not Path(cfg.data_root).expanduser().exists():
        print(f"data_root {cfg.data_root} does not exist yet: nothing has run with this config (`fm run`)")
        return 0
    rows = stage_status(cfg, ArtifactStore.for_config(cfg))
    table = Table(title=f"booruflow status: {cfg.name} ({cfg.data_root})")
    for col in ("stage", "state", "fingerprint", "rows", "size", "age"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(r[c] for c in ("stage", "state", "fingerprint", "rows", "size", "age")))
    console = Console()
    console.print(table)
    for r in rows:  # full paths and notes (the table may wrap them)
        detail = "  ".join(x for x in (r["path"] if r["path"] != "-" else "", r["note"]) if x)
        console.print(f"{r['stage']:>8}: {r['state']:<11} {detail}", soft_wrap=True, highlight=False)
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


# The card's recommendation for the flow checkpoint (README "Using the checkpoint").
SAMPLE_DEFAULTS = {"width": 768, "height": 1024, "steps": 48, "cfg": 6.0}


def cmd_sample(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from data_contracts.registry import manifest_class
    from data_contracts.store import ArtifactStore
    from pipeline_config.load import load_config
    from tasks.sample.main import sample_main

    checkpoint = args.checkpoint
    cache_dir = args.cache_dir
    # Unset size/steps/cfg: the card's recommendation, or for `current` what the run's own sample grids used
    # (the demo's tiny model at 768x1024 x 48 steps would take minutes on a CPU to draw noise).
    given = {k: getattr(args, k) for k in ("width", "height", "steps", "cfg")}
    defaults = dict(SAMPLE_DEFAULTS)
    if checkpoint == "current":  # the current train output of the config
        cfg = load_config(args.config, args.override)
        store = ArtifactStore.for_config(cfg)
        manifest = store.read_manifest(manifest_class("train"))
        checkpoint = str(store.path(manifest, manifest.checkpoint))
        cache_dir = cache_dir or cfg.runtime.cache_dir
        grid = cfg.train.sampling
        defaults = {"width": grid.width, "height": grid.height, "steps": grid.steps, "cfg": grid.cfg_scale}
    for key, value in given.items():
        setattr(args, key, defaults[key] if value is None else value)
    if args.checkpoint == "current" and None in given.values():
        print(f"sampling at {args.width}x{args.height}, {args.steps} steps, cfg {args.cfg:g}: unset ones from "
              f"train.sampling of config {cfg.name} (--width/--height/--steps/--cfg to change)", file=sys.stderr)
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


def cmd_study(args: argparse.Namespace) -> int:
    from flows.study import study_main

    return study_main(args.config, args.override, write_doc=args.write_doc, preflight=not args.no_preflight)


def cmd_models_random(args: argparse.Namespace) -> int:
    from tasks.models.random_models import summary_lines, write_random_models

    results = write_random_models(Path(args.out), only=args.only, seed=args.seed, dtype=args.dtype, onnx=args.onnx,
                                  force=args.force, scale=args.scale, log=lambda line: print(line, file=sys.stderr))
    print("\n".join(summary_lines(results)))
    return 0


def _serve_options(p: argparse.ArgumentParser, up: bool) -> None:
    """Options `fm serve` and `fm up` share."""
    p.add_argument("-c", "--config", default="demo", help="default config of the deployments")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override given to every deployment's runs and to the file server root, e.g. "
                        "-o data_root=/data/x (repeatable; default: none)")
    p.add_argument("--limit", type=int, default=None, help="max concurrent flow runs (default: no limit)")
    p.add_argument("--gpu-slots", type=int, default=1,
                   help="GPU stages (tag, cache, train, eval) that may run at once on this host")
    p.add_argument("--files", action=argparse.BooleanOptionalAction, default=up,
                   help="serve the data root read-only over HTTP for image artifacts")
    p.add_argument("--files-port", type=int, default=None,
                   help="port of the data file server (default: runtime.file_server.port of the config, 4210)")


def build_parser() -> argparse.ArgumentParser:
    from tasks.registry import implemented_stages

    stages = implemented_stages()
    parser = argparse.ArgumentParser(prog="fm", description="booruflow: Danbooru -> flow-matching SD1.5",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
        # the raw formatter keeps the epilog's lines; descriptions are wrapped here
        text = textwrap.fill(description, 80) if description else None
        return sub.add_parser(name, formatter_class=HelpFormatter, description=text, **kwargs)

    p = add("run", help="run stages in-process (default: all, in DAG order)",
            description="Run pipeline stages in this process (Prefect's temporary API, no server needed). "
                        "Config, stage names and a preflight (`fm check`) are checked before anything starts.",
            epilog="stages, in DAG order:\n  " + " -> ".join(stages) + "\n\nexamples:\n"
                   "  fm run                      every stage of the demo preset\n"
                   "  fm run bucket --force       rebuild one stage (later stages see its new output next run)\n"
                   "  fm run ingest --update      extend the dataset with what is new on Danbooru since the last\n"
                   "                              crawl (README: Refreshing a dataset)\n"
                   "  fm run -c nai-v2-fm -o data_root=/data/x")
    p.add_argument("stages", nargs="*", metavar="stage",
                   help=f"stages to run: {', '.join(stages)} (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild the selected stages even if cached")
    p.add_argument("--update", action="store_true",
                   help="ingest: a new output extending the newest one of this config with the posts added, changed "
                        "and removed on Danbooru since (ingest.update.* says how far back it re-checks)")
    p.add_argument("--ab", action="store_true",
                   help="train with the flow and the DDPM objective (same data and steps), evaluate both")
    p.add_argument("--phase", default=None, metavar="NAME",
                   help="with train.phases: run the selected stages of this phase only (earlier phases are "
                        "reused, or built when missing; default: every phase)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the preflight checks (model paths, CUDA, credentials, disk, Danbooru host)")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = add("check", help="preflight: config, stages, models, CUDA, credentials, disk, Danbooru host",
            description="Check that a run of the config can start: each line is ✓ (fine), ! (a warning) or ✗ (an "
                        "error, with what to change). Exit status 0 without errors, 1 with.")
    p.add_argument("stages", nargs="*", metavar="stage", help=f"stages to check for: {', '.join(stages)} "
                                                              "(default: all)")
    p.add_argument("--offline", action="store_true", help="skip the probe request to the Danbooru host")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds the Danbooru probe may take")
    _common(p)
    p.set_defaults(func=cmd_check)

    p = add("status", help="each stage's current output: state, rows, size, age, path",
            description="States: complete (current output matches the config), stale (config or upstream changed: "
                        "the next run rebuilds it), in progress (an unfinished work folder), locked (a run holds "
                        "the stage now), missing (never built).")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = add("inspect", help="print and verify the current manifest of a stage")
    p.add_argument("stage", help=f"one of {', '.join(stages)}")
    p.add_argument("--fingerprint", default=None, help="a specific output instead of the current one (default: "
                                                       "the current output)")
    p.add_argument("--quick", action="store_true", help="check sizes only, not sha256")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=True,
                   help="print the manifest JSON after the summary")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = add("serve", help="serve fm/full and fm/<stage> against an existing Prefect server (PREFECT_API_URL)")
    _serve_options(p, up=False)
    p.set_defaults(func=cmd_serve)
    p = add("up", help="start a local Prefect server if none answers, then serve (Ctrl-C stops both)",
            description="Start a local Prefect server (SQLite) unless one answers on the port (then it is reused "
                        "and left running), serve the data root for image artifacts, and serve the deployments. "
                        "Ctrl-C or SIGTERM stops the server this command started.")
    p.add_argument("--port", type=int, default=None,
                   help=f"Prefect API port (default: {4200}, or the port of an exported PREFECT_API_URL)")
    _serve_options(p, up=True)
    p.set_defaults(func=cmd_up)

    p = add("sample", help="generate images from a checkpoint the pipeline made")
    p.add_argument("checkpoint", help="single-file .safetensors, diffusers folder, training-step folder, "
                                      "or 'current' (the current train output of -c/--config)")
    p.add_argument("prompt", nargs="+", help="one or more prompts (A1111 weighting syntax)")
    p.add_argument("--negative", default="", help="negative prompt (one for all; default: empty)")
    p.add_argument("--out", default="samples", help="output folder (PNGs with A1111 parameters + grid.png)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 48; for 'current': the config's "
                                                           "train.sampling.steps, as --width/--height/--cfg)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 6)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: the checkpoint's recommended "
                                                             "shift, else 3)")
    p.add_argument("--sampler", default="euler", choices=["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde"],
                   help="sampler (flow forms)")
    p.add_argument("--schedule", default="diffusers", choices=["diffusers", "simple"], help="sigma schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (then +1 per image)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default 768)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default 1024)")
    p.add_argument("--batch-size", type=int, default=1, help="images generated at once")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--clip-skip", type=int, default=2, help="CLIP layers skipped from the end (A1111 convention)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--base-model", default=None, help="base checkpoint for a training-step folder (default: the "
                                                      "one the step folder names)")
    p.add_argument("--cache-dir", default=None, help="model cache folder (default: runtime.cache_dir of the "
                                                     "config with 'current', else .data/cache)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = add("study", help="the flow-vs-ε study: ε base, flow and ε arms per seed, eval, report (issue 19)",
            description="Run (or resume) the flow-vs-ε study of a config with a `study:` section (preset ab-study) "
                        "and write its report; every stage output is cached, so a rerun goes on where one stopped.")
    p.add_argument("--write-doc", action="store_true", help="also write the report to docs/flow_vs_ddpm.md")
    p.add_argument("--no-preflight", action="store_true", help="skip the preflight checks")
    _common(p)
    p.set_defaults(func=cmd_study, config="ab-study")

    p = add("train-node", help="join a multi-node training run from another machine")
    p.add_argument("run_file", help="the run.json the train stage logged (on shared storage)")
    p.add_argument("--accelerate-config", required=True,
                   help="this machine's accelerate config (same cluster, its own machine_rank; required)")
    p.set_defaults(func=cmd_train_node)

    p = add("models", help="model utilities: random real-size models for GPU tests without a download",
            description="Model utilities. `fm models random` writes an SD1.5 checkpoint and a WD SwinV2 tagger with "
                        "random weights at the real sizes, in the layouts a user gives (no download).")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="subcommand",
                            help="random: write random-weight SD1.5 + tagger")
    p = msub.add_parser(
        "random", formatter_class=HelpFormatter, help="write random-weight SD1.5 + WD tagger at the real sizes",
        description=textwrap.fill(
            "Write real-sized models with random weights, deterministic for --seed, so the real loading and GPU "
            "code (tag, cache, train) runs at full size with no download: OUT/sd15-random.safetensors (single-file "
            "SD1.5 in the original LDM key layout, built from the shipped SD1.5 configs; ~2 GiB in fp16) and "
            "OUT/wd-swinv2-tagger-v3-random/ (model.safetensors fp32 + config.json + selected_tags.csv [+ model.onnx] "
            "of SmilingWolf/wd-swinv2-tagger-v3's shape: SwinV2-B, 448 px, 10,861 tags; ~375 MiB, as much again "
            "with --onnx). Writes are atomic; an existing complete output is kept unless --force. Prints the "
            "-o overrides that point a config at them. The weights are noise: images and tags mean nothing.", 80),
        epilog="examples:\n"
               "  fm models random --out /data/models                     both, fp16 SD1.5\n"
               "  fm models random --out /data/models --only tagger --onnx\n"
               "  fm run -c nai-v2-fm -o train.model=/data/models/sd15-random.safetensors \\\n"
               "         -o cache.model=/data/models/sd15-random.safetensors \\\n"
               "         -o tag.model=/data/models/wd-swinv2-tagger-v3-random\n"
               "  fm models random --out /tmp/m --scale tiny               CPU smoke test of this command (seconds)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created; required)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same weights")
    p.add_argument("--only", choices=["sd15", "tagger"], default=None,
                   help="write only this model (default: both)")
    p.add_argument("--onnx", action="store_true", help="also export the tagger as model.onnx (the WD ONNX layout)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="dtype of the SD1.5 checkpoint's tensors (the tagger is fp32, as published)")
    p.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    p.add_argument("--scale", choices=["full", "small", "tiny"], default="full",
                   help="full: the real sizes; small: SD1.5's layout at 2/5 width + the tiny VAE (the ab-study "
                        "preset); tiny: the demo's tiny shapes under *-tiny names, a CPU smoke test")
    p.set_defaults(func=cmd_models_random)

    p = add("files", help="serve a data root read-only over HTTP (for image artifacts)")
    p.add_argument("--root", required=True, help="the folder to serve (required)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=4210, help="port to listen on")
    p.set_defaults(func=cmd_files)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefect_defaults()  # before anything imports Prefect: its settings are read once
    try:
        return args.func(args)
    except BooruflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
