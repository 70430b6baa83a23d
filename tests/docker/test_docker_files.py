"""No Docker engine on these machines: check what can be checked without one (structure and lint rules)."""
import re
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_lint_rules():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    assert ops[0] == "FROM"
    base = ins[0][1]
    assert "cuda" in base and ":" in base and not base.endswith(":latest"), "pin a CUDA runtime base tag"
    assert "HEALTHCHECK" in ops
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert ops.index("USER") < ops.index("CMD")
    copies = " ".join(rest for op, rest in ins if op in ("COPY", "ADD"))
    assert not re.search(r"\.(safetensors|ckpt|pt|onnx|bin)\b", copies), "no weights baked into the image"
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "onnxruntime" not in runs or "onnxruntime-gpu" in runs
    assert "rm -rf /var/lib/apt/lists" in runs, "clean apt lists in the same layer"
    assert "ADD" not in ops, "prefer COPY"


def test_compose_stack_structure():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert {"postgres", "prefect-server", "worker", "files"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "PREFECT_SERVER_API_AUTH_STRING" in server_env
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == "all"
    assert "prefect worker start" in " ".join(worker["command"])
    assert any(v.startswith("data:/data") for v in worker["volumes"])
    assert set(spec["volumes"]) >= {"data", "pgdata"}
    for name, svc in services.items():  # every port is published on loopback only
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert services["files"]["volumes"] == ["data:/data:ro"]


def test_no_secret_values_in_compose():
    text = (DOCKER / "compose.yaml").read_text()
    for match in re.finditer(r"(PASSWORD|AUTH_STRING|API_KEY)\s*:\s*(\S+)", text):
        assert match.group(2).startswith("${"), f"secret {match.group(1)} must come from docker/.env"
    assert (DOCKER / ".env.example").exists()
    gitignore = (DOCKER.parent / ".gitignore").read_text()
    assert "docker/.env" in gitignore


def test_prefect_yaml_matches_served_deployments():
    from tasks.registry import DAG_ORDER

    spec = yaml.safe_load((DOCKER.parent / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names >= {"full", "ab", *DAG_ORDER}
    from flows.deploy import build_deployments

    served = {d.name: d for d in build_deployments("demo")}
    assert set(served) == names, "fm serve and prefect.yaml must offer the same deployments"
    assert served["ab"].parameters == {"config": "demo", "ab": True}
    assert served["bucket"].parameters == {"config": "demo", "stages": ["bucket"]}
    for d in spec["deployments"]:
        assert d["entrypoint"] == "flows/fm.py:fm"
