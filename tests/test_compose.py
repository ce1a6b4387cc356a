"""The compose stack is closed by default (issue 11 row 11): Prefect and MLflow were published on every interface
without authentication (whoever reaches them runs code on the GPU workers), Postgres had a default password,
the image was built from everything in the clone (runs/, models, .git, .env) and ran as root.

The file is parsed as YAML and its `${VAR...}` interpolations are checked as compose resolves them."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
VAR = re.compile(r"\$\{(?P<name>\w+)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def resolve(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V:-default}, ${V:?error} (raises), ${V}."""
    def sub(m):
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name)
        if op in (":?", "?") and not value:
            raise ValueError(f"{name}: {arg}")
        if op in (":-", "-") and not value:
            return arg
        return value or ""
    return VAR.sub(sub, text)


def strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def test_published_ports_bind_localhost_unless_told_otherwise():
    published = {name: svc["ports"] for name, svc in COMPOSE["services"].items() if "ports" in svc}
    assert set(published) == {"prefect-server", "mlflow"}
    for name, ports in published.items():
        for port in ports:
            host_ip = resolve(str(port), {}).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
            assert resolve(str(port), {"NLSR_BIND_ADDRESS": "10.0.0.5"}).startswith("10.0.0.5:"), (name, port)
    assert "NLSR_BIND_ADDRESS" in (ROOT / ".env.example").read_text()


def test_no_default_password_and_compose_refuses_without_one():
    uses = [s for s in strings(COMPOSE) if "POSTGRES_PASSWORD" in s]
    assert len(uses) >= 3  # postgres, the Prefect and the MLflow connection URLs
    for text in uses:
        names = [(m["name"], m["op"]) for m in VAR.finditer(text) if m["name"] == "POSTGRES_PASSWORD"]
        assert names and all(op == ":?" for _, op in names), text
        try:
            resolve(text, {})
        except ValueError as err:
            assert ".env" in str(err)
        else:
            raise AssertionError(f"{text!r} resolves without POSTGRES_PASSWORD")
        assert "s3cret" in resolve(text, {"POSTGRES_PASSWORD": "s3cret"})
    assert not re.search(r"nlsr:nlsr@|PASSWORD:\s*nlsr\b", (ROOT / "docker-compose.yml").read_text())


def test_image_context_excludes_secrets_stores_and_history():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".git", ".env", "runs/", "models/", "mlruns/", ".venv/"):
        assert entry in ignored, entry
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_image_runs_as_an_unprivileged_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    # nothing after USER needs root (no package installs), and the CMD runs as that user
    assert not any(line.startswith("RUN") and ("apt-get" in line or "pip install" in line)
                   for line in lines[last_user:])
    assert any(line.startswith("CMD") for line in lines[last_user:])
