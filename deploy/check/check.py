#!/usr/bin/env python3
"""Offline checks of the deployment files (`make deploy-check`).

Usage: check.py COMPOSE_SCHEMA HERALD_EDGE RENDERED_MANIFESTS...

1. docker compose: deploy/compose/docker-compose.yml against the Compose
   specification's JSON schema (taken from the pinned docker-compose wheel, see
   the Makefile), every `depends_on` names a service and uses a condition that
   service can meet, every bind-mounted file exists, and each Herald service's
   environment (with .env.example's values) is a configuration the real
   `herald-edge` binary accepts (unknown keys and bad values are refused).
2. Helm: every rendered manifest has apiVersion, kind and a name, only known
   kinds appear, and the ConfigMap's herald.toml plus the Deployment's
   environment load in the real binary too.
3. Dockerfile: exec-form ENTRYPOINT, a non-root USER, a HEALTHCHECK and
   STOPSIGNAL in the runtime stage, build args for both base images.

Exits non-zero with one line per problem.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy/compose/docker-compose.yml"
KNOWN_KINDS = {
    "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
    "HorizontalPodAutoscaler", "ServiceMonitor",
}
problems = []


def problem(message: str) -> None:
    problems.append(message)


def herald_accepts(what: str, env: dict, config_text: str | None = None) -> None:
    """Runs `herald-edge token` (which loads and validates the configuration)
    with exactly `env` and, if given, a config file."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [HERALD_EDGE, "token", "--user", "deploy-check"]
        if config_text is not None:
            path = pathlib.Path(tmp) / "herald.toml"
            path.write_text(config_text)
            args += ["--config", str(path)]
        run = subprocess.run(args, env={"PATH": os.environ.get("PATH", "")} | env,
                             capture_output=True, text=True)
        if run.returncode != 0:
            problem(f"{what}: herald-edge refuses this configuration: {run.stderr.strip()}")


def dotenv(path: pathlib.Path) -> dict:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""
    def sub(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":-":
            return arg or ""
        problem(f"compose: ${{{name}}} is not set in .env.example")
        return ""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, value)


def check_compose(schema_path: str) -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    schema = json.loads(pathlib.Path(schema_path).read_text())
    for error in jsonschema.Draft7Validator(schema).iter_errors(document):
        path = "/".join(str(p) for p in error.absolute_path)
        problem(f"compose: {path}: {error.message}")
    services = document.get("services", {})
    env_file = dotenv(COMPOSE.parent / ".env.example")
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if dependency not in services:
                problem(f"compose: {name} depends on unknown service {dependency}")
                continue
            condition = rule.get("condition") if isinstance(rule, dict) else None
            if condition == "service_healthy" and "healthcheck" not in services[dependency]:
                problem(f"compose: {name} waits for {dependency} to be healthy, which has no healthcheck")
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                if not (COMPOSE.parent / source).exists():
                    problem(f"compose: {name} mounts {source}, which does not exist")
        image = service.get("image", "")
        environment = service.get("environment") or {}
        if image.startswith("herald-edge") and any(k.startswith("HERALD__HTTP") for k in environment):
            env = {k: interpolate(str(v), env_file) for k, v in environment.items()}
            herald_accepts(f"compose service {name}", env)


def check_manifests(paths: list) -> None:
    for path in paths:
        documents = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        if not documents:
            problem(f"{path}: renders nothing")
        kinds = set()
        for document in documents:
            kind = document.get("kind")
            kinds.add(kind)
            name = (document.get("metadata") or {}).get("name")
            if not document.get("apiVersion") or not kind or not name:
                problem(f"{path}: a manifest without apiVersion, kind or metadata.name")
            if kind not in KNOWN_KINDS:
                problem(f"{path}: unexpected kind {kind}")
        for needed in ("Deployment", "ConfigMap", "Service"):
            if needed not in kinds:
                problem(f"{path}: no {needed}")
        config = next((d["data"]["herald.toml"] for d in documents if d.get("kind") == "ConfigMap"), None)
        deployment = next((d for d in documents if d.get("kind") == "Deployment"), None)
        if config is None or deployment is None:
            continue
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"].replace("$(POD_IP)", "10.0.0.7")
            elif "secretKeyRef" in item.get("valueFrom", {}):
                env[item["name"]] = "0123456789abcdef0123456789abcdef-deploy-check"
            else:
                env[item["name"]] = "pod-0"
        herald_accepts(f"{path}: ConfigMap herald.toml with the Deployment's environment", env, config)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        drain = re.search(r"drain_ms = (\d+)", config)
        if drain and grace * 1000 <= int(drain.group(1)):
            problem(f"{path}: terminationGracePeriodSeconds {grace} is not longer than the drain window")
        probes = {p: container.get(p, {}).get("httpGet", {}).get("path") for p in ("readinessProbe", "livenessProbe")}
        if probes != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
            problem(f"{path}: probes are {probes}")
        security = container.get("securityContext", {})
        if not security.get("readOnlyRootFilesystem") or not spec.get("securityContext", {}).get("runAsNonRoot"):
            problem(f"{path}: the container must run as non-root with a read-only root filesystem")


def check_dockerfile() -> None:
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    runtime = text.split("\nFROM ")[-1]
    for needed, pattern in [
        ("build args for the base images", r"ARG RUST_IMAGE=.*\nARG RUNTIME_IMAGE="),
        ("an exec-form ENTRYPOINT", r'\nENTRYPOINT \["'),
        ("a non-root USER", r"\nUSER (?!root|0[:\s])"),
        ("a HEALTHCHECK on /healthz", r"HEALTHCHECK[\s\S]*?/healthz"),
        ("STOPSIGNAL SIGTERM", r"\nSTOPSIGNAL SIGTERM"),
    ]:
        haystack = text if needed.startswith("build args") else runtime
        if not re.search(pattern, haystack):
            problem(f"Dockerfile: the runtime stage needs {needed}")
    for path in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        if path != "." and not (ROOT / path).exists():
            problem(f"Dockerfile: COPY {path}: no such file")


if __name__ == "__main__":
    schema, HERALD_EDGE, *rendered = sys.argv[1:]
    check_compose(schema)
    check_manifests(rendered)
    check_dockerfile()
    for line in problems:
        print(f"deploy-check: {line}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"deploy-check: compose, {len(rendered)} rendered chart(s) and the Dockerfile are consistent")
