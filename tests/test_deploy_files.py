"""The deployment files in ``deploy/`` and the root ``Dockerfile`` agree with the server they run.

Nothing here starts Docker or Kubernetes (neither runs on CI); what can rot silently is checked:
every ``STREAM_SERVER_*`` variable they set is a real setting whose value the server accepts, the
compose build points at a Dockerfile that installs what the variables need, and the Kubernetes
probes, drain hook and grace period fit the server's drain.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from stream_server.settings import ENV_PREFIX, Settings, from_sources
from tests.support import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

DEPLOY = REPO / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def environments() -> list[tuple[str, dict[str, str]]]:
    """(file, {variable: value}) of every environment block in the compose and k8s files."""
    found: list[tuple[str, dict[str, str]]] = []
    for path in sorted(DEPLOY.glob("docker-compose*.yml")):
        for service in documents(path)[0].get("services", {}).values():
            if service.get("environment"):
                found.append((path.name, {k: str(v) for k, v in service["environment"].items()}))
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in documents(path):
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container.get("env"):
                    found.append((path.name, {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}))
    return found


def test_every_variable_the_deploy_files_set_is_a_setting_the_server_accepts() -> None:
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    blocks = [(name, env) for name, env in environments() if any(k.startswith(ENV_PREFIX) for k in env)]
    assert len(blocks) >= 3, "compose, its GPU override and the k8s Deployment each set the server's variables"
    for name, env in blocks:
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert set(ours) <= fields, (name, sorted(set(ours) - fields))
        settings = from_sources(None, ours)  # raises on a value the server would refuse
        if "STREAM_SERVER_REDIS_URL" in ours:
            assert settings.redis_url.startswith("redis://")


def test_compose_builds_the_root_dockerfile_with_the_extras_its_variables_need() -> None:
    compose = documents(DEPLOY / "docker-compose.yml")[0]
    build = compose["services"]["stream-server"]["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == (REPO / "Dockerfile").resolve() and dockerfile.is_file()
    assert "redis" in build["args"]["EXTRAS"].split(","), "--redis-url needs the redis extra"
    text = dockerfile.read_text()
    assert re.search(r"^ARG EXTRAS=base$", text, re.M) and 'pip install --no-cache-dir ".[${EXTRAS}]"' in text
    assert re.search(r'^CMD \["stream-server"\]$', text, re.M), "exec form: the server is PID 1 and gets SIGTERM"
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (service, volume)


def test_kubernetes_probes_drain_and_grace_period_fit_the_server() -> None:
    [deployment] = [d for d in documents(DEPLOY / "k8s" / "stream-server.yaml") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    env = {e["name"]: e["value"] for e in container["env"]}
    drain_s = float(env.get("STREAM_SERVER_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    assert pod["terminationGracePeriodSeconds"] >= drain_s + 10, "Kubernetes must not SIGKILL a drain inside its timeout"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
