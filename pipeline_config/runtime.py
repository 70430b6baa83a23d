"""Where and how stages run."""
from __future__ import annotations

from typing import Literal

from pipeline_config.base import Section


class FileServerConfig(Section):
    enabled: bool = False  # `fm up` / `fm serve --files` turn it on
    host: str = "127.0.0.1"
    port: int = 4210


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    runner_address: str | None = None  # dask scheduler / ray address; None = local cluster
    max_workers: int = 4
    cache_dir: str = ".data/cache"  # local folder: built tiny models, tokenizer, remote-read cache
    file_server: FileServerConfig = FileServerConfig()
