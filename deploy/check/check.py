#!/usr/bin/env python3
"""Offline checks of the deployment files (`make deploy-check`).

Usage: check.py COMPOSE_SCHEMA HERALD_EDGE RENDERED_MANIFESTS...

Each RENDERED_MANIFESTS file is `helm template` of the chart with one values
file from deploy/helm/herald/ci/ (the Makefile renders them).

1. docker compose: deploy/compose/docker-compose.yml against the Compose
   specification's JSON schema (taken from the pinned docker-compose wheel, see
   the Makefile), every `depends_on` names a service and uses a condition that
   service can meet, every bind-mounted file exists, and each Herald service's
   environment (with .env.example's values) is a configuration the real
   `herald-edge` binary accepts (unknown keys and bad values are refused).
   The README's and docs/deploy.md's compose commands, run with `docker`
   stubbed, leave a .env that sets every variable the compose file requires.
2. Helm: every rendered manifest validates against the Kubernetes API's JSON
   schemas (strict: unknown fields refused) of the two newest Kubernetes minor
   versions the pinned kubernetes-validate ships; the custom resources it has
   no schema for (CRD_SCHEMAS below: HTTPRoute, PrometheusRule,
   ServiceMonitor) against minimal schemas of the fields the chart writes.
   Only known kinds appear, and the ConfigMap's herald.toml plus the
   Deployment's environment load in the real binary too (key files mounted
   from Secrets/ConfigMaps replaced by local stand-ins). Probes and the
   ServiceMonitor use the admin port, which is herald.toml's admin.listen and
   no Service beyond ClusterIP carries. Every herald_* metric
   that the PrometheusRule or the Grafana dashboard names is one
   docs/observability.md lists and services/edge/src/metrics.rs registers, and
   the chart's copy of the dashboard is deploy/grafana's.
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
from kubernetes_validate import utils as kubernetes_schemas

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy/compose/docker-compose.yml"
KNOWN_KINDS = {
    "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
    "HorizontalPodAutoscaler", "ServiceMonitor", "ServiceAccount", "Ingress",
    "HTTPRoute", "NetworkPolicy", "PrometheusRule", "Pod",
}
# The two newest Kubernetes minor versions whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = sorted({kubernetes_schemas.major_minor(v) for v in kubernetes_schemas.all_versions()},
                             key=lambda v: tuple(map(int, v.split("."))))[-2:]
# Environment variables the chart fills from a Secret, and what stands in for
# them when the real binary loads the configuration.
SECRET_STAND_INS = {
    "HERALD__AUTH__HS256_SECRET": "0123456789abcdef0123456789abcdef-deploy-check",
    "HERALD__TELEMETRY__OTLP_HEADERS": "authorization=Bearer deploy-check",
    # A gossip key: base64 of 32 bytes ("deploy-check-gossip-key-32-bytes").
    "HERALD__GOSSIP__SECRET": "ZGVwbG95LWNoZWNrLWdvc3NpcC1rZXktMzItYnl0ZXM=",
}
# Key files mounted from a Secret or ConfigMap, by the variable naming them.
KEY_FILE_STAND_INS = {
    "HERALD__AUTH__PUBLIC_KEY_FILE": (ROOT / "services/edge/tests/keys/rsa-public.pem").read_text(),
    "HERALD__AUTH__JWKS_FILE": '{"keys": []}\n',
    "HERALD__AUTH__JWKS_CA_FILE": (ROOT / "services/edge/tests/keys/rsa-public.pem").read_text(),
}
problems = []
notes = []


def problem(message: str) -> None:
    problems.append(message)


def herald_refusal(env: dict, config_text: str | None = None) -> str | None:
    """Runs `herald-edge token` (which loads and validates the configuration)
    with exactly `env` and, if given, a config file; returns why it refused."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [HERALD_EDGE, "token", "--user", "deploy-check"]
        if config_text is not None:
            path = pathlib.Path(tmp) / "herald.toml"
            path.write_text(config_text)
            args += ["--config", str(path)]
        run = subprocess.run(args, env={"PATH": os.environ.get("PATH", "")} | env,
                             capture_output=True, text=True)
        return run.stderr.strip() if run.returncode != 0 else None


def herald_accepts(what: str, env: dict, config_text: str | None = None) -> None:
    refusal = herald_refusal(env, config_text)
    if refusal:
        problem(f"{what}: herald-edge refuses this configuration: {refusal}")


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


def check_compose_commands() -> None:
    """The compose commands in README.md and docs/deploy.md, pasted into bash
    at the repository's root with `docker` stubbed: they must run docker
    compose in deploy/compose with a .env that sets every ${VAR:?} the
    compose file requires (an HS256 secret of at least 32 bytes)."""
    compose_text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", compose_text))
    for doc in ("README.md", "docs/deploy.md"):
        blocks = [b for b in re.findall(r"```sh\n(.*?)```", (ROOT / doc).read_text(), re.S)
                  if "docker compose -p herald up" in b]
        if not blocks:
            problem(f"{doc}: no sh block with `docker compose -p herald up`")
        for block in blocks:
            with tempfile.TemporaryDirectory() as tmp:
                compose_dir = pathlib.Path(tmp) / "deploy/compose"
                compose_dir.mkdir(parents=True)
                (compose_dir / ".env.example").write_text((COMPOSE.parent / ".env.example").read_text())
                stub = 'docker() { printf "%s\\n%s\\n" "$PWD" "$*" > "$STUB_OUT"; }\n'
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", stub + block], cwd=tmp,
                                     env=os.environ | {"STUB_OUT": f"{tmp}/docker-call"},
                                     capture_output=True, text=True)
                call = pathlib.Path(tmp, "docker-call")
                if run.returncode != 0 or not call.exists():
                    problem(f"{doc}: the compose commands fail as pasted: {run.stderr.strip()}")
                    continue
                cwd, args = call.read_text().splitlines()[:2]
                if pathlib.Path(cwd) != compose_dir or not args.startswith("compose -p herald up"):
                    problem(f"{doc}: docker {args} runs in {cwd}, not deploy/compose")
                env_file = compose_dir / ".env"
                values = dotenv(env_file) if env_file.exists() else {}
                for name in sorted(required):
                    if not values.get(name):
                        problem(f"{doc}: after its commands, .env does not set {name}, which the compose file requires")
                if len(values.get("HERALD_SECRET", "").encode()) < 32:
                    problem(f"{doc}: after its commands, HERALD_SECRET is shorter than 32 bytes")


def crd_schemas() -> dict:
    """Minimal schemas for the custom resources the chart renders, which
    kubernetes-validate has no schema for: the fields the chart writes, with
    unknown fields refused where the chart controls them (a misspelt field in
    a template fails here instead of being dropped by the API server)."""
    def strict(properties, required=()):
        return {"type": "object", "additionalProperties": False,
                "properties": properties, "required": list(required)}
    string = {"type": "string"}
    strings = {"type": "array", "items": string}
    labels = {"type": "object", "additionalProperties": string}
    duration = {"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
    metadata = {"type": "object", "required": ["name"],
                "properties": {"name": string, "namespace": string, "labels": labels, "annotations": labels}}
    def resource(api_version, kind, spec):
        return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": metadata, "spec": spec}, ["apiVersion", "kind", "metadata", "spec"])
    label_selector = {"type": "object", "properties": {"matchLabels": labels, "matchExpressions": {"type": "array"}}}
    return {
        # Gateway API v1 (gateway.networking.k8s.io), the standard channel's fields.
        "HTTPRoute": resource("gateway.networking.k8s.io/v1", "HTTPRoute", strict({
            "parentRefs": {"type": "array", "minItems": 1, "items": strict({
                "group": string, "kind": string, "namespace": string, "name": string,
                "sectionName": string, "port": {"type": "integer"}}, ["name"])},
            "hostnames": strings,
            "rules": {"type": "array", "items": strict({
                "name": string,
                "matches": {"type": "array", "items": strict({
                    "path": strict({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                    "value": string}),
                    "headers": {"type": "array"}, "queryParams": {"type": "array"}, "method": string})},
                "filters": {"type": "array"},
                "backendRefs": {"type": "array", "items": strict({
                    "group": string, "kind": string, "name": string, "namespace": string,
                    "port": {"type": "integer"}, "weight": {"type": "integer"}, "filters": {"type": "array"}},
                    ["name"])},
                "timeouts": strict({"request": duration, "backendRequest": duration}),
            })},
        }, ["parentRefs", "rules"])),
        # Prometheus Operator (monitoring.coreos.com/v1).
        "PrometheusRule": resource("monitoring.coreos.com/v1", "PrometheusRule", strict({
            "groups": {"type": "array", "minItems": 1, "items": strict({
                "name": string, "interval": duration, "limit": {"type": "integer"},
                "rules": {"type": "array", "minItems": 1, "items": {
                    **strict({"alert": string, "record": string, "expr": {"type": "string", "minLength": 1},
                              "for": duration, "keep_firing_for": duration,
                              "labels": labels, "annotations": labels}, ["expr"]),
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}},
            }, ["name", "rules"])},
        }, ["groups"])),
        "ServiceMonitor": resource("monitoring.coreos.com/v1", "ServiceMonitor", strict({
            "selector": label_selector,
            "namespaceSelector": {"type": "object"},
            "jobLabel": string,
            "endpoints": {"type": "array", "minItems": 1, "items": strict({
                "port": string, "path": string, "interval": duration, "scrapeTimeout": duration,
                "scheme": {"enum": ["http", "https"]}, "honorLabels": {"type": "boolean"},
                "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}})},
        }, ["selector", "endpoints"])),
    }


CRD_SCHEMAS = crd_schemas()


def check_kubernetes_schema(path: str, document: dict) -> None:
    kind = document.get("kind")
    name = (document.get("metadata") or {}).get("name")
    where = f"{pathlib.Path(path).name}: {kind}/{name}"
    if kind in CRD_SCHEMAS:
        for error in jsonschema.Draft7Validator(CRD_SCHEMAS[kind]).iter_errors(document):
            location = "/".join(str(p) for p in error.absolute_path)
            problem(f"{where}: {location}: {error.message} (minimal {kind} schema in check.py)")
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_schemas.validate(document, version, strict=True)
        except kubernetes_schemas.SchemaNotFoundError as error:
            problem(f"{where}: {error.message}")
        except kubernetes_schemas.ValidationError as error:
            location = "/".join(str(p) for p in error.path)
            problem(f"{where}: Kubernetes {version}: {location}: {error.message}")


def documented_metrics() -> set:
    """herald_* metric names in docs/observability.md's table, each checked
    against a registration in services/edge/src/metrics.rs."""
    table = (ROOT / "docs/observability.md").read_text()
    names = set(re.findall(r"^\| `(herald_[a-z_]+)(?:\{[^}]*\})?` \|", table, re.M))
    source = (ROOT / "services/edge/src/metrics.rs").read_text()
    # Each metric is one entry of the `metrics!` list (`field: Type, "name", "help";`),
    # or registered by hand (`register("name", …)`).
    registered = set(re.findall(r'^\s+[a-z_]+: [^\n]*?,(?:\s*//[^\n]*)?\s*"([a-z_]+)",', source, re.M))
    registered |= set(re.findall(r'register\(\s*"([a-z_]+)"', source))
    for name in names:
        base = re.sub(r"_total$", "", name.removeprefix("herald_"))
        if base not in registered and name != "herald_heap_allocated_bytes":
            problem(f"docs/observability.md lists {name}, which services/edge/src/metrics.rs does not register")
    return names


def check_metric_names(where: str, expressions: list, known: set) -> None:
    for expression in expressions:
        for name in set(re.findall(r"\bherald_[a-z_]+", expression)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in known and base not in known:
                problem(f"{where}: {name} is not a metric herald-edge exports (docs/observability.md)")


def check_dashboard(known: set) -> None:
    original = ROOT / "deploy/grafana/herald-dashboard.json"
    copy = ROOT / "deploy/helm/herald/dashboards/herald-dashboard.json"
    if original.read_bytes() != copy.read_bytes():
        problem(f"{copy.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: cp the second over the first")
    expressions = re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', original.read_text())
    check_metric_names(str(original.relative_to(ROOT)), expressions, known)


def container_env(path: str, spec: dict) -> dict:
    """The edge container's environment as the binary would see it, with
    Secret values and mounted key files replaced by local stand-ins."""
    container = spec["containers"][0]
    stand_in_dir = pathlib.Path(tempfile.mkdtemp(prefix="deploy-check-"))
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    env = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            value = item["value"].replace("$(POD_IP)", "10.0.0.7")
            if name in KEY_FILE_STAND_INS and any(value.startswith(m + "/") for m in mounts):
                local = stand_in_dir / value.lstrip("/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(KEY_FILE_STAND_INS[name])
                value = str(local)
            elif value.startswith("/etc/herald-auth/"):
                problem(f"{path}: {name}={value} is not under any of the container's volume mounts")
            env[name] = value
        elif "secretKeyRef" in item.get("valueFrom", {}):
            if name not in SECRET_STAND_INS:
                problem(f"{path}: {name} comes from a Secret and check.py has no stand-in for it (SECRET_STAND_INS)")
            env[name] = SECRET_STAND_INS.get(name, "")
        else:
            env[name] = "pod-0"
    return env


def check_herald_loads(path: str, env: dict, config: str) -> None:
    what = f"{path}: ConfigMap herald.toml with the Deployment's environment"
    if "HERALD__AUTH__HS256_SECRET" not in env:
        # `token` mints with an HS256 secret; an unused one changes no rule.
        env = env | {"HERALD__AUTH__HS256_SECRET": SECRET_STAND_INS["HERALD__AUTH__HS256_SECRET"]}
    refusal = herald_refusal(env, config)
    if refusal:
        problem(f"{what}: herald-edge refuses this configuration: {refusal}")


def check_manifests(paths: list) -> None:
    known_metrics = documented_metrics()
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
                continue
            if kind not in KNOWN_KINDS:
                problem(f"{path}: unexpected kind {kind}")
            check_kubernetes_schema(path, document)
            if kind == "PrometheusRule":
                expressions = [r["expr"] for g in document["spec"]["groups"] for r in g["rules"]]
                check_metric_names(f"{path}: PrometheusRule", expressions, known_metrics)
        for needed in ("Deployment", "ConfigMap", "Service"):
            if needed not in kinds:
                problem(f"{path}: no {needed}")
        config = next((d["data"]["herald.toml"] for d in documents
                       if d.get("kind") == "ConfigMap" and "herald.toml" in d.get("data", {})), None)
        deployment = next((d for d in documents if d.get("kind") == "Deployment"), None)
        if config is None or deployment is None:
            continue
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        check_herald_loads(path, container_env(path, spec), config)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        drain = re.search(r"drain_ms = (\d+)", config)
        if drain and grace * 1000 <= int(drain.group(1)):
            problem(f"{path}: terminationGracePeriodSeconds {grace} is not longer than the drain window")
        probes = {p: container.get(p, {}).get("httpGet", {}).get("path") for p in ("readinessProbe", "livenessProbe")}
        if probes != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
            problem(f"{path}: probes are {probes}")
        # The public port answers the probe paths with 404: probes and
        # scrapes go to the admin listener, whose port herald.toml binds.
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        admin_listen = re.search(r'\[admin\]\s*(?:#.*\s*)*listen = "[^"]*:(\d+)"', config)
        if not admin_listen or ports.get("admin") != int(admin_listen.group(1)):
            problem(f"{path}: the container's admin port {ports.get('admin')} is not herald.toml's admin.listen")
        probe_ports = {p: container.get(p, {}).get("httpGet", {}).get("port")
                       for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in container}
        if set(probe_ports.values()) != {"admin"}:
            problem(f"{path}: probes must use the admin port, not {probe_ports}")
        scraped = {e.get("port") for d in documents if d.get("kind") == "ServiceMonitor" for e in d["spec"]["endpoints"]}
        if scraped - {"admin"}:
            problem(f"{path}: the ServiceMonitor scrapes {sorted(scraped)}; /metrics is on the admin port only")
        exposed = [d["metadata"]["name"] for d in documents if d.get("kind") == "Service"
                   and d["spec"].get("type", "ClusterIP") != "ClusterIP"
                   and any(p.get("targetPort") == "admin" for p in d["spec"].get("ports", []))]
        if exposed:
            problem(f"{path}: {exposed} expose the admin port beyond the cluster")
        security = container.get("securityContext", {})
        if not security.get("readOnlyRootFilesystem") or not spec.get("securityContext", {}).get("runAsNonRoot"):
            problem(f"{path}: the container must run as non-root with a read-only root filesystem")
        public = {p["path"] for d in documents if d.get("kind") == "Ingress"
                  for rule in d["spec"]["rules"] for p in rule["http"]["paths"]}
        public |= {m["path"]["value"] for d in documents if d.get("kind") == "HTTPRoute"
                   for rule in d["spec"]["rules"] for m in rule.get("matches", [])}
        if public - {"/v1/stream", "/v1/publish"}:
            problem(f"{path}: the Ingress/HTTPRoute exposes {sorted(public)}; only /v1/stream and /v1/publish are public")
    check_dashboard(known_metrics)


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
    check_compose_commands()
    check_manifests(rendered)
    check_dockerfile()
    for line in notes:
        print(f"deploy-check: note: {line}")
    for line in problems:
        print(f"deploy-check: {line}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"deploy-check: compose, {len(rendered)} rendered chart(s) (Kubernetes {' and '.join(KUBERNETES_VERSIONS)} "
          f"schemas; {', '.join(sorted(CRD_SCHEMAS))} against minimal schemas) and the Dockerfile are consistent")
