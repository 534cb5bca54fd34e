"""Simulated nodes for the real control plane: Node objects with GPU capacity and GPU Feature
Discovery labels, and an agent that does a kubelet's part for the pods bound to them.

The agent keeps node leases fresh (or the node lifecycle controller would taint and evict), runs
each container of a bound pod as a local process when its image maps to code on this machine
(worker images: `python -m handler_worker` with the pod's env resolved from Secrets, ConfigMaps
and the downward API), otherwise marks it running; it reports container states, restarts and
crash-loop back-off, the termination message, and computes Ready with the pod's readiness gates.
A pod deletion sends SIGTERM, waits up to the grace period, then removes the pod as a kubelet
does. Images from `unpullable.invalid/` fail to pull (ErrImagePull, then ImagePullBackOff).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.conftest import subprocess_env

log = logging.getLogger("tests.cluster.nodes")

UNPULLABLE = "unpullable.invalid/"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
STRATEGIC = "application/strategic-merge-patch+json"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int = 0
    product: str | None = None  # what GPU Feature Discovery puts in nvidia.com/gpu.product
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110


DEFAULT_NODES = (
    NodeSpec("cpu-1"),
    NodeSpec("gpu-a100-1", gpus=2, product="NVIDIA-A100-SXM4-80GB"),
    NodeSpec("gpu-h100-1", gpus=2, product="NVIDIA-H100-80GB-HBM3"),
)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_object(spec: NodeSpec) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "simulated",
    }
    taints = []
    if spec.gpus:
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(spec.gpus),
                "nvidia.com/gpu.product": spec.product or "NVIDIA-GPU",
            }
        )
        # What GPU node pools carry (GKE adds it; many clusters do it by hand).
        taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {"taints": taints},
    }


def node_status(spec: NodeSpec) -> dict[str, Any]:
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods)}
    if spec.gpus:
        capacity["nvidia.com/gpu"] = str(spec.gpus)
    stamp = now()

    def condition(type_: str, status: str, reason: str) -> dict[str, str]:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": reason,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            condition("Ready", "True", "KubeletReady"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": spec.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "osImage": "simulated",
            "kernelVersion": os.uname().release,
            "containerRuntimeVersion": "simulated://1.0",
            "kubeletVersion": "v1.34.4",
            "kubeProxyVersion": "",
            "machineID": spec.name,
            "systemUUID": spec.name,
            "bootID": spec.name,
        },
    }


@dataclass
class Container:
    name: str
    image: str
    process: subprocess.Popen | None = None
    runs_code: bool = False
    restarts: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    last_state: dict[str, Any] = field(default_factory=dict)
    next_start: float | None = None
    started_at: str | None = None
    log_path: Path | None = None
    termination_log: Path | None = None

    @property
    def running(self) -> bool:
        return "running" in self.state


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    started: str
    containers: list[Container]
    restart_policy: str = "Always"
    terminating: bool = False
    written: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Every container exited for good (a Job's pod): the phase is Succeeded or Failed."""
        return not self.terminating and all("terminated" in c.state for c in self.containers)


class NodeAgent:
    """Registers `nodes` and plays their kubelet until `stop()`.

    `code`: image prefix → PYTHONPATH entries; a container whose image starts with one runs
    `python -m handler_worker` (or its `command`) as a process with that PYTHONPATH.
    `commands`: image prefix → what its container's command must contain to run (other
    containers of that image are only marked running).
    """

    def __init__(
        self,
        kubeconfig: str,
        workdir: Path,
        nodes: tuple[NodeSpec, ...] = DEFAULT_NODES,
        code: dict[str, list[str]] | None = None,
        commands: dict[str, str] | None = None,
        backoff_base: float = 1.0,
    ):
        self.api_client = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.workdir = workdir
        self.nodes = {spec.name: spec for spec in nodes}
        self.code = dict(code or {})
        self.commands = dict(commands or {})
        self.backoff_base = backoff_base
        self.pods: dict[str, PodRun] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self._ips = itertools.count(2)
        self.events: list[tuple[str, str, str]] = []  # (pod, container, what) in order

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for spec in self.nodes.values():
            self.register(spec)
        for target in (self._renew_leases, self._watch_pods, self._supervise):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            runs = list(self.pods.values())
        for run in runs:
            for container in run.containers:
                self._kill(container, signal.SIGKILL)
        for thread in self.threads:
            thread.join(timeout=5)
        self.api_client.close()

    def register(self, spec: NodeSpec) -> None:
        with contextlib.suppress(ApiException):
            self.core.create_node(node_object(spec))
        self.core.patch_node_status(
            spec.name, {"status": node_status(spec)}, _content_type=STRATEGIC
        )

    def remove_node(self, name: str) -> None:
        self.nodes.pop(name, None)
        with contextlib.suppress(ApiException):
            self.core.delete_node(name)

    # -- leases ----------------------------------------------------------------------------
    def _renew_leases(self) -> None:
        while not self.stopping.is_set():
            for name in list(self.nodes):
                try:
                    self._renew(name)
                except Exception:  # noqa: BLE001 - keep renewing the others
                    log.exception("renewing the lease of node %s", name)
            self.stopping.wait(10)

    def _renew(self, name: str) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": micro_now(),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(
                name, LEASE_NAMESPACE, {"spec": body["spec"]}, _content_type=STRATEGIC
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, body)

    # -- pods ------------------------------------------------------------------------------
    def _watch_pods(self) -> None:
        while not self.stopping.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(_preload_content=False)
                body = json.loads(listed.data)
                seen = set()
                for pod in body["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._on_pod("SYNC", pod)
                with self.lock:
                    gone = [uid for uid in self.pods if uid not in seen]
                for uid in gone:
                    self._forget(uid)
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=body["metadata"]["resourceVersion"],
                    timeout_seconds=30,
                    allow_watch_bookmarks=False,
                    _preload_content=False,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    pod = event["raw_object"]
                    self._on_pod(event["type"], pod)
            except Exception:  # noqa: BLE001 - relist on any watch failure (410 Gone, ...)
                if not self.stopping.is_set():
                    log.debug("pod watch restarts", exc_info=True)
                    time.sleep(0.5)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if kind == "DELETED":
            self._forget(uid)
            return
        if spec.get("nodeName") not in self.nodes:
            return
        with self.lock:
            run = self.pods.get(uid)
            if run is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return
                run = self._admit(pod)
            if meta.get("deletionTimestamp") and not run.terminating:
                run.terminating = True
                grace = meta.get("deletionGracePeriodSeconds")
                threading.Thread(
                    target=self._terminate, args=(run, grace), daemon=True, name="terminate"
                ).start()
                return
            self._write_status(run, pod)

    def _admit(self, pod: dict[str, Any]) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        n = next(self._ips)
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=spec["nodeName"],
            # A pod CIDR address as a CNI would give (Services need non-loopback endpoints);
            # nothing on this machine ever connects to it.
            ip=f"10.244.{n // 250}.{n % 250 + 2}",
            started=now(),
            containers=[Container(c["name"], c["image"]) for c in spec["containers"]],
            restart_policy=spec.get("restartPolicy") or "Always",
        )
        self.pods[run.uid] = run
        for container, container_spec in zip(run.containers, spec["containers"], strict=True):
            self._start(run, container, container_spec, pod)
        return run

    def _code_for(self, image: str, spec: dict[str, Any]) -> list[str] | None:
        command = " ".join(spec.get("command") or [])
        for prefix, paths in self.code.items():
            if image.startswith(prefix) and self.commands.get(prefix, "") in command:
                return paths
        return None

    def _start(
        self, run: PodRun, container: Container, spec: dict[str, Any], pod: dict[str, Any]
    ) -> None:
        if container.image.startswith(UNPULLABLE):
            reason = "ImagePullBackOff" if container.state.get("waiting") else "ErrImagePull"
            container.state = {
                "waiting": {
                    "reason": reason,
                    "message": f'failed to pull image "{container.image}": not found',
                }
            }
            container.next_start = time.monotonic() + self.backoff_base
            self.events.append((run.name, container.name, reason))
            return
        paths = self._code_for(container.image, spec)
        container.started_at = now()
        container.next_start = None
        container.state = {"running": {"startedAt": container.started_at}}
        if paths is None:
            self.events.append((run.name, container.name, "started"))
            return
        container.runs_code = True
        stem = f"{run.namespace}_{run.name}_{container.name}"
        container.log_path = self.workdir / f"{stem}.log"
        container.termination_log = self.workdir / f"{stem}.termination-log"
        container.termination_log.write_text("")
        env = resolve_env(self.core, pod, spec)
        env.setdefault("HANDLER_TERMINATION_LOG", str(container.termination_log))
        full_env = subprocess_env(PYTHONPATH=os.pathsep.join(paths), **env)
        # The API as the pod would reach it: its service account's token, or nothing at all.
        full_env.pop("KUBECONFIG", None)
        if pod["spec"].get("automountServiceAccountToken") is not False:
            full_env["KUBECONFIG"] = self._service_account_kubeconfig(pod, stem)
        command = expand(spec.get("command") or [sys.executable, "-m", "handler_worker"], env)
        if command[0] in ("python", "python3"):
            command[0] = sys.executable
        command += expand(spec.get("args") or [], env)
        with open(container.log_path, "a") as out:
            container.process = subprocess.Popen(
                command,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
                preexec_fn=die_with_parent,
            )
        self.events.append((run.name, container.name, "started"))

    def _service_account_kubeconfig(self, pod: dict[str, Any], stem: str) -> str:
        """A kubeconfig holding what a kubelet would mount: a token bound to this pod for its
        service account (TokenRequest), and the cluster's CA."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=3600,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"]
                ),
            )
        )
        token = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], request
        ).status.token
        configuration = self.api_client.configuration
        path = self.workdir / f"{stem}.kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "cluster",
                            "cluster": {
                                "server": configuration.host,
                                "certificate-authority": configuration.ssl_ca_cert,
                            },
                        }
                    ],
                    "users": [{"name": account, "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "pod",
                            "context": {
                                "cluster": "cluster",
                                "user": account,
                                "namespace": meta["namespace"],
                            },
                        }
                    ],
                    "current-context": "pod",
                }
            )
        )
        return str(path)

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                for run in list(self.pods.values()):
                    changed = False
                    for container in run.containers:
                        changed |= self._check(run, container)
                    if changed:
                        self._write_status(run, None)
            self.stopping.wait(0.2)

    def _check(self, run: PodRun, container: Container) -> bool:
        """Notice an exited process or a back-off that is over; True when the status changed."""
        if container.process is not None and container.process.poll() is not None:
            code = container.process.returncode
            message = (
                container.termination_log.read_text()
                if container.termination_log and container.termination_log.exists()
                else ""
            )
            if not message and code != 0 and container.log_path:
                message = "\n".join(container.log_path.read_text().splitlines()[-80:])
            container.last_state = {
                "terminated": {
                    "exitCode": code if code >= 0 else 128 - code,
                    "reason": "Completed" if code == 0 else "Error",
                    "message": message[-4096:],
                    "startedAt": container.started_at,
                    "finishedAt": now(),
                }
            }
            container.process = None
            self.events.append((run.name, container.name, f"exited {code}"))
            if (
                run.terminating
                or run.restart_policy == "Never"
                or (run.restart_policy == "OnFailure" and code == 0)
            ):
                container.state, container.last_state = container.last_state, {}
                return True
            container.restarts += 1
            delay = min(self.backoff_base * 2 ** (container.restarts - 1), 300)
            container.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:g}s restarting failed container={container.name} "
                    f"pod={run.name}_{run.namespace}({run.uid})",
                }
            }
            container.next_start = time.monotonic() + delay
            return True
        if (
            container.next_start is not None
            and not run.terminating
            and time.monotonic() >= container.next_start
        ):
            pod = self._read(run)
            if pod is None:
                return False
            spec = next(c for c in pod["spec"]["containers"] if c["name"] == container.name)
            self._start(run, container, spec, pod)
            return True
        return False

    def _read(self, run: PodRun) -> dict[str, Any] | None:
        try:
            response = self.core.read_namespaced_pod(
                run.name, run.namespace, _preload_content=False
            )
        except ApiException:
            return None
        return json.loads(response.data)

    def _write_status(self, run: PodRun, pod: dict[str, Any] | None) -> None:
        if pod is None:
            pod = self._read(run)
            if pod is None:
                return
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        others = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        containers_ready = all(c.running for c in run.containers)
        gates_ready = all(others.get(g, {}).get("status") == "True" for g in gates)
        ready = containers_ready and gates_ready
        phase = (
            "Running"
            if any(c.running or c.restarts or c.last_state for c in run.containers)
            else "Pending"
        )
        if run.terminating and not any(c.running for c in run.containers):
            phase = "Running"  # a kubelet keeps the phase until it removes the pod
        elif run.finished:
            codes = [c.state["terminated"].get("exitCode") for c in run.containers]
            phase = "Succeeded" if not any(codes) else "Failed"
        conditions = {
            "PodReadyToStartContainers": True,
            "Initialized": True,
            "ContainersReady": containers_ready,
            "Ready": ready,
        }
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.started,
            "qosClass": (pod.get("status") or {}).get("qosClass") or "BestEffort",
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": "" if not c.started_at else f"simulated://{c.image}",
                    "containerID": f"simulated://{run.uid}/{c.name}/{c.restarts}"
                    if c.started_at
                    else "",
                    "ready": c.running,
                    "started": c.running,
                    "restartCount": c.restarts,
                    "state": c.state,
                    "lastState": c.last_state,
                }
                for c in run.containers
            ],
        }
        key = {**status, "conditions": conditions}
        if key == run.written:
            return
        stamp = now()
        previous = {t: others.get(t, {}) for t in KUBELET_CONDITIONS}
        status["conditions"] = [
            {
                "type": t,
                "status": "True" if value else "False",
                "lastProbeTime": None,
                "lastTransitionTime": previous[t].get("lastTransitionTime")
                if previous[t].get("status") == ("True" if value else "False")
                else stamp,
                **(
                    {}
                    if value or t not in ("Ready", "ContainersReady")
                    else {
                        "reason": "ReadinessGatesNotReady"
                        if containers_ready
                        else "ContainersNotReady",
                        "message": "the status of pod readiness gate(s) is not True"
                        if containers_ready
                        else "containers with unready status: "
                        f"[{' '.join(c.name for c in run.containers if not c.running)}]",
                    }
                ),
            }
            for t, value in conditions.items()
        ]
        try:
            self.core.patch_namespaced_pod_status(
                run.name, run.namespace, {"status": status}, _content_type=STRATEGIC
            )
            run.written = key
        except ApiException as exc:
            if exc.status != 404:
                log.warning("status of %s/%s: %s", run.namespace, run.name, exc.reason)

    def _terminate(self, run: PodRun, grace: int | None) -> None:
        """SIGTERM, up to the grace period, SIGKILL; then remove the pod as the kubelet does."""
        grace = 30 if grace is None else grace
        for container in run.containers:
            self._kill(container, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            c.process is not None and c.process.poll() is None for c in run.containers
        ):
            time.sleep(0.1)
        for container in run.containers:
            if container.process is not None and container.process.poll() is None:
                self.events.append((run.name, container.name, "killed after grace period"))
                self._kill(container, signal.SIGKILL)
        with self.lock:
            for container in run.containers:
                self._check(run, container)
            for container in run.containers:
                if container.running and not container.runs_code:
                    container.state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=run.uid)
        )
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(run.name, run.namespace, body=body)
        self._forget(run.uid)

    def _kill(self, container: Container, sig: int) -> None:
        if container.process is not None and container.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.process.pid, sig)

    def _forget(self, uid: str) -> None:
        with self.lock:
            run = self.pods.pop(uid, None)
        if run is None:
            return
        for container in run.containers:
            self._kill(container, signal.SIGKILL)
            if container.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    container.process.wait(5)

    # -- what tests look at ----------------------------------------------------------------
    def processes(self, namespace: str | None = None) -> dict[str, subprocess.Popen]:
        """Live worker processes by pod name."""
        with self.lock:
            return {
                run.name: c.process
                for run in self.pods.values()
                if namespace in (None, run.namespace)
                for c in run.containers
                if c.process is not None and c.process.poll() is None
            }


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the agent's thread goes (a killed test run leaves
    no worker behind)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(values: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion in command and args (`$$` escapes, unknown refs stay)."""

    def one(value: str) -> str:
        return _REF.sub(
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value
        )

    return [one(v) for v in values]


def _field(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": (pod.get("status") or {}).get("podIP", ""),
    }
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path}")
    return simple[path]


def resolve_env(
    core: client.CoreV1Api, pod: dict[str, Any], spec: dict[str, Any]
) -> dict[str, str]:
    """The container's environment as a kubelet builds it: envFrom, then env in order."""
    namespace = pod["metadata"]["namespace"]

    def secret(name: str) -> dict[str, str]:
        data = core.read_namespaced_secret(name, namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def config_map(name: str) -> dict[str, str]:
        return core.read_namespaced_config_map(name, namespace).data or {}

    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        prefix = source.get("prefix", "")
        ref = source.get("secretRef") or source.get("configMapRef")
        try:
            values = secret(ref["name"]) if "secretRef" in source else config_map(ref["name"])
        except ApiException:
            if ref.get("optional"):
                continue
            raise
        env.update({prefix + k: v for k, v in values.items()})
    for item in spec.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand([item["value"]], env)[0]
            continue
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            try:
                values = (
                    secret(ref["name"]) if "secretKeyRef" in source else config_map(ref["name"])
                )
                env[name] = values[ref["key"]]
            except (ApiException, KeyError):
                if not ref.get("optional"):
                    raise
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"].split(".", 1)
            limits = (spec.get("resources") or {}).get(resource[0]) or {}
            env[name] = str(limits.get(resource[1], "0"))
        else:
            env[name] = ""
    return env
