"""The images as users build and run them: scripts/build-images with podman (and buildah) on a
Debian base, the worker and a user's handler image completing jobs through a gateway on the host
and through the gateway image, the operator image's entry points, all as non-root users."""

from __future__ import annotations

import json
import shutil
import textwrap
import urllib.error
import urllib.request

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.images.conftest import (
    BUILD_IMAGES,
    VERSION,
    build_images,
    image,
    wait_healthy,
    worker_env,
)
from tests.processes import ADMIN_KEY, CLIENT_KEY, GatewayProcess, free_port, handlerctl, http_json

TOKEN = "image-test-worker-token"


def test_images_carry_the_names_and_tags_the_chart_uses(podman, project_images):
    values = yaml.safe_load((REPO_ROOT / "charts/handler-operator/values.yaml").read_text())
    chart = {values[part]["image"]["repository"] for part in ("operator", "gateway", "worker")}
    assert chart == {
        image(name).rsplit(":", 1)[0]
        for name in ("handler-operator", "handler-gateway", "handler-worker")
    }
    for reference in project_images.values():
        assert podman("image", "exists", reference, check=False).returncode == 0, reference
        assert reference.endswith(f":{VERSION}")


@pytest.mark.parametrize(
    "name", ["handler-worker", "handler-gateway", "handler-operator", "examples-hello"]
)
def test_images_run_as_a_non_root_user(podman, project_images, name):
    ran = podman("run", "--rm", "--entrypoint", "id", project_images[name])
    assert ran.stdout.startswith("uid=10001("), ran.stdout
    user = podman("image", "inspect", "--format", "{{.Config.User}}", project_images[name])
    assert user.stdout.strip() == "10001:10001"


@pytest.fixture
def host_gateway(tmp_path):
    gateway = GatewayProcess("memory://", tmp_path).start()
    yield gateway.url, gateway.register
    gateway.stop()


@pytest.fixture
def gateway_container(tmp_path, podman, project_images, containers):
    """The gateway image on the host network, read-only root, keys mounted read-only."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "admin-keys").write_text(ADMIN_KEY + "\n")
    (keys / "client-keys").write_text(CLIENT_KEY + "\n")
    port = free_port()
    name = containers(
        "--read-only", "--volume", f"{keys}:/keys:ro,z", project_images["handler-gateway"],
        "--backend", "memory://", "--host", "127.0.0.1", "--port", str(port),
        "--admin-key-file", "/keys/admin-keys", "--api-key-file", "/keys/client-keys",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, podman, name)

    def register(endpoint: str, token: str) -> None:
        status, _ = http_json("PUT", f"{url}/admin/v1/endpoints/{endpoint}", {"workerToken": token})
        assert status in (200, 201)

    return url, register


@pytest.fixture(params=["host", "container"], ids=["gateway-on-host", "gateway-image"])
def gateway(request):
    return request.getfixturevalue(
        "host_gateway" if request.param == "host" else "gateway_container"
    )


def runsync(url: str, endpoint: str, payload: dict) -> dict:
    status, body = http_json(
        "POST", f"{url}/v2/{endpoint}/runsync", payload, key=CLIENT_KEY, timeout=120
    )
    assert status == 200, body
    return body


def test_a_handler_image_completes_a_job(gateway, containers, project_images):
    """examples/hello's Dockerfile on the worker image: the job runs in the container."""
    url, register = gateway
    register("hello", TOKEN)
    containers(*worker_env(url, "hello", TOKEN), project_images["examples-hello"])
    body = runsync(url, "hello", {"input": {"name": "container"}})
    assert body["status"] == "COMPLETED", body
    assert body["output"] == {"greeting": "Hello, container!"}


def test_a_worker_stops_cleanly_on_sigterm(podman, host_gateway, containers, project_images):
    url, register = host_gateway
    register("hello", TOKEN)
    name = containers(*worker_env(url, "hello", TOKEN), project_images["examples-hello"])
    assert runsync(url, "hello", {"input": {}})["status"] == "COMPLETED"
    podman("stop", "--time", "20", name)
    code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert code == "0"


def test_the_gateway_image_serves_metrics_and_refuses_bad_keys(gateway_container):
    url, register = gateway_container
    register("hello", TOKEN)
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert "handler_gateway_jobs_submitted_total" in response.read().decode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_json("POST", f"{url}/v2/hello/run", {"input": {}}, key="wrong-key")
    assert refused.value.code == 401


@pytest.mark.parametrize(
    ("entrypoint", "usage"),
    [(None, "usage: python -m handler_operator"), ("handlerctl", "Usage: handlerctl")],
    ids=["operator", "handlerctl"],
)
def test_the_operator_image_entry_points_answer_help(podman, project_images, entrypoint, usage):
    args = ["--entrypoint", entrypoint] if entrypoint else []
    ran = podman(
        "run",
        "--rm",
        "--network",
        "none",
        *args,
        project_images["handler-operator"],
        "--help",
        timeout=60,
    )
    assert usage in ran.stdout


PROJECT = {
    "app/__init__.py": "",
    "app/jobs.py": textwrap.dedent(
        '''
        """A project with one @remote function that needs a package from the index."""

        from handler_worker.remote import remote


        @remote(endpoint="slugs", dependencies=["python-slugify==8.0.4"])
        def slug(text):
            import os

            from slugify import slugify

            return {"slug": slugify(text), "uid": os.getuid()}
        '''
    ),
}


def test_handlerctl_build_makes_an_image_with_the_projects_code(
    tmp_path, podman, project_images, host_gateway, containers
):
    project = tmp_path / "project"
    for relative, text in PROJECT.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_text(text)
    reference = "localhost/slugs:test"
    built = handlerctl(
        "build",
        str(project),
        "--image",
        reference,
        "--builder",
        "podman",
        timeout=600,
        env=podman.config,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"image {reference} built" in built.stdout
    manifest = yaml.safe_load((project / ".handler_build/deploy/slugs.yaml").read_text())
    assert manifest["spec"]["image"] == reference

    url, register = host_gateway
    register("slugs", TOKEN)
    module = manifest["spec"]["handler"]["module"]
    containers(*worker_env(url, "slugs", TOKEN, HANDLER_MODULE=module), reference)
    job = {"function_name": "slug", "serialization_format": "json", "args": ["Hello Images!"]}
    body = runsync(url, "slugs", {"input": job})
    assert body["status"] == "COMPLETED", body
    assert body["output"] == {
        "success": True,
        "json_result": {"slug": "hello-images", "uid": 10001},
    }


def test_buildah_builds_with_the_same_script(podman, base_image):
    build_images(
        podman,
        "--builder",
        "buildah",
        "--tag",
        "buildah",
        "--base",
        base_image,
        "gateway",
        "--",
        "--pull=never",
    )
    ran = podman(
        "run",
        "--rm",
        "--network",
        "none",
        image("handler-gateway", "buildah"),
        "--help",
        timeout=60,
    )
    assert "--backend" in ran.stdout
    assert BUILD_IMAGES.exists() and shutil.which("buildah")
    assert (
        json.loads(podman("image", "inspect", image("handler-gateway", "buildah")).stdout)[0][
            "Config"
        ]["User"]
        == "10001:10001"
    )
