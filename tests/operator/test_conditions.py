"""Conditions: the pure setter, crash-loop messages and capacity waits, from pod statuses."""

from __future__ import annotations

import pytest

from handler_operator import conditions


def test_transition_time_moves_only_when_status_changes():
    first = conditions.set_condition([], "Ready", True, "A", "m", "t1", 1)
    same = conditions.set_condition(first, "Ready", True, "B", "m2", "t2", 2)
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    flipped = conditions.set_condition(same, "Ready", False, "C", "m3", "t3", 3)
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "False"


def test_conditions_keep_a_stable_order():
    result = conditions.set_condition([], "QueueHealthy", None, "X", "", "t")
    result = conditions.set_condition(result, "Ready", True, "Y", "", "t")
    assert [c["type"] for c in result] == ["Ready", "QueueHealthy"]
    assert result[1]["status"] == "Unknown"


def pod(state=None, last=None, phase="Running", pod_conditions=None):
    status = {"name": "worker", "state": state or {}, "lastState": last or {}}
    return {
        "metadata": {"name": "p"},
        "status": {
            "phase": phase,
            "containerStatuses": [status],
            "conditions": pod_conditions or [],
        },
    }


@pytest.mark.parametrize(
    ("pod_status", "expected"),
    [
        (pod(state={"running": {}}), None),
        (pod(last={"terminated": {"exitCode": 0}}), None),
        (
            pod(
                last={
                    "terminated": {
                        "exitCode": 5,
                        "message": "Module 'x' does not export a 'handler' function",
                    }
                },
                state={"waiting": {"reason": "CrashLoopBackOff"}},
            ),
            "Module 'x' does not export a 'handler' function",
        ),
        (
            pod(state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            "worker exited with code 137 (OOMKilled)",
        ),
        (
            pod(state={"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}),
            "pull access denied",
        ),
    ],
    ids=["running", "clean-exit", "loader-error", "oom", "image-pull"],
)
def test_crash_message(pod_status, expected):
    assert conditions.crash_message(pod_status) == expected


@pytest.mark.parametrize(
    ("pod_status", "reason"),
    [
        (pod(state={"running": {}}), None),
        (
            pod(
                last={"terminated": {"exitCode": 3, "message": "Cannot import"}},
                state={"waiting": {"reason": "CrashLoopBackOff"}},
            ),
            "HandlerCrashLoop",
        ),
        (pod(state={"waiting": {"reason": "CrashLoopBackOff"}}), "HandlerCrashLoop"),
        (pod(state={"waiting": {"reason": "ErrImagePull", "message": "x"}}), "ErrImagePull"),
        (
            pod(state={"waiting": {"reason": "ImagePullBackOff", "message": "x"}}),
            "ImagePullBackOff",
        ),
        (
            # An image that never pulled, after a restart: the pull is the problem, not the code.
            pod(
                last={"terminated": {"exitCode": 1}},
                state={"waiting": {"reason": "ImagePullBackOff", "message": "x"}},
            ),
            "ImagePullBackOff",
        ),
        (
            pod(state={"waiting": {"reason": "CreateContainerConfigError", "message": "no key"}}),
            "CreateContainerConfigError",
        ),
    ],
    ids=["running", "crash", "crash-no-last", "pull", "pull-backoff", "pull-after-exit", "config"],
)
def test_pod_problem_keeps_the_kubelets_reason(pod_status, reason):
    problem = conditions.pod_problem(pod_status)
    assert (problem[0] if problem else None) == reason


def test_unschedulable_message():
    waiting = pod(
        phase="Pending",
        pod_conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "Insufficient nvidia.com/gpu",
            }
        ],
    )
    assert (
        conditions.unschedulable_message(waiting)
        == "p waits for capacity: Insufficient nvidia.com/gpu"
    )
    assert conditions.unschedulable_message(pod(phase="Pending")) is None


def _ready(reason: str, status: str = "True") -> list[dict]:
    return [{"type": "Ready", "status": status, "reason": reason, "observedGeneration": 3}]


REJECTED = {
    "conditions": [
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": 'pods "w-1" is forbidden: violates PodSecurity "restricted:latest"',
        }
    ]
}


@pytest.mark.parametrize(
    ("current", "deployment_status", "desired", "expected"),
    [
        (_ready("WorkersNotReady"), {"readyReplicas": 2}, 2, ("True", "WorkersReady")),
        (_ready("WorkersReady"), {"readyReplicas": 0}, 1, ("True", "WorkersNotReady")),
        (_ready("WorkersReady"), {}, 0, ("True", "ScaledToZero")),
        (_ready("ScaledToZero"), {"readyReplicas": 1}, 0, ("True", "WorkersReady")),
        (_ready("WorkersNotReady"), REJECTED, 1, ("False", "FailedCreate")),
        (_ready("FailedCreate", "False"), {"readyReplicas": 1}, 1, ("True", "WorkersReady")),
        # The reconcile's own verdicts are not the Deployment's to change.
        (_ready("InvalidSpec", "False"), {"readyReplicas": 1}, 1, ("False", "InvalidSpec")),
        (_ready("GatewayUnavailable", "False"), REJECTED, 1, ("False", "GatewayUnavailable")),
    ],
    ids=["ready", "not-ready", "zero", "from-zero", "rejected", "recovered", "invalid", "gateway"],
)
def test_ready_follows_the_worker_deployment(current, deployment_status, desired, expected):
    result = conditions.ready_from_workload(
        current, deployment_status, desired, "2026-01-01T00:00:00Z"
    )
    ready = next(c for c in result if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == expected
    assert ready["observedGeneration"] == 3
    if expected[1] == "FailedCreate":
        assert "violates PodSecurity" in ready["message"]


def test_ready_is_left_alone_before_the_first_reconcile():
    assert conditions.ready_from_workload([], {"readyReplicas": 1}, 1, "now") == []


def test_merge_replaces_by_type_and_keeps_the_others():
    live = [
        conditions.condition(conditions.READY, True, "WorkersReady", "1/1", "t0", 3),
        conditions.condition(conditions.SCALING, True, "Stable", "ok", "t0", 3),
    ]
    update = conditions.condition(
        conditions.HANDLER_HEALTHY, False, "HandlerCrashLoop", "x", "t1", 3
    )
    merged = conditions.merge_conditions(live, [update])
    assert [c["type"] for c in merged] == [
        conditions.READY,
        conditions.HANDLER_HEALTHY,
        conditions.SCALING,
    ]
    assert merged[0] == live[0] and merged[2] == live[1]


@pytest.mark.parametrize(("status", "kept"), [(True, True), (False, False)])
def test_merge_keeps_the_transition_time_while_the_status_holds(status, kept):
    live = [conditions.condition(conditions.READY, True, "WorkersReady", "1/1", "t0", 1)]
    update = conditions.condition(conditions.READY, status, "WorkersNotReady", "0/1", "t1", 2)
    (merged,) = conditions.merge_conditions(live, [update])
    assert merged["lastTransitionTime"] == ("t0" if kept else "t1")
    assert merged["observedGeneration"] == 2 and merged["reason"] == "WorkersNotReady"


def test_changed_types_lists_only_what_differs():
    live = [conditions.condition(conditions.READY, True, "WorkersReady", "1/1", "t0", 1)]
    same = conditions.merge_conditions(
        live, [conditions.condition(conditions.READY, True, "WorkersReady", "1/1", "t9", 1)]
    )
    assert conditions.changed_types(live, same) == []
    other = conditions.merge_conditions(
        live, [conditions.condition(conditions.SCALING, True, "Stable", "ok", "t1")]
    )
    assert [c["type"] for c in conditions.changed_types(live, other)] == [conditions.SCALING]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.",
            True,
        ),
        (
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No preemption victims found for incoming pod.",
            False,
        ),
        ("0/2 nodes are available: 2 Too many pods.", False),
        ("pod waits for capacity: unschedulable", False),
    ],
    ids=["no-product", "gpus-busy", "pods-full", "no-scheduler-words"],
)
def test_never_fits_reads_the_schedulers_reasons(message, expected):
    assert conditions.never_fits(message) is expected
