"""`handlerctl` commands in-process (typer's runner): render, crd, settings precedence, input
errors and exit codes; job commands against a real gateway subprocess."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from handler_operator import builders, crds
from handler_operator.settings import OperatorSettings
from handlerctl import commands as cli
from tests.conftest import EXAMPLES, REPO_ROOT
from tests.processes import CLIENT_KEY, GatewayProcess, free_port

runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(cli.app, list(args), env=env)


def test_crd_prints_the_committed_crd():
    result = invoke("crd")
    assert result.exit_code == 0
    assert result.stdout == (REPO_ROOT / "crds" / "handlerdeployments.yaml").read_text()
    assert result.stdout == crds.render_crd()


@pytest.mark.parametrize("example", ["hello", "sdxl", "streaming", "typed"])
def test_render_prints_what_the_operator_applies(example):
    path = EXAMPLES / example / "handlerdeployment.yaml"
    result = invoke("render", str(path))
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects][:3] == ["ServiceAccount", "Secret", "Deployment"]
    body = yaml.safe_load(path.read_text())
    hd = cli.HandlerDeployment.model_validate(
        {**body, "metadata": {"namespace": "default", **body["metadata"]}}
    )
    settings = OperatorSettings()
    expected = builders.build_objects(hd, settings, builders.initial_replicas(hd))
    # What only the live CR and the operator's key decide is shown as a placeholder.
    secret = objects[1]
    assert secret["metadata"]["name"] == f"{hd.name}-worker-token-<fingerprint>"
    assert secret["stringData"] == {"token": "<computed by the operator>"}
    shown = (
        json.dumps(objects)
        .replace(f"{hd.name}-worker-token-<fingerprint>", builders.secret_name(hd, settings))
        .replace("<computed by the operator>", builders.worker_token(hd, settings))
    )
    assert json.loads(shown) == expected


def test_render_keda_engine_adds_the_keda_objects(tmp_path):
    body = yaml.safe_load((EXAMPLES / "hello" / "handlerdeployment.yaml").read_text())
    body["spec"]["scaling"]["engine"] = "keda"
    path = tmp_path / "keda.yaml"
    path.write_text(yaml.safe_dump(body))
    kinds = [o["kind"] for o in yaml.safe_load_all(invoke("render", str(path)).stdout)]
    assert kinds == [
        "ServiceAccount",
        "Secret",
        "Deployment",
        "TriggerAuthentication",
        "ScaledObject",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: Deployment\nmetadata: {name: x}\n", "not a HandlerDeployment"),
        (
            "apiVersion: handlerops.dev/v1alpha1\nkind: HandlerDeployment\nmetadata: {name: x}\n"
            "spec: {handler: {module: h}, scaling: {minReplicas: 5, maxReplicas: 1}}\n",
            "maxReplicas",
        ),
        ("a: [unclosed\n", "while parsing"),
    ],
    ids=["wrong-kind", "bad-spec", "bad-yaml"],
)
def test_render_rejects_bad_files_with_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = invoke("render", str(path))
    assert result.exit_code == 2
    assert message in result.output


def test_settings_come_from_flags_then_env_then_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('url = "http://from-file:1"\napi_key = "file-key"\n')
    monkeypatch.setenv(cli.CONFIG_ENV, str(config))
    monkeypatch.delenv(cli.URL_ENV, raising=False)
    monkeypatch.delenv(cli.KEY_ENV, raising=False)
    from_file = cli.Settings(None, None, cli.Output.json, None)
    assert (from_file.url, from_file.api_key) == ("http://from-file:1", "file-key")
    monkeypatch.setenv(cli.URL_ENV, "http://from-env:2")
    from_env = cli.Settings(None, None, cli.Output.json, None)
    assert (from_env.url, from_env.api_key) == ("http://from-env:2", "file-key")
    from_flag = cli.Settings("http://flag:3", "flag-key", cli.Output.json, None)
    assert (from_flag.url, from_flag.api_key) == ("http://flag:3", "flag-key")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "ep"], "give exactly one of --input, --input-file or --inputs-jsonl"),
        (["run", "ep", "--input", "{nope"], "--input is not JSON"),
        (["run", "ep", "--input-file", "/no/such/file.json"], "No such file or directory"),
        (["--config", "/no/such.toml", "endpoints"], "config file /no/such.toml not found"),
    ],
    ids=["no-input", "bad-json", "missing-file", "missing-config"],
)
def test_bad_input_exits_2_with_a_message(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_stream_takes_one_job(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"a": 1}\n{"a": 2}\n')
    result = invoke("run", "ep", "--inputs-jsonl", str(jobs), "--stream")
    assert result.exit_code == 2 and "--stream takes exactly one job" in result.output


def test_jsonl_errors_name_the_line(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"a": 1}\n\n{oops\n')
    result = invoke("run", "ep", "--inputs-jsonl", str(jobs))
    assert result.exit_code == 2 and f"{jobs}:3: not JSON" in result.output


@pytest.mark.parametrize(
    ("value", "request_"),
    [
        ({"name": "x"}, {"input": {"name": "x"}}),
        ({"input": {"name": "x"}}, {"input": {"name": "x"}}),
        ({"input": 1, "webhook": "http://h"}, {"input": 1, "webhook": "http://h"}),
        ({"input": 1, "other": 2}, {"input": {"input": 1, "other": 2}}),
        ([1, 2], {"input": [1, 2]}),
    ],
)
def test_inputs_and_whole_requests_are_both_accepted(value, request_):
    assert cli.as_request(value) == request_


def test_unreachable_gateway_exits_3():
    result = invoke("--url", f"http://127.0.0.1:{free_port()}", "health", "ep")
    assert result.exit_code == 3 and "cannot reach the gateway" in result.output


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess("memory://", tmp_path_factory.mktemp("gateway")).start()
    process.register("ep", "cli-worker-token-0123456789")
    yield process
    process.stop()


def test_job_commands_against_a_gateway(gateway):
    base = ["--url", gateway.url, "--api-key", CLIENT_KEY]
    submitted = invoke(*base, "run", "ep", "--input", '{"n": 1}')
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(submitted.stdout)
    assert job["status"] == "IN_QUEUE"
    status = json.loads(invoke(*base, "status", "ep", job["id"]).stdout)
    assert status["status"] == "IN_QUEUE"
    assert json.loads(invoke(*base, "cancel", "ep", job["id"]).stdout)["status"] == "CANCELLED"
    assert json.loads(invoke(*base, "retry", "ep", job["id"]).stdout)["status"] == "IN_QUEUE"
    table = invoke(*base, "-o", "table", "status", "ep", job["id"])
    assert "IN_QUEUE" in table.stdout and job["id"][:8] in table.stdout
    health = json.loads(invoke(*base, "health", "ep").stdout)
    assert health["jobs"]["inQueue"] == 1


def test_jobs_lists_an_endpoints_jobs_newest_first_across_pages(gateway):
    base = ["--url", gateway.url, "--api-key", CLIENT_KEY]
    ids = [json.loads(invoke(*base, "run", "ep", "--input", "{}").stdout)["id"] for _ in range(3)]
    listed = json.loads(invoke(*base, "jobs", "ep", "--limit", "3").stdout)
    assert [job["id"] for job in listed] == ids[::-1]
    queued = json.loads(invoke(*base, "jobs", "ep", "--status", "IN_QUEUE").stdout)
    assert {job["id"] for job in queued} >= set(ids)
    table = invoke(*base, "-o", "table", "jobs", "ep", "--limit", "1")
    assert table.exit_code == 0 and "createdAt" in table.stdout
    wrong = invoke(*base, "jobs", "ep", "--status", "DONE")
    assert wrong.exit_code == 3 and "status must be one of" in wrong.output


def test_wait_timeout_reports_unfinished_jobs_and_exits_1(gateway):
    base = ["--url", gateway.url, "--api-key", CLIENT_KEY]
    result = invoke(*base, "run", "ep", "--input", "{}", "--wait", "--timeout", "0.5")
    assert result.exit_code == 1
    assert "IN_QUEUE: not finished in time" in result.output


def test_admin_commands_need_the_admin_key(gateway):
    from tests.processes import ADMIN_KEY

    denied = invoke("--url", gateway.url, "--api-key", CLIENT_KEY, "endpoints")
    assert denied.exit_code == 3 and "gateway said 403" in denied.output
    listed = invoke("--url", gateway.url, "--api-key", ADMIN_KEY, "endpoints")
    assert listed.exit_code == 0
    assert json.loads(listed.stdout)[0]["endpoint"] == "ep"
    assert (
        json.loads(invoke("--url", gateway.url, "--api-key", ADMIN_KEY, "dlq", "list", "ep").stdout)
        == []
    )
    replay = invoke("--url", gateway.url, "--api-key", ADMIN_KEY, "dlq", "replay", "ep")
    assert json.loads(replay.stdout) == {"replayed": []}
    wrong = invoke("--url", gateway.url, "--api-key", "wrong", "health", "ep")
    assert wrong.exit_code == 3 and "gateway said 401" in wrong.output


def test_dev_table_shows_queue_workers_decision_and_crash():
    from rich.console import Console

    from handlerctl.runners import Snapshot

    snapshot = Snapshot(
        "default--hello",
        "http://127.0.0.1:8080",
        "key-1",
        figures={"inQueue": 7, "inProgress": 2},
        health={"jobs": {"completed": 40, "failed": 1, "retried": 3}},
        worker_rows=[
            ("hello-1", "busy", 101, 12.0, 1, "loading weights 3/4"),
            ("hello-2", "starting", 102, 0.4, 0, ""),
        ],
        replicas=3,
        decision="ScaleUp: 2 -> 3 workers",
        crash="hello-0 exited with code 4: Importing handler module 'handler' failed",
        crash_retry_in=2.0,
    )
    console = Console(record=True, width=160)
    console.print(cli.dev_view([snapshot]))
    text = console.export_text()
    for expected in (
        "default--hello",
        "key-1",
        "2 / 3 wanted",
        "busy:1 starting:1",
        "40",
        "ScaleUp: 2 -> 3 workers",
        "worker crashed (next start in 2 s)",
        "Importing handler module 'handler' failed",
        "hello-1",
        "loading weights 3/4",
    ):
        assert expected in text, expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["run", "ep", "--input", "{}", "-o", "table"],
            ["-o", "table", "run", "ep", "--input", "{}"],
        ),
        (
            ["--url", "http://x", "run", "ep", "--api-key=k", "--wait"],
            ["--url", "http://x", "--api-key=k", "run", "ep", "--wait"],
        ),
        (["dlq", "list", "ep", "--output", "json"], ["--output", "json", "dlq", "list", "ep"]),
        (["run", "ep", "--", "-o", "x"], ["run", "ep", "--", "-o", "x"]),  # after --: arguments
        (["--version"], ["--version"]),
        (["-o", "table", "health", "ep"], ["-o", "table", "health", "ep"]),
    ],
)
def test_global_options_may_follow_the_command(argv, expected):
    assert cli.hoist_global_options(argv) == expected


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("handlerctl ")


def test_shell_completion_is_offered():
    assert "--install-completion" in invoke("--help").stdout


def test_an_invalid_handler_deployment_is_said_plainly(tmp_path):
    """Field paths and plain messages, no pydantic documentation links."""
    bad = tmp_path / "hd.yaml"
    bad.write_text(
        "apiVersion: handlerops.dev/v1alpha1\nkind: HandlerDeployment\nmetadata: {name: x}\n"
        "spec:\n  handler: {module: handler}\n  scaling: {maxReplicas: 5000, minReplicas: -1}\n"
    )
    for args in (("dev", str(EXAMPLES / "hello"), "-f", str(bad)), ("render", str(bad))):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        message = " ".join(result.stderr.split())
        assert "spec.scaling.maxReplicas: Input should be less than or equal to 1000" in message
        assert "spec.scaling.minReplicas" in message
        assert "pydantic.dev" not in message


@pytest.mark.parametrize(
    ("busy", "queued", "said"),
    [
        (2, 0, "draining: waiting for 2 busy worker(s) (Ctrl-C again to stop now)"),
        (0, 0, "draining: no job running"),
        (1, 5, "waiting for 1 busy worker(s) (Ctrl-C again to stop now); 5 queued job(s) will"),
    ],
)
def test_a_drain_says_whom_it_waits_for_and_what_it_abandons(busy, queued, said):
    from handlerctl.runners import drain_progress

    assert said in drain_progress(busy, queued)


@pytest.mark.parametrize(
    ("relative", "watched"),
    [
        ("handler.py", True),
        ("pkg/models.py", True),
        (".venv/lib/site.py", False),
        ("pkg/__pycache__/x.py", False),
        ("notes.txt", False),
    ],
)
def test_reload_watches_the_projects_python_sources_only(tmp_path, relative, watched):
    """Under a project that itself lives in a hidden directory (~/.cache/...), too."""
    import watchfiles

    from handlerctl.runners import SourceFilter

    root = tmp_path / ".cache" / "project"
    check = SourceFilter(root)
    assert check(watchfiles.Change.modified, str(root / relative)) is watched


@pytest.mark.parametrize(
    ("worker", "follow", "expected"),
    [
        (
            None,
            False,
            "kubectl logs -n ml -c worker -l handlerops.dev/endpoint=ml--sdxl --prefix "
            "--max-log-requests 50 --tail=100",
        ),
        ("sdxl-7c9-abcde", True, "kubectl logs -n ml -c worker sdxl-7c9-abcde --tail=100 --follow"),
    ],
)
def test_logs_in_a_cluster_come_from_the_worker_pods(worker, follow, expected):
    assert " ".join(cli.kubectl_logs_command("ml--sdxl", worker, follow, 100)) == expected
