"""Pure builders: golden files per example CR, GPU variants, env precedence, spec checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from handler_operator import builders
from handler_operator.models import HandlerDeployment
from handler_operator.settings import OperatorSettings
from handler_protocol.models import EndpointConfig
from tests.conftest import EXAMPLES
from tests.operator.conftest import EXAMPLE_CRS, GOLDEN, load_cr, parse_cr

SETTINGS = OperatorSettings(
    gateway_url="http://handler-gateway.hops.svc:8080", gateway_admin_key="admin-key"
)


def render_all(path) -> str:
    hd = parse_cr(load_cr(path))
    objects = [
        builders.build_service_account(hd),
        builders.build_secret(hd, SETTINGS),
        builders.build_deployment(hd, SETTINGS, replicas=0),
    ]
    return yaml.safe_dump_all(objects, sort_keys=False, width=100)


@pytest.mark.parametrize("path", EXAMPLE_CRS, ids=lambda p: p.parent.name)
def test_golden(path):
    golden = GOLDEN / f"{path.parent.name}.yaml"
    rendered = render_all(path)
    if os.environ.get("UPDATE_GOLDEN") or not golden.exists():
        golden.write_text(rendered)
    assert rendered == golden.read_text(), f"run UPDATE_GOLDEN=1 pytest {__file__} to refresh"


def hd_with(spec_update: dict, namespace: str = "ml"):
    body = {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": "x"},
        "spec": {"handler": {"module": "handlers.x"}, **spec_update},
    }
    return parse_cr(body, namespace)


def pod_of(hd, settings=SETTINGS):
    return builders.build_deployment(hd, settings, replicas=1)["spec"]["template"]["spec"]


def env_of(hd) -> dict:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod_of(hd)["containers"][0]["env"]
    }


GPU_CASES = {
    "none": ({}, None, None, []),
    "zero": ({"gpu": {"count": 0}}, None, None, []),
    "nvidia": ({"gpu": {"count": 2}}, ("nvidia.com/gpu", "2"), None, ["nvidia.com/gpu"]),
    "nvidia product": (
        {"gpu": {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}},
        ("nvidia.com/gpu", "1"),
        ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
        ["nvidia.com/gpu"],
    ),
    "amd product": (
        {"gpu": {"count": 1, "vendor": "amd", "product": "MI300X"}},
        ("amd.com/gpu", "1"),
        ("amd.com/gpu.product-name", "MI300X"),
        ["amd.com/gpu"],
    ),
}


@pytest.mark.parametrize("case", GPU_CASES, ids=list(GPU_CASES))
def test_gpu_variants(case):
    resources, limit, affinity, tolerations = GPU_CASES[case]
    pod = pod_of(hd_with({"resources": resources}))
    limits = pod["containers"][0]["resources"].get("limits", {})
    if limit:
        assert limits[limit[0]] == limit[1]
    else:
        assert not any(k.endswith("/gpu") for k in limits)
    if affinity:
        term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        expression = term["nodeSelectorTerms"][0]["matchExpressions"][0]
        assert (expression["key"], expression["values"]) == (affinity[0], [affinity[1]])
    else:
        assert "affinity" not in pod
    assert [t["key"] for t in pod.get("tolerations", [])] == tolerations


def test_default_gpu_toleration_can_be_turned_off():
    settings = SETTINGS.model_copy(update={"gpu_tolerations": False})
    assert "tolerations" not in pod_of(hd_with({"resources": {"gpu": {"count": 1}}}), settings)


def test_runtime_env():
    env = env_of(hd_with({"jobs": {"concurrency": 4, "heartbeatIntervalSeconds": 2}}))
    assert env["HANDLER_MODULE"] == "handlers.x"
    assert env["HANDLER_CONCURRENCY"] == "4"
    assert (
        env["RUNPOD_WEBHOOK_GET_JOB"]
        == "http://handler-gateway.hops.svc:8080/v2/ml--x/job-take/$ID?"
    )
    assert env["RUNPOD_POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret = builders.secret_name(hd_with({}), SETTINGS)
    assert env["RUNPOD_AI_API_KEY"] == {"secretKeyRef": {"name": secret, "key": "token"}}
    assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"
    assert env["RUNPOD_PING_INTERVAL"] == "2000"


def test_user_env_comes_after_and_cannot_override_runtime_keys():
    env = env_of(hd_with({"env": [{"name": "MODEL", "value": "sdxl"}]}))
    assert env["MODEL"] == "sdxl"
    for reserved in ("RUNPOD_WEBHOOK_GET_JOB", "HANDLER_MODULE"):
        with pytest.raises(ValueError, match=f"env {reserved} is reserved"):
            hd_with({"env": [{"name": reserved, "value": "x"}]})


@pytest.mark.parametrize(
    ("timeout", "grace"),
    [(900, 930), (3570, 3600), (86400, 3600)],  # + 30 s, capped at an hour by default
)
def test_termination_grace_covers_the_execution_timeout_up_to_a_cap(timeout, grace):
    assert (
        pod_of(hd_with({"jobs": {"executionTimeoutSeconds": timeout}}))[
            "terminationGracePeriodSeconds"
        ]
        == grace
    )


def test_worker_pods_say_why_they_failed_and_wait_for_a_heartbeat():
    pod = pod_of(hd_with({"jobs": {"executionTimeoutSeconds": 900}}))
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["readinessGates"] == [{"conditionType": "handlerops.dev/heartbeat"}]


@pytest.mark.parametrize(
    ("resources", "secrets", "reasons"),
    [
        (
            {"gpu": {"vendor": "amd", "product": "NVIDIA-A100-SXM4-80GB"}},
            None,
            ["GpuProductMismatch"],
        ),
        (
            {"gpu": {"vendor": "nvidia", "product": "AMD-Instinct-MI300X"}},
            None,
            ["GpuProductMismatch"],
        ),
        ({"gpu": {"product": "NVIDIA-L4"}}, None, []),
        ({}, set(), ["ImagePullSecretMissing"]),
        ({}, {"ghcr-pull"}, []),
    ],
    ids=[
        "amd-with-nvidia-product",
        "nvidia-with-amd-product",
        "ok",
        "pull-secret-missing",
        "pull-secret-present",
    ],
)
def test_check_spec(resources, secrets, reasons):
    hd = hd_with({"resources": resources, "imagePullSecrets": [{"name": "ghcr-pull"}]})
    assert [p.reason for p in builders.check_spec(hd, secrets)] == reasons


def test_rendered_objects_validate_as_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in EXAMPLE_CRS:
        for document in yaml.safe_load_all(render_all(path)):
            kubernetes_validate.validate(document, "1.33", strict=True)


# -- engine: keda ---------------------------------------------------------------------------------

KEDA_SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "keda"


def keda_hd(**scaling):
    return hd_with(
        {
            "scaling": {
                "engine": "keda",
                "minReplicas": 0,
                "maxReplicas": 8,
                "targetQueuePerWorker": 3,
                "scaleToZeroAfterSeconds": 120,
                **scaling,
            }
        }
    )


@pytest.mark.parametrize(
    ("build", "schema"),
    [
        (lambda hd: builders.build_scaled_object(hd, SETTINGS), "scaledobject.schema.json"),
        (
            lambda hd: builders.build_trigger_authentication(hd, SETTINGS),
            "triggerauthentication.schema.json",
        ),
    ],
    ids=["ScaledObject", "TriggerAuthentication"],
)
@pytest.mark.parametrize("rates", [{}, {"maxScaleUpRate": 2, "maxScaleDownRate": 1}])
def test_keda_objects_validate_against_the_keda_schemas(build, schema, rates):
    document = build(keda_hd(**rates))
    jsonschema.validate(document, json.loads((KEDA_SCHEMAS / schema).read_text()))


def test_scaled_object_scales_on_the_gateway_queue():
    hd = keda_hd()
    spec = builders.build_scaled_object(hd, SETTINGS)["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 8, 120)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["url"] == (
        "http://handler-gateway.hops.svc:8080/admin/v1/endpoints/ml--x/queue"
    )
    assert trigger["metadata"]["valueLocation"] == "load"
    assert trigger["metadata"]["targetValue"] == "3"
    assert trigger["authenticationRef"] == {"name": "x-gateway"}
    auth = builders.build_trigger_authentication(hd, SETTINGS)["spec"]["secretTargetRef"]
    name = builders.secret_name(hd, SETTINGS)
    assert auth == [{"parameter": "token", "name": name, "key": "token"}]


@pytest.mark.parametrize(
    ("rates", "down", "up_policies"),
    [
        (
            {},
            {
                "stabilizationWindowSeconds": 30,
                "policies": [{"type": "Percent", "value": 50, "periodSeconds": 15}],
            },
            None,
        ),
        (
            {"maxScaleDownRate": 1},
            {"stabilizationWindowSeconds": 30, "selectPolicy": "Disabled"},
            None,
        ),
        ({"maxScaleDownRate": 0}, {"stabilizationWindowSeconds": 30}, None),
        (
            {"maxScaleUpRate": 3},
            None,
            [
                {"type": "Percent", "value": 200, "periodSeconds": 15},
                {"type": "Pods", "value": 1, "periodSeconds": 15},
            ],
        ),
    ],
)
def test_scaled_object_behavior_follows_the_builtin_rates(rates, down, up_policies):
    behavior = builders.build_scaled_object(keda_hd(**rates), SETTINGS)["spec"]["advanced"][
        "horizontalPodAutoscalerConfig"
    ]["behavior"]
    if down is not None:
        assert behavior["scaleDown"] == down
    assert behavior["scaleUp"].get("policies") == up_policies


def test_keda_deployment_leaves_replicas_to_keda():
    assert "replicas" not in builders.build_deployment(keda_hd(), SETTINGS, None)["spec"]
    assert builders.build_deployment(keda_hd(), SETTINGS, 2)["spec"]["replicas"] == 2


def test_owned_objects_point_at_the_cr_as_controller():
    cr = {
        "apiVersion": "handlerops.dev/v1alpha1",
        "kind": "HandlerDeployment",
        "metadata": {"name": "x", "namespace": "ml", "uid": "u-1"},
    }
    owned = builders.owned(builders.build_service_account(keda_hd()), cr)
    assert owned["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "handlerops.dev/v1alpha1",
            "kind": "HandlerDeployment",
            "name": "x",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


@pytest.mark.parametrize("length", [1, 62, 63, 64, 200])
def test_label_values_fit_63_characters(length):
    value = "a" * length
    shortened = builders.label_value(value)
    assert len(shortened) <= 63
    assert (shortened == value) is (length <= 63)
    assert builders.label_value(value) == shortened  # stable


def test_long_endpoint_ids_keep_distinct_labels():
    one, two = "n" * 40 + "--" + "a" * 30, "n" * 40 + "--" + "a" * 29 + "b"
    assert builders.label_value(one) != builders.label_value(two)


def test_the_longest_names_give_valid_labels():
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    body["metadata"] = {"name": "h" * 63, "namespace": "n" * 63}
    hd = HandlerDeployment.model_validate(body)
    for obj in builders.build_objects(hd, OperatorSettings(), 1):
        for source in (
            obj["metadata"],
            obj.get("spec", {}).get("template", {}).get("metadata", {}),
        ):
            assert all(len(v) <= 63 for v in (source.get("labels") or {}).values()), source


@pytest.mark.parametrize(("length", "accepted"), [(63, True), (64, False)])
def test_names_longer_than_a_label_are_refused(length, accepted):
    body = load_cr(EXAMPLES / "hello" / "handlerdeployment.yaml")
    body["metadata"] = {"name": "h" * length}
    if accepted:
        HandlerDeployment.model_validate(body)
    else:
        with pytest.raises(ValueError, match="at most 63 characters"):
            HandlerDeployment.model_validate(body)


GPU = {"resources": {"gpu": {"count": 1}}}
SHM_CASES = {
    "gpu default": (GPU, "2Gi"),
    "cpu default": ({}, None),
    "cpu on": ({"sharedMemory": {"enabled": True, "sizeLimit": "512Mi"}}, "512Mi"),
    "gpu off": ({**GPU, "sharedMemory": {"enabled": False}}, None),
    "gpu sized": ({**GPU, "sharedMemory": {"sizeLimit": "16Gi"}}, "16Gi"),
    "own mount": (
        {
            **GPU,
            "volumes": [{"name": "big", "emptyDir": {"medium": "Memory"}}],
            "volumeMounts": [{"name": "big", "mountPath": "/dev/shm"}],
        },
        None,
    ),
}


@pytest.mark.parametrize("case", SHM_CASES, ids=list(SHM_CASES))
def test_shared_memory_at_dev_shm(case):
    spec, size = SHM_CASES[case]
    pod = pod_of(hd_with(spec))
    ours = [v for v in pod.get("volumes", []) if v["name"] == builders.SHM_VOLUME]
    mounts = [
        m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"
    ]
    if size is None:
        assert not ours
        assert len(mounts) == (1 if case == "own mount" else 0)
    else:
        assert ours == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}]
        assert mounts == [{"name": "dshm", "mountPath": "/dev/shm"}]


STRATEGY_CASES = {
    "cpu default": ({}, {"maxSurge": 1, "maxUnavailable": 0}),
    "gpu default": (GPU, {"maxSurge": 0, "maxUnavailable": 1}),
    "gpu surge allowed": (
        {**GPU, "rollout": {"maxSurge": 1}},
        {"maxSurge": 1, "maxUnavailable": 1},
    ),
    "gpu no unavailable": (
        {**GPU, "rollout": {"maxUnavailable": 0}},
        {"maxSurge": 1, "maxUnavailable": 0},
    ),
    "cpu no surge": ({"rollout": {"maxSurge": 0}}, {"maxSurge": 0, "maxUnavailable": 1}),
    "both set": (
        {"rollout": {"maxSurge": 2, "maxUnavailable": 3}},
        {"maxSurge": 2, "maxUnavailable": 3},
    ),
    "recreate": ({**GPU, "rollout": {"strategy": "Recreate"}}, None),
}


@pytest.mark.parametrize("case", STRATEGY_CASES, ids=list(STRATEGY_CASES))
def test_rollout_strategy(case):
    spec, rolling = STRATEGY_CASES[case]
    strategy = builders.build_deployment(hd_with(spec), SETTINGS, replicas=1)["spec"]["strategy"]
    if rolling is None:
        assert strategy == {"type": "Recreate"}
    else:
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": rolling}


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"maxSurge": 0, "maxUnavailable": 0}, "cannot both be 0"),
        ({"strategy": "Recreate", "maxSurge": 1}, "apply to RollingUpdate only"),
        ({"strategy": "Blue"}, "Input should be 'RollingUpdate' or 'Recreate'"),
    ],
)
def test_bad_rollouts_are_refused(rollout, message):
    with pytest.raises(ValueError, match=message):
        hd_with({"rollout": rollout})


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("ghcr.io/acme/app:1.0", "IfNotPresent"),
        ("ghcr.io/acme/app", "Always"),
        ("ghcr.io/acme/app:latest", "Always"),
        ("localhost:5000/app", "Always"),
        ("localhost:5000/app:2", "IfNotPresent"),
        ("ghcr.io/acme/app@sha256:" + "a" * 64, "IfNotPresent"),
        ("ghcr.io/acme/app:latest@sha256:" + "b" * 64, "IfNotPresent"),
    ],
)
def test_image_pull_policy_is_derived_as_kubernetes_does(image, policy):
    container = pod_of(hd_with({"image": image}))["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == (image, policy)
    explicit = pod_of(hd_with({"image": image, "imagePullPolicy": "Never"}))["containers"][0]
    assert explicit["imagePullPolicy"] == "Never"


@pytest.mark.parametrize(
    "image", ["Ghcr.io/acme/App:1", "acme/app:", "acme app", "acme/app@sha256:short", "-acme/app"]
)
def test_malformed_image_references_are_refused(image):
    with pytest.raises(ValueError, match="should match pattern"):
        hd_with({"image": image})


def test_a_new_default_field_does_not_change_the_spec_hash():
    hd = hd_with({})
    plain = builders.spec_hash(hd)
    assert builders.spec_hash(hd_with({"sharedMemory": {}, "rollout": {}})) == plain
    assert builders.spec_hash(hd_with({"rollout": {"strategy": "Recreate"}})) != plain


def node_affinity(pod) -> dict:
    return pod["affinity"]["nodeAffinity"]


def test_a_list_of_products_is_required_any_of_and_preferred_in_order():
    products = ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L40S"]
    hd = hd_with({"resources": {"gpu": {"count": 1, "products": products}}})
    affinity = node_affinity(pod_of(hd))
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": products}
    ]
    preferred = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [(p["weight"], p["preference"]["matchExpressions"][0]["values"]) for p in preferred] == [
        (100, [products[0]]),
        (90, [products[1]]),
        (80, [products[2]]),
    ]
    assert builders.gpu_summary(hd) == "1x NVIDIA-H100-80GB-HBM3 (+2)"


def test_the_users_affinity_keeps_its_terms_and_gets_the_product_in_each():
    zones = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
    spot = {"key": "spot", "operator": "DoesNotExist"}
    anti = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    user = {
        **anti,
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zones]}, {"matchExpressions": [spot]}]
            }
        },
    }
    spec = {"affinity": user, "resources": {"gpu": {"count": 1, "product": "NVIDIA-L4"}}}
    affinity = pod_of(hd_with(spec))["affinity"]
    product = {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]}
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [zones, product]},
        {"matchExpressions": [spot, product]},
    ]
    assert affinity["podAntiAffinity"] == anti["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in affinity["nodeAffinity"]
    assert user["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0] == {"matchExpressions": [zones]}, "the spec is not modified"


def test_affinity_and_spread_pass_through_without_gpus():
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "x"}}}]  # fmt: skip
    affinity = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": []}}
    pod = pod_of(hd_with({"affinity": affinity, "topologySpreadConstraints": spread}))
    assert pod["affinity"] == affinity
    assert pod["topologySpreadConstraints"] == spread


def test_foreign_products_in_the_list_are_reported():
    hd = hd_with({"resources": {"gpu": {"count": 1, "products": ["NVIDIA-L4", "MI300X"]}}})
    assert [p.reason for p in builders.check_spec(hd)] == ["GpuProductMismatch"]


@pytest.mark.parametrize(("minimum", "expected"), [(0, False), (1, True), (3, True)])
def test_a_disruption_budget_only_for_endpoints_that_keep_workers(minimum, expected):
    import kubernetes_validate

    hd = hd_with({"scaling": {"minReplicas": minimum, "maxReplicas": 4}})
    budgets = [
        o
        for o in builders.build_objects(hd, SETTINGS, minimum)
        if o["kind"] == "PodDisruptionBudget"
    ]
    assert bool(budgets) is expected
    if expected:
        (budget,) = budgets
        assert budget["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": builders.selector_labels(hd)},
        }
        kubernetes_validate.validate(budget, "1.33", strict=True)


def with_uid(uid: str):
    hd = hd_with({})
    return hd.model_copy(update={"metadata": {**hd.metadata, "uid": uid}})


def test_the_worker_token_is_computed_and_named_after_itself():
    """Same CR, same key: the same token and Secret (nothing to read back); a re-created CR or
    a new admin key: a new token in a Secret of a new name (created, never updated)."""
    first, again, recreated = with_uid("u-1"), with_uid("u-1"), with_uid("u-2")
    other_key = OperatorSettings(gateway_admin_key="another-admin-key")
    token = builders.worker_token(first, SETTINGS)
    assert len(token) == 43 and token == builders.worker_token(again, SETTINGS)
    assert builders.secret_name(first, SETTINGS) == builders.secret_name(again, SETTINGS)
    for changed, settings in ((recreated, SETTINGS), (first, other_key)):
        assert builders.worker_token(changed, settings) != token
        assert builders.secret_name(changed, settings) != builders.secret_name(first, SETTINGS)
    secret = builders.build_secret(first, SETTINGS)
    assert secret["stringData"] == {"token": token}
    assert secret["metadata"]["name"].startswith("x-worker-token-")


def test_a_deployment_says_which_secret_its_workers_read():
    hd = with_uid("u-1")
    deployment = builders.build_deployment(hd, SETTINGS, replicas=1)
    assert builders.references_secret(deployment, builders.secret_name(hd, SETTINGS))
    assert not builders.references_secret(
        deployment, builders.secret_name(with_uid("u-2"), SETTINGS)
    )
    assert not builders.references_secret(None, builders.secret_name(hd, SETTINGS))


@pytest.mark.parametrize(
    ("jobs", "limits"),
    [
        ({}, {}),
        (
            {"maxQueued": 500, "maxInputBytes": 1048576},
            {"maxQueued": 500, "maxInputBytes": 1048576},
        ),
    ],
    ids=["unbounded", "limits"],
)
def test_the_gateway_is_told_the_jobs_defaults_and_the_limits_set(jobs, limits):
    registration = builders.build_endpoint_registration(hd_with({"jobs": jobs}), "t" * 20)
    assert {
        k: registration[k] for k in ("maxQueued", "maxInputBytes") if k in registration
    } == limits
    EndpointConfig(**registration)  # what the gateway accepts


def test_the_gateway_is_told_who_may_call_and_how_often():
    hd = hd_with(
        {
            "handler": {"module": "handler_worker.generic"},
            "access": {"rateLimit": {"requestsPerSecond": 5, "burst": 10}},
        }
    )
    keys = [{"id": "ml/keys/a", "sha256": "a" * 64, "scope": "endpoint"}]
    registration = builders.build_endpoint_registration(hd, "t" * 20, keys, ["old" * 8])
    config = EndpointConfig(**registration)
    assert config.runsCallerCode and config.namespace == "ml"
    assert config.rateLimit.burst == 10 and config.clientKeys[0].id == "ml/keys/a"
    assert len(config.workerTokenSha256) == 2  # the new token and the one being retired
    assert "old" * 8 not in config.model_dump_json()


def test_the_gateway_is_told_the_endpoints_retries_on_error():
    retry = {"maxAttempts": 3, "backoffSeconds": 2, "errorTypes": ["OutOfMemoryError"]}
    hd = hd_with({"handler": {"module": "handler"}, "jobs": {"retryOnError": retry}})
    config = EndpointConfig(**builders.build_endpoint_registration(hd, "t" * 20))
    assert config.retryOnError.maxAttempts == 3
    assert config.retryOnError.errorTypes == ["OutOfMemoryError"]
    plain = hd_with({"handler": {"module": "handler"}})
    assert "retryOnError" not in builders.build_endpoint_registration(plain, "t" * 20)


def secret(name: str, data: dict[str, str], label: str = "endpoint") -> dict:
    labels = {builders.CLIENT_KEYS_LABEL: label}
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"metadata": {"name": name, "labels": labels}, "data": encoded}


KEY = "k-0123456789abcdef-"  # long enough to be a client key


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_client_keys_come_from_the_named_secrets_and_the_namespace_ones():
    hd = hd_with({"access": {"secrets": [{"name": "team"}, {"name": "ci", "keys": ["bot"]}]}})
    secrets = [
        secret("team", {"alice": KEY + "alice\n"}),  # a trailing newline is no part of it
        secret("ci", {"bot": KEY + "bot", "other": KEY + "other"}),
        secret("everyone", {"k": KEY + "ns"}, label="namespace"),
        secret("unrelated", {"k": KEY + "unrelated"}),  # named by others only
    ]
    keys, problems = builders.build_client_keys(hd, secrets)
    assert problems == []
    assert keys == [
        {"id": "ml/team/alice", "sha256": sha(KEY + "alice"), "scope": "endpoint"},
        {"id": "ml/ci/bot", "sha256": sha(KEY + "bot"), "scope": "endpoint"},
        {"id": "ml/everyone/k", "sha256": sha(KEY + "ns"), "scope": "namespace"},
    ]


def test_a_value_too_short_to_be_a_key_is_not_registered():
    hd = hd_with({"access": {"secrets": [{"name": "team"}]}})
    keys, problems = builders.build_client_keys(hd, [secret("team", {"user": "admin"})])
    assert keys == [] and [p.reason for p in problems] == ["AccessKeyTooShort"]
    assert "admin" not in problems[0].message


def test_a_missing_access_secret_or_key_is_a_problem_with_a_reason():
    hd = hd_with({"access": {"secrets": [{"name": "gone"}, {"name": "ci", "keys": ["nope"]}]}})
    keys, problems = builders.build_client_keys(hd, [secret("ci", {"bot": KEY})])
    assert keys == []
    assert [p.reason for p in problems] == ["AccessSecretMissing", "AccessSecretKeyMissing"]
    assert "'gone'" in problems[0].message and "'nope'" in problems[1].message
    assert "not labelled handlerops.dev/client-keys" in problems[0].message


@pytest.mark.parametrize(
    ("status", "rotation", "expected"),
    [
        ({}, "", []),  # never registered
        ({"endpointId": "ml--x"}, "", []),  # registered before rotations existed: "" is current
        ({"endpointId": "ml--x"}, "1", [""]),  # ... and now rotated
        ({"workerTokenRotation": "1"}, "2", ["1"]),
        ({"workerTokenRotation": "2", "retiringWorkerTokenRotations": ["1"]}, "3", ["1", "2"]),
        ({"workerTokenRotation": "2", "retiringWorkerTokenRotations": ["1"]}, "1", ["2"]),  # back
        (
            {"workerTokenRotation": "4", "retiringWorkerTokenRotations": ["1", "2", "3"]},
            "5",
            ["2", "3", "4"],  # at most three: the oldest goes
        ),
    ],
)
def test_retiring_rotations(status, rotation, expected):
    assert builders.retiring_rotations(status, rotation) == expected


@pytest.mark.parametrize(
    ("module", "runs"),
    [("handler_worker.generic", True), ("handlers.x", False), ("handler_worker.generic2", False)],
)
def test_only_the_generic_handler_runs_caller_code(module, runs):
    assert builders.runs_caller_code(hd_with({"handler": {"module": module}})) is runs


@pytest.mark.parametrize("declared", [True, False])
def test_a_module_may_say_whether_it_runs_caller_code(declared):
    spec = {"handler": {"module": "handlers.mine"}, "access": {"runsCallerCode": declared}}
    assert builders.runs_caller_code(hd_with(spec)) is declared


def test_a_rotation_makes_a_new_token_in_a_new_secret_and_the_old_one_stays_computable():
    hd = with_uid("u-1")
    body = hd.model_dump()
    body["spec"]["access"] = {"workerTokenRotation": "2"}
    rotated = HandlerDeployment.model_validate(body)
    assert builders.worker_token(rotated, SETTINGS) != builders.worker_token(hd, SETTINGS)
    assert builders.worker_token(rotated, SETTINGS, rotation="") == builders.worker_token(
        hd, SETTINGS
    )
    assert builders.secret_name(rotated, SETTINGS) != builders.secret_name(hd, SETTINGS)
