"""Where and how stages run."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from data_contracts.errors import ConfigError
from pipeline_config.base import Section
from pipeline_config.secrets import register_secret

# Keys that hold credentials in fsspec backends' options: those belong in the environment, not a config
# file that is logged, hashed into run parameters and shown in the Prefect UI.
_SECRET_KEYS = ("key", "secret", "token", "password", "access_key", "secret_key", "session_token",
                "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key", "sas_token")


def _secret_keys(node: Any, path: str) -> list[str]:
    """Dotted names of credential keys under node (their values are registered for redaction)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{path}.{key}"
            if str(key).lower() in _SECRET_KEYS:
                found.append(dotted)
                register_secret(value if isinstance(value, str) else None)
            found.extend(_secret_keys(value, dotted))
    return found


class FileServerConfig(Section):
    enabled: bool = False  # `fm up` / `fm serve --files` turn it on
    host: str = "127.0.0.1"
    port: int = 4210


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    runner_address: str | None = None  # dask scheduler / ray address; None = local cluster
    max_workers: int = 4
    # The Prefect global concurrency limit GPU stages hold a slot of (`fm serve --gpu-slots` creates it).
    # A limit counts across the whole Prefect server: with several GPU hosts on one server, give each
    # host (work pool) a name of its own.
    gpu_limit: str = "booruflow-gpu"
    cache_dir: str = ".data/cache"  # local folder: built tiny models, tokenizer, remote-read cache, compiled graphs
    # fsspec options for an object-store data_root (s3://...), e.g. {endpoint_url: "http://minio:9000"}
    # or {client_kwargs: {region_name: eu-west-1}}. Credentials come from the environment
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role), never from here.
    storage_options: dict[str, Any] = {}
    file_server: FileServerConfig = FileServerConfig()

    @field_validator("storage_options", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        secret = _secret_keys(value, "runtime.storage_options")
        if secret:
            # A ConfigError, not a ValueError: pydantic would echo the offending value (the secret).
            raise ConfigError(
                f"credentials do not belong in the config (found {', '.join(secret)}); set them in the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS profile instead")
        return value
