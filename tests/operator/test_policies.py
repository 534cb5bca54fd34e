"""The autoscaling policy with plain values: decisions by aspect, then properties over traces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handler_operator.models import ScalingSpec
from handler_operator.scaling import policies
from handler_operator.scaling.policies import (
    Observation,
    PodView,
    ScalerState,
    compute_desired_replicas,
)


def spec(**overrides) -> ScalingSpec:
    values = {
        "minReplicas": 0,
        "maxReplicas": 10,
        "targetQueuePerWorker": 1,
        "scaleToZeroAfterSeconds": 60,
        "scaleDownStabilizationSeconds": 30,
        **overrides,
    }
    return ScalingSpec(**values)


def ready(*names: str, created: float = 0.0) -> tuple[PodView, ...]:
    return tuple(PodView(name, "ready", created) for name in names)


# -- low-priority jobs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "low", "running", "replicas", "minimum", "expected"),
    [
        (3, 3, 0, 0, 0, 0),  # low-priority alone: no worker from zero
        (3, 3, 0, 0, 1, 1),  # ... but minReplicas serves them
        (5, 3, 0, 0, 0, 2),  # the normal jobs bring workers; the low ones wait for them
        (3, 3, 2, 2, 0, 2),  # workers running low-priority jobs are kept
    ],
    ids=["alone", "min-replicas", "with-normal-jobs", "running-them"],
)
def test_low_priority_jobs_never_scale_up_on_their_own(
    queued, low, running, replicas, minimum, expected
):
    pods = ready(*[f"w{n}" for n in range(replicas)])
    decision = compute_desired_replicas(
        Observation(queued, running, replicas, pods=pods, low_queued=low, last_activity=99.0),
        spec(minReplicas=minimum),
        ScalerState(),
        now=100.0,
    )
    assert decision.desired == expected
    assert f"{low} low-priority job(s) waiting for capacity" in decision.message


# -- queue delay (RunPod's request-delay scaler) -------------------------------------------------


def delayed(delay: float, queued: int = 4, running: int = 2, pods=None, replicas: int = 2):
    pods = ready("w0", "w1") if pods is None else pods
    return Observation(queued, running, replicas, pods=pods, queue_delay=delay, last_activity=99.0)


@pytest.mark.parametrize(
    ("delay", "target", "pods", "expected", "reason"),
    [
        (12.0, 10, None, 3, policies.QUEUE_DELAY),  # waited past the target: one more
        (8.0, 10, None, 2, policies.STABLE),  # within the target: the depth rule only
        (12.0, None, None, 2, policies.STABLE),  # no target set: the depth rule only
        (12.0, 10, (PodView("w0", "ready"), PodView("w1", "pending")), 2, policies.STABLE),
        (12.0, 10, (PodView("w0", "ready"), PodView("w1", "starting")), 2, policies.STABLE),
    ],
    ids=["over-target", "under-target", "no-target", "pod-pending", "pod-starting"],
)
def test_a_long_wait_adds_a_worker_only_when_none_is_on_its_way(
    delay, target, pods, expected, reason
):
    decision = compute_desired_replicas(
        delayed(delay, pods=pods),
        spec(targetQueuePerWorker=4, targetQueueDelaySeconds=target),
        ScalerState(),
        now=100.0,
    )
    assert (decision.replicas, decision.reason) == (expected, reason)
    if reason == policies.QUEUE_DELAY:
        assert "waited 12 s, over targetQueueDelaySeconds=10" in decision.message


def test_retries_waiting_out_their_backoff_bring_no_worker():
    """Queued, but no worker can take them until their retry is due: like low-priority jobs,
    they scale nothing up (and keep nothing up)."""
    decision = compute_desired_replicas(
        Observation(3, 0, 0, retry_waiting=3, last_activity=99.0), spec(), ScalerState(), 100.0
    )
    assert decision.desired == 0
    mixed = compute_desired_replicas(
        Observation(5, 0, 0, retry_waiting=3, last_activity=99.0), spec(), ScalerState(), 100.0
    )
    assert mixed.desired == 2


def test_the_depth_rule_wins_when_it_asks_for_more():
    decision = compute_desired_replicas(
        delayed(30.0, queued=20, running=2),
        spec(targetQueuePerWorker=2, targetQueueDelaySeconds=5),
        ScalerState(),
        now=100.0,
    )
    assert (decision.replicas, decision.reason) == (10, policies.SCALE_UP)


def test_the_delay_rule_keeps_to_max_replicas_and_low_priority_jobs_bring_nothing():
    at_max = compute_desired_replicas(
        delayed(30.0), spec(maxReplicas=2, targetQueuePerWorker=4, targetQueueDelaySeconds=5),
        ScalerState(), now=100.0,
    )  # fmt: skip
    assert (at_max.replicas, at_max.reason) == (2, policies.STABLE)
    low_only = compute_desired_replicas(
        Observation(4, 2, 2, pods=ready("w0", "w1"), low_queued=4, queue_delay=30.0),
        spec(targetQueuePerWorker=4, targetQueueDelaySeconds=5),
        ScalerState(),
        now=100.0,
    )
    assert low_only.replicas == 2


# -- scale-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "running", "target", "maximum", "expected"),
    [
        (1, 0, 1, 10, 1),
        (20, 0, 1, 10, 10),
        (20, 0, 4, 10, 5),
        (3, 2, 2, 10, 3),
        (7, 0, 1, 3, 3),
    ],
)
def test_scale_from_zero_goes_straight_to_what_the_queue_needs(
    queued, running, target, maximum, expected
):
    decision = compute_desired_replicas(
        Observation(queued=queued, in_progress=running, replicas=0),
        spec(targetQueuePerWorker=target, maxReplicas=maximum),
        ScalerState(),
        now=100.0,
    )
    assert (decision.reason, decision.replicas, decision.desired) == (
        policies.SCALE_UP,
        expected,
        expected,
    )


def test_pending_pods_count_as_capacity_on_the_way():
    pods = tuple(PodView(f"p{i}", "pending", 0.0, unschedulable_since=90.0) for i in range(3))
    decision = compute_desired_replicas(
        Observation(queued=3, in_progress=0, replicas=3, pods=pods),
        spec(pendingTimeoutSeconds=600),
        ScalerState(),
        now=100.0,
    )
    assert decision.replicas == 3 and decision.reason == policies.STABLE
    assert decision.waiting_for_capacity is None


def test_pods_pending_past_the_timeout_report_waiting_for_capacity_and_are_kept():
    pods = (PodView("p0", "pending", 0.0, unschedulable_since=0.0),)
    decision = compute_desired_replicas(
        Observation(queued=1, in_progress=0, replicas=1, pods=pods),
        spec(pendingTimeoutSeconds=60),
        ScalerState(),
        now=61.0,
    )
    assert decision.replicas == 1 and not decision.remove
    assert "unschedulable for 61 s" in decision.waiting_for_capacity


NO_SUCH_PRODUCT = (
    "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. "
    "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
)
NO_GPU_LEFT = (
    "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
    "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not "
    "helpful for scheduling, 2 No preemption victims found for incoming pod."
)


@pytest.mark.parametrize(
    ("message", "immediately", "unschedulable"),
    [(NO_SUCH_PRODUCT, True, True), (NO_GPU_LEFT, False, False)],
    ids=["no-node-matches", "gpus-busy"],
)
def test_no_matching_node_is_said_at_once_and_capacity_after_the_timeout(
    message, immediately, unschedulable
):
    pods = (PodView("p0", "pending", 0.0, unschedulable_since=0.0, unschedulable_message=message),)

    def at(now):
        return compute_desired_replicas(
            Observation(queued=1, in_progress=0, replicas=1, pods=pods),
            spec(pendingTimeoutSeconds=60),
            ScalerState(),
            now=now,
        )

    early, late = at(5.0), at(61.0)
    assert (early.waiting_for_capacity is not None) is immediately
    assert late.waiting_for_capacity is not None and message in late.waiting_for_capacity
    assert late.unschedulable is unschedulable
    assert late.replicas == early.replicas == 1 and not late.remove  # kept, nothing added


@pytest.mark.parametrize(("rate", "expected"), [(0, 10), (2, 4), (1.5, 3)])
def test_scale_up_rate(rate, expected):
    decision = compute_desired_replicas(
        Observation(queued=50, in_progress=0, replicas=2, pods=ready("a", "b")),
        spec(maxScaleUpRate=rate),
        ScalerState(),
        now=1.0,
    )
    assert decision.replicas == expected


def test_scale_up_takes_draining_workers_back_first():
    decision = compute_desired_replicas(
        Observation(queued=5, in_progress=0, replicas=2, pods=ready("a", "b"), draining={"a"}),
        spec(),
        ScalerState(draining=("a",)),
        now=1.0,
    )
    assert decision.undrain == ("a",) and decision.replicas == 5
    assert decision.state.draining == ()


# -- idle and scale to zero ------------------------------------------------------------------------


@pytest.mark.parametrize(("idle_for", "desired"), [(10, 1), (59, 1), (60, 0), (600, 0)])
def test_idle_endpoint_keeps_a_warm_worker_until_scale_to_zero_after(idle_for, desired):
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=2, pods=ready("a", "b"), last_activity=0.0),
        spec(scaleToZeroAfterSeconds=60, scaleDownStabilizationSeconds=0, maxScaleDownRate=0),
        ScalerState(),
        now=float(idle_for),
    )
    assert decision.desired == desired and len(decision.drain) == 2 - desired


def test_idle_scale_down_keeps_one_warm_worker_inside_the_idle_window():
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=2, pods=ready("a", "b"), last_activity=0.0),
        spec(scaleDownStabilizationSeconds=0),
        ScalerState(),
        now=10.0,
    )
    assert decision.desired == 1 and len(decision.drain) == 1


def test_scale_to_zero_skips_the_stabilization_window():
    state = ScalerState(recommendations=((95.0, 1), (99.0, 1)), draining=("a",))
    decision = compute_desired_replicas(
        Observation(
            queued=0,
            in_progress=0,
            replicas=1,
            pods=ready("a"),
            draining=frozenset({"a"}),
            last_activity=0.0,
        ),
        spec(scaleToZeroAfterSeconds=60, scaleDownStabilizationSeconds=300),
        state,
        now=100.0,
    )
    assert decision.remove == ("a",) and decision.replicas == 0
    assert decision.reason == policies.SCALED_TO_ZERO


def test_min_replicas_is_the_floor_when_idle():
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=2, pods=ready("a", "b"), last_activity=0.0),
        spec(minReplicas=2),
        ScalerState(),
        now=1000.0,
    )
    assert decision.replicas == 2 and not decision.drain


def test_an_endpoint_never_active_counts_idle_from_when_the_policy_first_saw_it():
    obs = Observation(queued=0, in_progress=0, replicas=1, pods=ready("a"))
    first = compute_desired_replicas(obs, spec(), ScalerState(), now=500.0)
    assert first.desired == 1 and first.state.first_seen == 500.0
    later = compute_desired_replicas(obs, spec(), first.state, now=561.0)
    assert later.drain == ("a",)


# -- scale-down --------------------------------------------------------------------------------------


def test_scale_down_waits_for_the_stabilization_window():
    state = ScalerState(recommendations=((80.0, 4),))
    obs = Observation(queued=1, in_progress=0, replicas=4, pods=ready("a", "b", "c", "d"))
    decision = compute_desired_replicas(obs, spec(scaleDownStabilizationSeconds=30), state, 100.0)
    assert decision.reason == policies.STABILIZING and decision.replicas == 4
    decision = compute_desired_replicas(obs, spec(scaleDownStabilizationSeconds=30), state, 111.0)
    assert decision.reason == policies.DRAINING


def test_scale_down_drains_only_idle_workers_and_removes_them_once_drained():
    pods = ready("busy-1", "idle-1", "busy-2", "idle-2")
    jobs = {"busy-1": 1, "busy-2": 1}
    first = compute_desired_replicas(
        Observation(queued=0, in_progress=2, replicas=4, pods=pods, worker_jobs=jobs),
        spec(scaleDownStabilizationSeconds=0, maxScaleDownRate=0),
        ScalerState(),
        now=1.0,
    )
    assert set(first.drain) == {"idle-1", "idle-2"} and first.replicas == 4
    assert first.reason == policies.DRAINING and first.desired == 2
    second = compute_desired_replicas(
        Observation(
            queued=0,
            in_progress=2,
            replicas=4,
            pods=pods,
            worker_jobs=jobs,
            draining=frozenset(first.drain),
        ),
        spec(scaleDownStabilizationSeconds=0, maxScaleDownRate=0),
        first.state,
        now=2.0,
    )
    assert set(second.remove) == {"idle-1", "idle-2"} and second.replicas == 2
    assert second.reason == policies.SCALE_DOWN


def test_every_worker_busy_means_nobody_is_removed():
    jobs = {"a": 2, "b": 2, "c": 1}
    decision = compute_desired_replicas(
        Observation(
            queued=0, in_progress=5, replicas=3, pods=ready("a", "b", "c"), worker_jobs=jobs
        ),
        spec(targetQueuePerWorker=4, scaleDownStabilizationSeconds=0),
        ScalerState(),
        now=1.0,
    )
    assert decision.reason == policies.BUSY_WORKERS
    assert not decision.drain and not decision.remove and decision.replicas == 3


def test_pending_and_starting_pods_are_removed_before_ready_ones():
    pods = (
        PodView("old-ready", "ready", 1.0),
        PodView("new-ready", "ready", 5.0),
        PodView("starting", "starting", 6.0),
        PodView("pending", "pending", 7.0),
    )
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=4, pods=pods, last_activity=0.0),
        spec(scaleToZeroAfterSeconds=10, maxScaleDownRate=0),
        ScalerState(),
        now=100.0,
    )
    assert decision.drain == ("pending", "starting", "new-ready", "old-ready")


def test_replicas_without_pods_go_first_and_need_no_drain():
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=3, pods=ready("a"), last_activity=0.0),
        spec(scaleToZeroAfterSeconds=10, maxScaleDownRate=0),
        ScalerState(),
        now=100.0,
    )
    assert decision.replicas == 1 and decision.drain == ("a",)


@pytest.mark.parametrize(("rate", "expected_drained"), [(2, 4), (4, 6), (0, 8)])
def test_scale_down_rate(rate, expected_drained):
    pods = ready(*(f"w{i}" for i in range(8)))
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=8, pods=pods, last_activity=0.0),
        spec(maxScaleDownRate=rate, scaleToZeroAfterSeconds=10),
        ScalerState(),
        now=100.0,
    )
    assert len(decision.drain) == expected_drained


def test_a_drained_worker_the_gateway_forgot_is_drained_again():
    decision = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=1, pods=ready("a"), last_activity=0.0),
        spec(scaleToZeroAfterSeconds=10),
        ScalerState(draining=("a",)),
        now=100.0,
    )
    assert decision.drain == ("a",) and not decision.remove


def test_fixed_replicas_win_and_still_drain_first():
    decision = compute_desired_replicas(
        Observation(queued=9, in_progress=0, replicas=3, pods=ready("a", "b", "c")),
        spec(replicas=1, maxScaleDownRate=0),
        ScalerState(),
        now=1.0,
    )
    assert decision.reason == policies.DRAINING and len(decision.drain) == 2
    up = compute_desired_replicas(
        Observation(queued=0, in_progress=0, replicas=0), spec(replicas=2), ScalerState(), now=1.0
    )
    assert (up.reason, up.replicas) == (policies.FIXED, 2)


# -- properties over traces ---------------------------------------------------------------------------


@dataclass
class Sim:
    """A small cluster + gateway: pods start, take jobs, drain and go as the decisions say."""

    spec: ScalingSpec
    replicas: int = 0
    pods: dict[str, PodView] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)
    state: ScalerState = ScalerState()
    counter: int = 0
    last_activity: float | None = None
    history: list[int] = field(default_factory=list)

    def observe(self, queued: int, in_progress: int) -> Observation:
        return Observation(
            queued=queued,
            in_progress=in_progress,
            replicas=self.replicas,
            pods=tuple(self.pods.values()),
            worker_jobs=dict(self.jobs),
            draining=frozenset(self.draining),
            last_activity=self.last_activity,
        )

    def step(self, now: float, queued: int, busy: dict[str, int]) -> policies.Decision:
        # Workers pick up work: only ready, non-draining pods gain jobs; draining ones may finish.
        for name in self.pods:
            wanted = busy.get(name, 0)
            if name in self.draining:
                wanted = min(wanted, self.jobs.get(name, 0))
            elif self.pods[name].phase != "ready":
                wanted = 0
            self.jobs[name] = wanted
        in_progress = sum(self.jobs.values())
        if queued or in_progress:
            self.last_activity = now
        obs = self.observe(queued, in_progress)
        decision = compute_desired_replicas(obs, self.spec, self.state, now)
        busy_now = {name for name, count in self.jobs.items() if count}
        assert not set(decision.remove) & busy_now, "removed a busy worker"
        fresh = set(decision.drain) - set(self.state.draining)
        assert not fresh & busy_now, "chose a busy worker to drain"
        # Execute as the operator does: undrain, drain (idle ones go at once), remove.
        self.draining -= set(decision.undrain)
        replicas = decision.replicas
        for name in decision.drain:
            self.draining.add(name)
        for name in decision.remove:
            self.pods.pop(name)
            self.jobs.pop(name, None)
            self.draining.discard(name)
        self.state = decision.state
        self.replicas = replicas
        while len(self.pods) < self.replicas:
            self.counter += 1
            name = f"w{self.counter}"
            self.pods[name] = PodView(name, "ready", now)
        self.history.append(self.replicas)
        return decision


scaling_specs = st.builds(
    lambda low, span, target, down_rate, window: spec(
        minReplicas=low,
        maxReplicas=low + span,
        targetQueuePerWorker=target,
        maxScaleDownRate=down_rate,
        scaleDownStabilizationSeconds=window,
        scaleToZeroAfterSeconds=20,
    ),
    st.integers(0, 3),
    st.integers(0, 8),
    st.integers(1, 4),
    st.sampled_from([0, 2, 3]),
    st.integers(0, 20),
)


@settings(max_examples=150, deadline=None)
@given(scaling=scaling_specs, trace=st.lists(st.tuples(st.integers(0, 30), st.data()), max_size=60))
def test_random_traces_stay_in_bounds_and_never_remove_a_busy_worker(scaling, trace):
    sim = Sim(scaling, replicas=scaling.minReplicas)
    for now, (queued, data) in enumerate(trace, start=1):
        busy = {name: data.draw(st.integers(0, 2), label=f"jobs of {name}") for name in sim.pods}
        sim.step(float(now), queued, busy)
        assert scaling.minReplicas <= sim.replicas <= scaling.maxReplicas


def packed(sim: Sim, running: int) -> dict[str, int]:
    """`running` jobs on the ready, non-draining workers, `targetQueuePerWorker` each at most."""
    names = [n for n in sim.pods if n not in sim.draining and sim.pods[n].phase == "ready"]
    per_worker, placed = sim.spec.targetQueuePerWorker, {}
    for name in names:
        if running <= 0:
            break
        placed[name] = min(per_worker, running)
        running -= placed[name]
    return placed


@settings(max_examples=150, deadline=None)
@given(
    scaling=scaling_specs,
    queued=st.integers(0, 40),
    running=st.integers(0, 10),
    start=st.integers(0, 11),
)
def test_constant_load_converges_to_the_request_count_without_oscillating(
    scaling, queued, running, start
):
    start = max(scaling.minReplicas, min(start, scaling.maxReplicas))
    sim = Sim(scaling, replicas=start)
    for now in range(1, 200):
        sim.step(float(now), queued, packed(sim, running))
    load = queued + sum(sim.jobs.values())
    expected = max(
        scaling.minReplicas,
        min(math.ceil(load / scaling.targetQueuePerWorker), scaling.maxReplicas),
    )
    if load == 0:
        expected = scaling.minReplicas
    assert sim.replicas == expected, sim.history
    changes = [b - a for a, b in zip(sim.history, sim.history[1:], strict=False) if b != a]
    assert all(c > 0 for c in changes) or all(c < 0 for c in changes), sim.history


def test_the_sim_executes_like_the_operator():
    sim = Sim(spec(scaleDownStabilizationSeconds=0, maxScaleDownRate=0))
    sim.step(1.0, 3, {})
    assert sim.replicas == 3
    sim.step(2.0, 0, {name: 1 for name in list(sim.pods)[:1]})
    assert sim.replicas == 3 and len(sim.draining) == 2
    sim.step(3.0, 0, {name: 1 for name in list(sim.pods)[:1]})
    assert sim.replicas == 1 and replace(sim.state).draining == ()


@pytest.mark.parametrize(
    ("gone", "replicas", "reason"),
    [
        ((), 3, policies.DRAINING),
        (("b",), 2, policies.SCALE_DOWN),
        (("b", "c"), 1, policies.SCALE_DOWN),
    ],
    ids=["none-gone", "one-idle", "two-idle"],
)
def test_carried_out_drops_idle_drained_workers_at_once(gone, replicas, reason):
    decision = policies.Decision(
        replicas=3,
        desired=1,
        reason=policies.DRAINING,
        message="draining",
        drain=("b", "c"),
        state=ScalerState(draining=("b", "c")),
    )
    done = policies.carried_out(decision, 3, list(gone))
    assert done.replicas == replicas and done.reason == reason
    assert done.state.draining == tuple(n for n in ("b", "c") if n not in gone)


def test_carried_out_counts_the_policys_own_removals_once():
    decision = policies.Decision(
        replicas=0, desired=0, reason=policies.SCALED_TO_ZERO, message="", remove=("a",)
    )
    done = policies.carried_out(decision, 1, ["a"])
    assert done.replicas == 0 and done.reason == policies.SCALED_TO_ZERO
    assert done.message == "1 -> 0 workers; removed idle a"


LOWEST = "-2147483648"


@pytest.mark.parametrize(
    ("current", "worker_jobs", "changes"),
    [
        pytest.param({"a": None}, {"a": 1}, {"a": "1000"}, id="turns-busy"),
        pytest.param({"a": "1000"}, {"a": 0}, {"a": "0"}, id="turns-idle"),
        pytest.param({"a": "1000"}, {"a": 3}, {}, id="still-busy-no-write"),
        pytest.param({"a": None}, {"a": 0}, {}, id="idle-unannotated-is-already-0"),
        pytest.param({"a": LOWEST}, {"a": 1}, {}, id="drained-for-removal-left-alone"),
        pytest.param({"a": None}, {}, {}, id="no-heartbeat-yet"),
        pytest.param(
            {"busy": "0", "idle": "1000", "new": None},
            {"busy": 2, "idle": 0, "new": 0},
            {"busy": "1000", "idle": "0"},
            id="several",
        ),
    ],
)
def test_deletion_costs_follow_busy_and_idle(current, worker_jobs, changes):
    assert policies.compute_deletion_costs(current, worker_jobs, LOWEST) == changes
