"""The Helm chart rendered offline: lint, schema checks, valid manifests, and wiring that matches
what the operator and gateway read (settings, flags, keys, Redis)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from handler_gateway import settings as gateway_settings
from handler_operator.settings import ENV_PREFIX, OperatorSettings
from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    VARIANTS,
    helm,
    render,
    render_error,
    template_args,
)
from tests.conftest import REPO_ROOT

GATEWAY, OPERATOR, REDIS = "handler-gateway", "handler-operator", "handler-redis"
CREDENTIALS = "handler-credentials"
SCHEMAS = REPO_ROOT / "tests" / "data"


@pytest.mark.parametrize("name", ["default", "everything"])
def test_helm_lint_strict_is_clean(name):
    args = ["lint", "--strict", str(CHART)]
    for value in VARIANTS[name]:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_every_rendered_manifest_validates(variant):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    name, rendered = variant
    assert rendered.of("Deployment"), name
    for doc in rendered.docs:
        if doc["kind"] == "ServiceMonitor":
            schema = json.loads(
                (SCHEMAS / "prometheus-operator" / "servicemonitor.schema.json").read_text()
            )
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, "1.33", strict=True)


# (--set value, what the error must say)
BAD_VALUES = [
    ("gateway.replicas=two", "/gateway/replicas': got string, want integer"),
    ("gateway.replicas=0", "/gateway/replicas': minimum: got 0, want 1"),
    ("gatewy.replicas=3", "additional properties 'gatewy' not allowed"),
    ("operator.imagee.tag=x", "additional properties 'imagee' not allowed"),
    ("redis.enabled=maybe", "/redis/enabled': got string, want boolean"),
    ("redis.appendfsync=sometimes", "/redis/appendfsync': value must be one of"),
    ("redis.external.url=http://redis:6379", "does not match pattern"),
    ("watchNamespaces={Bad_Namespace}", "/watchNamespaces/0': 'Bad_Namespace' does not match"),
    ("gateway.service.type=Ingress", "/gateway/service/type': value must be one of"),
    ("gateway.logLevel=LOUD", "/gateway/logLevel': value must be one of"),
    ("operator.metricsPort=70000", "/operator/metricsPort': maximum"),
    ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval'"),
    ("gateway.resources.requests.cpu=lots", "/gateway/resources/requests/cpu'"),
    ("imagePullSecrets[0].nam=x", "additional properties 'nam' not allowed"),
    ("gateway.ingress.host=Not_A_Host", "/gateway/ingress/host'"),
    ("gateway.extraEnv[0].name=A,gateway.extraEnv[0].value=1", "/gateway/extraEnv/0/value'"),
]


@pytest.mark.parametrize(("value", "message"), BAD_VALUES, ids=[v for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values_with_the_path(value, message):
    error = render_error([value])
    assert "values don't meet the specifications of the schema" in error
    assert message in error, error


# Combinations the schema cannot see; the templates fail with what to change.
BAD_COMBINATIONS = [
    (["redis.enabled=false"], "gateway.replicas > 1 needs a shared queue"),
    (["redis.external.url=redis://r:6379/0"], "redis.enabled=true and redis.external.url"),
    (["networkPolicy.enabled=true"], "networkPolicy.enabled needs the worker namespaces"),
]


@pytest.mark.parametrize(
    ("sets", "message"), BAD_COMBINATIONS, ids=[m for _, m in BAD_COMBINATIONS]
)
def test_contradictory_values_fail_with_a_clear_message(sets, message):
    assert message in render_error(sets)


def test_versions_follow_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == package and chart["version"] == package
    rendered = render()
    assert rendered.container(OPERATOR)["image"].endswith(f":{package}")
    assert rendered.container(GATEWAY)["image"].endswith(f":{package}")
    env = {e["name"]: e.get("value") for e in rendered.container(OPERATOR)["env"]}
    assert env["HANDLER_OPERATOR_DEFAULT_IMAGE"].endswith(f"handler-worker:{package}")


def test_chart_crd_is_the_generated_crd():
    assert (CHART / "crds" / "handlerdeployments.yaml").read_text() == (
        REPO_ROOT / "crds" / "handlerdeployments.yaml"
    ).read_text()
    templated = render(["crds.templated=true"]).of("CustomResourceDefinition")
    assert len(templated) == 1
    assert templated[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not render().of("CustomResourceDefinition")


def test_every_value_is_documented():
    """Each leaf value, or a mapping above it, has a `# --` comment right above (helm-docs)."""
    documented_at: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comments: list[str] = []
    undocumented = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.strip().startswith("#"):
            comments.append(line.strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z]\w*):\s*(\S.*)?$", line)
        if not match:
            comments = [] if not line.strip() else comments
            continue
        indent = len(match.group(1))
        while documented_at and documented_at[-1][0] >= indent:
            documented_at.pop()
        documented = any(c.startswith("# --") for c in comments) or any(d for _, d in documented_at)
        comments = []
        if match.group(3) is None:
            documented_at.append((indent, documented))
        elif not documented:
            undocumented.append(match.group(2))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_operator_env_is_what_the_operator_reads():
    rendered = render(["watchNamespaces={ml,team-b}", "operator.purgeOnDelete=true"])
    env = rendered.container(OPERATOR)["env"]
    names = [e["name"] for e in env if e["name"].startswith(ENV_PREFIX)]
    fields = {ENV_PREFIX + f.upper() for f in OperatorSettings.model_fields}
    assert set(names) <= fields, set(names) - fields
    values = {e["name"]: e["value"] for e in env if "value" in e}
    values["HANDLER_OPERATOR_GATEWAY_ADMIN_KEY"] = "from-secret"
    settings = OperatorSettings.from_env(values)
    assert settings.namespaces == ["ml", "team-b"]
    assert settings.purge_on_delete is True
    assert settings.gateway_url == f"http://{GATEWAY}.{NAMESPACE}.svc:8080"
    admin = next(e for e in env if e["name"] == "HANDLER_OPERATOR_GATEWAY_ADMIN_KEY")
    assert admin["valueFrom"]["secretKeyRef"] == {"name": f"{GATEWAY}-keys", "key": "admin-key"}
    deployment = rendered.get("Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    probe = rendered.container(OPERATOR)["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gateway_flags_and_env_are_what_the_gateway_parses(name, monkeypatch):
    rendered = render(VARIANTS[name])
    container = rendered.container(GATEWAY)
    parsed = gateway_settings.parser().parse_args(container["args"])
    assert parsed.admin_key_files and parsed.api_key_files
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for path in parsed.admin_key_files + parsed.api_key_files:
        assert any(path.startswith(m + "/") for m in mounted), path
    env = {e["name"]: e for e in container["env"]}
    backend = env["HANDLER_GATEWAY_BACKEND"]["value"]
    if name == "memory-single-gateway":
        assert backend == "memory://"
        assert not rendered.of("StatefulSet")
    elif name == "external-redis":
        assert backend == "rediss://:$(REDIS_PASSWORD)@redis.example.com:6380/2"
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "managed-redis"
        assert not rendered.of("StatefulSet")
    elif name == "sentinel-redis":
        expected = "redis+sentinel://:$(REDIS_PASSWORD)@s-0.s:26379,s-1.s:26379,s-2.s:26379/jobs/1"
        assert backend == expected
        assert not rendered.of("StatefulSet")
    else:
        assert backend == f"redis://:$(REDIS_PASSWORD)@{REDIS}:6379/0"
        # $(VAR) expansion needs the variable defined earlier in the list.
        assert list(env).index("REDIS_PASSWORD") < list(env).index("HANDLER_GATEWAY_BACKEND")
        assert rendered.get("Service", REDIS)
    service = rendered.get("Service", GATEWAY)
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_no_secret_value_is_rendered_and_the_hook_generates_each_one():
    rendered = render()
    assert not rendered.of("Secret")
    job = rendered.get("Job", CREDENTIALS)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "handler_operator.credentials"]
    assert container["image"] == rendered.container(OPERATOR)["image"]
    secrets = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith("--secret=")]
    assert secrets == [f"{GATEWAY}-keys=admin-key,api-key", f"{REDIS}=redis-password"]
    # What the hook generates is what the gateway, the operator and Redis read.
    volumes = rendered.get("Deployment", GATEWAY)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "keys", "secret": {"secretName": f"{GATEWAY}-keys"}} in volumes
    redis = rendered.get("StatefulSet", REDIS)["spec"]["template"]["spec"]["containers"][0]
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == {"name": REDIS, "key": "redis-password"}


def test_existing_secrets_need_no_hook():
    existing = render(["gateway.auth.existingSecret=mine", "redis.auth.existingSecret=redis-mine"])
    assert not existing.of("Secret") and not existing.of("Job")
    volumes = existing.get("Deployment", GATEWAY)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "keys", "secret": {"secretName": "mine"}} in volumes
    redis_env = existing.get("StatefulSet", REDIS)["spec"]["template"]["spec"]["containers"][0]
    assert redis_env["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "redis-mine"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_helm_template_renders_the_same_every_time(name):
    """What GitOps tools compare on every sync: nothing random, nothing read from a cluster."""
    first, second = (helm(*template_args(VARIANTS[name], "--include-crds")) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize("persistence", [True, False])
def test_redis_keeps_an_append_only_file(persistence):
    rendered = render([f"redis.persistence.enabled={str(persistence).lower()}"])
    statefulset = rendered.get("StatefulSet", REDIS)
    (script,) = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--appendonly yes --appendfsync everysec" in script
    claims = statefulset["spec"].get("volumeClaimTemplates") or []
    assert bool(claims) is persistence
    if persistence:
        assert claims[0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


@pytest.mark.parametrize(("replicas", "expected"), [(1, False), (2, True), (3, True)])
def test_gateway_pdb_only_with_more_than_one_replica(replicas, expected):
    rendered = render([f"gateway.replicas={replicas}"])
    assert bool(rendered.of("PodDisruptionBudget")) is expected


def test_network_policies_confine_workers_to_the_gateway():
    rendered = render(["networkPolicy.enabled=true", "watchNamespaces={ml,team-b}"])
    workers = [p for p in rendered.of("NetworkPolicy") if p["metadata"].get("namespace")]
    assert {p["metadata"]["namespace"] for p in workers} == {"ml", "team-b"}
    policy = workers[0]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "handler-worker"
    assert policy["ingress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    to_gateway = policy["egress"][0]
    assert to_gateway["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NAMESPACE
    }
    gateway_pods = rendered.get("Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    selector = to_gateway["to"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= gateway_pods.items()
    redis = rendered.get("NetworkPolicy", REDIS)["spec"]
    assert redis["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == selector


def test_service_monitors_scrape_both_parts():
    rendered = render(["metrics.serviceMonitor.enabled=true"])
    monitors = {m["metadata"]["name"]: m for m in rendered.of("ServiceMonitor")}
    assert set(monitors) == {GATEWAY, OPERATOR}
    for name, monitor in monitors.items():
        service = next(
            s
            for s in rendered.of("Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        )
        port = monitor["spec"]["endpoints"][0]["port"]
        assert port in {p["name"] for p in service["spec"]["ports"]}, name


def test_notes_tell_how_to_apply_get_the_key_and_call():
    result = helm(
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "-n",
        NAMESPACE,
        "--set",
        "watchNamespaces={ml}",
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for text in (
        "kind: HandlerDeployment",
        "namespace: ml",
        f"get secret {GATEWAY}-keys",
        'runpod.Endpoint("ml--hello")',
        f"http://{GATEWAY}.{NAMESPACE}.svc:8080",
    ):
        assert text in notes, text


def test_ingress_routes_the_host_to_the_gateway_service():
    assert not render().of("Ingress")
    rendered = render(
        ["gateway.ingress.enabled=true", "gateway.ingress.host=gpu.example.com",
         "gateway.ingress.tlsSecret=gpu-tls"]
    )  # fmt: skip
    ingress = rendered.get("Ingress", GATEWAY)["spec"]
    assert ingress["tls"] == [{"hosts": ["gpu.example.com"], "secretName": "gpu-tls"}]
    rule = ingress["rules"][0]
    assert rule["host"] == "gpu.example.com"
    assert [p["path"] for p in rule["http"]["paths"]] == ["/v2"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": GATEWAY, "port": {"name": "http"}}
    admin = render(["gateway.ingress.enabled=true", "gateway.ingress.exposeAdmin=true"])
    paths = admin.get("Ingress", GATEWAY)["spec"]["rules"][0]["http"]["paths"]
    assert [p["path"] for p in paths] == ["/v2", "/admin/v1"]
    assert rendered.get("Service", GATEWAY)["spec"]["ports"][0]["name"] == "http"


def test_redis_runs_the_rendered_command_without_its_password_on_any_command_line(tmp_path):
    """The StatefulSet's own shell command, run with this machine's redis-server: the password
    works, it is nowhere in the process's argv, eviction is off, the append-only file is on, and
    the probe authenticates from the environment."""
    import shutil
    import signal
    import subprocess
    import time

    from tests.processes import free_port

    rendered = render()
    container = rendered.get("StatefulSet", REDIS)["spec"]["template"]["spec"]["containers"][0]
    (script,) = container["args"]
    assert "$(" not in script and "--requirepass" not in script
    assert {e["name"] for e in container["env"]} == {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    probe = container["readinessProbe"]["exec"]["command"]
    assert "-a" not in " ".join(probe).split()
    port, password = free_port(), "s3cret-pass-word"
    (tmp_path / "run").mkdir()
    (tmp_path / "data").mkdir()
    local = script.replace("/run/redis", str(tmp_path / "run")).replace(
        "/data", str(tmp_path / "data")
    )
    env = {"PATH": "/usr/bin:/bin:/usr/sbin", "REDIS_PASSWORD": password}
    server = subprocess.Popen(
        [*container["command"], f"{local} --port {port} --bind 127.0.0.1"], env=env,
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    cli = [shutil.which("redis-cli"), "-p", str(port)]
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([*cli, "ping"], capture_output=True, text=True).stdout.strip() not in (
            "PONG",
            "NOAUTH Authentication required.",
        ):
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)
        assert "NOAUTH" in subprocess.run([*cli, "ping"], capture_output=True, text=True).stdout
        authed = {"PATH": env["PATH"], "REDISCLI_AUTH": password}

        def get(name):
            return subprocess.run(
                [*cli, "config", "get", name], capture_output=True, text=True, env=authed
            ).stdout.split()

        assert get("maxmemory-policy") == ["maxmemory-policy", "noeviction"]
        assert get("appendonly") == ["appendonly", "yes"]
        probe_ok = subprocess.run(
            [*probe[:2], probe[2].replace("redis-cli", " ".join(cli))], env=authed
        )
        assert probe_ok.returncode == 0
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert (tmp_path / "run" / "auth.conf").stat().st_mode & 0o077 == 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def test_redis_statefulset_is_governed_by_a_headless_service():
    rendered = render()
    statefulset = rendered.get("StatefulSet", REDIS)
    governing = rendered.get("Service", statefulset["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert rendered.get("Service", REDIS)["spec"].get("clusterIP") != "None"
