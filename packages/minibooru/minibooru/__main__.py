"""Command line: generate, serve or dump a mini-booru.

    python -m minibooru serve --posts 300 --seed 0 --port 8765 --dir .data/minibooru
    python -m minibooru generate --posts 2000 --dir /tmp/mb
    python -m minibooru dump --dir /tmp/mb --out /tmp/mb-dump --fmt parquet --images tar

`serve` generates the booru first when the folder holds no complete one with these parameters, prints one line
`MINIBOORU_URL=<url>` (flushed) once it accepts connections, and runs until SIGINT/SIGTERM. Credentials for
`--login` come with the key in the environment variable MINIBOORU_API_KEY (never on the command line).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .dump import write_dump
from .generate import generate_minibooru
from .server import Faults, serve_minibooru


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minibooru")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "generate"):
        sp = sub.add_parser(name)
        sp.add_argument("--dir", type=Path, required=True, help="mini-booru folder (created or reused)")
        sp.add_argument("--posts", type=int, default=300)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--max-side", type=int, default=768)
    serve = sub.choices["serve"]
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 = any free port (see the printed URL)")
    serve.add_argument("--page-cap", type=int, default=1000)
    serve.add_argument("--tag-limit", type=int, default=2)
    serve.add_argument("--login", default=None, help="require this login with the key in $MINIBOORU_API_KEY")
    serve.add_argument("--faults", default=None, help='JSON of Faults fields, e.g. \'{"rate_limit_burst": 3}\'')
    serve.add_argument("--admin", action="store_true", help="enable GET/PUT /_minibooru/faults and GET /_minibooru/stats")
    serve.add_argument("--public-url", default=None, help="base URL written into file URLs (default: the bound URL)")
    dump = sub.add_parser("dump")
    dump.add_argument("--dir", type=Path, required=True)
    dump.add_argument("--out", type=Path, required=True)
    dump.add_argument("--fmt", choices=("jsonl", "parquet"), default="jsonl")
    dump.add_argument("--images", choices=("folder", "tar"), default="folder")
    dump.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args(argv)

    if args.cmd == "dump":
        print(write_dump(args.dir, args.out, fmt=args.fmt, images=args.images, shard_size=args.shard_size))
        return 0
    booru = generate_minibooru(args.dir, args.posts, args.seed, max_side=args.max_side)
    if args.cmd == "generate":
        print(booru.root)
        return 0

    credentials = None
    if args.login:
        key = os.environ.get("MINIBOORU_API_KEY")
        if not key:
            print("--login needs the API key in the environment variable MINIBOORU_API_KEY", file=sys.stderr)
            return 2
        credentials = {args.login: key}
    faults = Faults.from_json(json.loads(args.faults)) if args.faults else None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serve_minibooru(booru.root, host=args.host, port=args.port, faults=faults, credentials=credentials,
                         page_cap=args.page_cap, tag_limit=args.tag_limit, public_url=args.public_url,
                         admin=args.admin) as server:
        print(f"MINIBOORU_URL={server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
