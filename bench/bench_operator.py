#!/usr/bin/env python3
"""Operator benchmark on the local control plane with kwok fake nodes (hack/cluster.sh up).

    python bench/bench_operator.py [--clusters 500] [--tp 4] [--faults 20] [--node-ranks 50]

Runs on fake nodes of its own (labelled and tainted so that only the bench's pods land there, like
the integration tests' FakeNodes), played by two kwok processes of its own: one plays a single
node that will die (room for --node-ranks ranks, so it hosts ranks of about that many groups), the
other plays the living nodes (room for every rank plus 5%).  Measures, for N clusters x TP ranks:

  * apply -> every StatefulSet created, and -> every cluster Running;
  * API requests/min at steady state over --steady-seconds: the operator's own requests (its
    tpi_operator_api_requests_total counter: everything but kopf's watches and Event posts, target 0)
    and apiserver_request_total for all clients (kwok and the controllers included: an upper
    bound), with the busiest verb/resource pairs;
  * operator RSS (target <= 300 MB), at steady state and after the faults;
  * crashed container -> operator action: from the watch event where kwok reports the crash to the
    one where the operator deletes the group's pods, p50/p99 over --faults injections;
  * node death: the kwok process playing the dying node is killed (a dead kubelet).  The real
    kube-controller-manager marks it NotReady; with the default nodeLostTimeoutSeconds (60) the
    operator must then force-delete the ranks there and recreate their groups elsewhere.
    failure -> action: from the moment the node-loss timeout expires (the node's Ready
    lastTransitionTime + 60 s) to the watch event of the group's pod on that node being deleted
    (a watch of that node's pods only, from then on), p50/p99 over the groups there (target p99
    <= 2 s), and to the operator's log lines of sending
    those deletes and of their answers (its own clock, without the watch's delivery to the bench),
    and per group the earlier of the watch event and the answer (the delete was done by then);
    and the time from NotReady until every one
    of those groups is Ready again on the living nodes.  What shares the 2 cores then: the CPU
    seconds of the operator, the control plane's processes and the living nodes' kwok in the 5 s
    after the timeout, and the operator's own API requests around it.
Prints one JSON object (and writes it to --json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))
from tpikit.kube import CLUSTER_DIR, KUBECONFIG, kubectl  # noqa: E402
from tpikit.kwok import Kwok  # noqa: E402
from tpikit.ports import free_port  # noqa: E402

NS = "tpi-bench"
LABEL = "tpi.dev/bench"
NODE_LOST_TIMEOUT = 60  # the default failurePolicy.nodeLostTimeoutSeconds
RANK_CPU_M, RANK_MEM_MI = 10, 16


def manifest(i: int, tp: int, bench_id: str) -> dict:
    return {
        "apiVersion": "tpi.dev/v1alpha1",
        "kind": "TPInferenceCluster",
        "metadata": {"name": f"b{i:03d}", "namespace": NS},
        "spec": {
            "image": "tpi-runtime:bench",
            "model": {"source": {"image": {"path": "/models/bench"}}},  # no volume to wait for
            "tensorParallelSize": tp,
            "resources": {"cpu": f"{RANK_CPU_M}m", "memory": f"{RANK_MEM_MI}Mi"},
            "failurePolicy": {"backoffSeconds": 0, "maxGroupRestarts": 20},  # node loss: the default
            "scheduling": {
                "nodeSelector": {LABEL: bench_id},
                "tolerations": [{"key": LABEL, "operator": "Equal", "value": bench_id, "effect": "NoSchedule"}],
            },
        },
    }


# ----------------------------------------------------------------------------- fake nodes
def node_doc(name: str, bench_id: str, kwok_selector: str, ranks: int) -> dict:
    alloc = {"cpu": f"{ranks * RANK_CPU_M}m", "memory": f"{ranks * RANK_MEM_MI}Mi", "pods": str(ranks)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": kwok_selector, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "type": "kwok", LABEL: bench_id},
        },
        "spec": {"taints": [{"key": LABEL, "value": bench_id, "effect": "NoSchedule"}]},
        "status": {"allocatable": alloc, "capacity": alloc},
    }  # fmt: skip


def ready_condition(node: dict) -> dict | None:
    """A node's Ready condition, from its plain JSON (as the watch and ``read_node_json`` give it)."""
    return next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)


# ------------------------------------------------------------------------------- measures
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """Each process's CPU seconds so far (user + system, from /proc/PID/stat); a gone one is left out."""
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def control_plane_pids() -> dict[str, int]:
    """hack/cluster.sh's processes by name, from its pid files (the control plane and its own kwok)."""
    return {path.name: int(path.read_text().strip()) for path in sorted((CLUSTER_DIR / "pids").glob("*"))}


def request_counts() -> dict[str, float]:
    """apiserver_request_total by 'VERB resource[/subresource]', all clients."""
    counts: dict[str, float] = {}
    for line in kubectl("get", "--raw", "/metrics", timeout=60).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        sample, value = line.rsplit(" ", 1)
        labels = dict(kv.split("=", 1) for kv in sample[sample.index("{") + 1 : -1].split('",'))
        labels = {k: v.strip('"') for k, v in labels.items()}
        sub = labels.get("subresource")
        key = f"{labels.get('verb')} {labels.get('resource')}{'/' + sub if sub else ''}"
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def operator_counter(port: int, name: str, keys: tuple[str, ...]) -> dict[str, float]:
    """One of the operator's Prometheus counters by its labels' values, 'LABEL1 LABEL2 ...'."""
    counts: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            sample, value = line.rsplit(" ", 1)
            labels = dict(kv.split("=", 1) for kv in sample[sample.index("{") + 1 : -1].split(","))
            counts[" ".join(labels[k].strip('"') for k in keys)] = float(value)
    return counts


def operator_requests(port: int) -> dict[str, float]:
    """The operator's own API requests by 'METHOD resource'."""
    return operator_counter(port, "tpi_operator_api_requests_total", ("method", "resource"))


def operator_actions(port: int) -> dict[str, float]:
    """The operator's actions by 'Action reason' (RecreateGroup NodeLost, ...)."""
    return operator_counter(port, "tpi_operator_actions_total", ("action", "reason"))


def operator_passes(port: int) -> float:
    """The operator's reconcile passes so far, of every result."""
    return sum(operator_counter(port, "tpi_operator_reconciles_total", ("result",)).values())


def per_minute(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    delta = {k: (v - before.get(k, 0.0)) * 60 / seconds for k, v in after.items()}
    return {k: round(v, 1) for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p99": round(pct(values, 0.99), 3),
            "max": round(max(values), 3)}  # fmt: skip


class Watcher:
    """Watch events of the bench's pods, clusters and the dying node, stamped with time.time()."""

    def __init__(self, api: client.ApiClient, dying_node: str) -> None:
        self.core, self.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        self.dying_node = dying_node
        self.stop = threading.Event()
        self.crash_seen: dict[str, float] = {}  # pod -> first crash report
        self.delete_seen: dict[str, float] = {}  # cluster -> first of its pods being deleted
        self.dead_node_delete: dict[str, float] = {}  # cluster -> its pod on the dying node deleted
        self.ready_at: dict[str, list[float]] = {}  # cluster -> times it was seen all-Ready
        self.not_ready_at: float | None = None
        self.pods_stop = threading.Event()  # the watch of every bench pod, once the crash faults are done
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._pods, self._clusters, self._node)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def watch_dying_node(self) -> None:
        """From now on only the dying node's pods are watched: a node's death makes a burst of
        events of the replacement pods (created, bound, started), which the watch of every pod
        parsed ahead of the deletes it is there to time (this Python process shares the 2 cores:
        in one run it saw them ~0.6 s after the operator had its answers)."""
        self.pods_stop.set()
        thread = threading.Thread(target=self._dying_node_pods, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _loop(self, fn: Any, handle: Any, stop: threading.Event | None = None, **kw: Any) -> None:
        resume: dict[str, str] = {}  # the next stream starts where the last ended: a fresh list would lose events
        stop = stop or self.stop
        while not self.stop.is_set() and not stop.is_set():
            w = watch.Watch()
            try:
                # plain dicts: models for every pod event made this watcher lag seconds behind a burst
                for ev in w.stream(fn, timeout_seconds=120, deserialize=False, **resume, **kw):
                    if stop.is_set() or self.stop.is_set():
                        w.stop()
                        break
                    handle(ev, time.time())
                    # without models the Watch does not track where it is: the next stream resumes here
                    if version := ((ev.get("object") or {}).get("metadata") or {}).get("resourceVersion"):
                        resume = {"resource_version": version}
            except client.ApiException as e:
                if e.status == 410:  # too old to resume: a fresh list (events in between are lost)
                    resume = {}
                print(f"watch restarted: {e.status} {e.reason}", file=sys.stderr)
            except KeyError as e:  # how the Watch fails on a 410 ERROR event when not deserializing
                resume = {}
                print(f"watch restarted: expired ({e})", file=sys.stderr)
            except Exception as e:  # a broken stream is restarted: the bench must not stop watching
                print(f"watch restarted: {e}", file=sys.stderr)

    def _pods(self) -> None:
        def handle(ev: dict, now: float) -> None:
            pod = ev["object"]
            meta = pod.get("metadata") or {}
            cluster = (meta.get("labels") or {}).get("tpi.dev/cluster")
            cs = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
            # kwok reports a crash as kubelet does: terminated first, then restartCount + 1
            if cs.get("restartCount") or (cs.get("state") or {}).get("terminated"):
                self.crash_seen.setdefault(meta.get("name"), now)
            if meta.get("deletionTimestamp") or ev["type"] == "DELETED":
                self.delete_seen.setdefault(cluster, now)

        self._loop(self.core.list_namespaced_pod, handle, self.pods_stop, namespace=NS,
                   label_selector="tpi.dev/cluster")  # fmt: skip

    def _dying_node_pods(self) -> None:
        def handle(ev: dict, now: float) -> None:
            meta = ev["object"].get("metadata") or {}
            if meta.get("deletionTimestamp") or ev["type"] == "DELETED":
                self.dead_node_delete.setdefault((meta.get("labels") or {}).get("tpi.dev/cluster"), now)

        self._loop(self.core.list_namespaced_pod, handle, namespace=NS,
                   field_selector=f"spec.nodeName={self.dying_node}")  # fmt: skip

    def _clusters(self) -> None:
        def handle(ev: dict, now: float) -> None:
            obj = ev["object"]
            st = obj.get("status") or {}
            ready = st.get("phase") == "Running" and st.get("readyRanks") == st.get("currentTensorParallelSize")
            if ready:
                self.ready_at.setdefault(obj["metadata"]["name"], []).append(now)

        self._loop(self.custom.list_namespaced_custom_object, handle, group="tpi.dev", version="v1alpha1",
                   namespace=NS, plural="tpinferenceclusters")  # fmt: skip

    def _node(self) -> None:
        def handle(ev: dict, now: float) -> None:
            cond = ready_condition(ev["object"])
            if cond is not None and cond.get("status") != "True" and self.not_ready_at is None:
                self.not_ready_at = now

        self._loop(self.core.list_node, handle, field_selector=f"metadata.name={self.dying_node}")


# ----------------------------------------------------------------------------------- phases
def crash_faults(w: Watcher, n: int, clusters: int, tp: int) -> dict:
    victims = random.sample(range(clusters), min(n, clusters))
    latencies, missed = [], 0
    for i in victims:
        cluster, pod = f"b{i:03d}", f"b{i:03d}-g0-{random.randrange(tp)}"
        w.delete_seen.pop(cluster, None)
        kubectl("annotate", "pod", pod, "-n", NS, "--overwrite", "tpi.dev/fault=crash",
                "tpi.dev/fault-restart=true", "tpi.dev/fault-restart-delay=0s")  # fmt: skip
        deadline = time.monotonic() + 10  # an action later than this counts as missed
        while cluster not in w.delete_seen and time.monotonic() < deadline:
            time.sleep(0.02)
        if cluster in w.delete_seen and pod in w.crash_seen:
            latencies.append(max(0.0, w.delete_seen[cluster] - w.crash_seen[pod]))
        else:
            missed += 1
        time.sleep(0.5)
    return {"failure_to_action_s": summary(latencies), "without_action_within_10s": missed}


def operator_force_deletes(log: Path, since: float, markers: list[str]) -> dict[str, dict[str, float]]:
    """marker -> cluster -> when the operator first logged that marker (sending its force deletes,
    or their answers) after ``since``: its own clock, while the watcher's times add the delivery
    of the pod events to the bench.  One read of the log for all markers."""
    out: dict[str, dict[str, float]] = {m: {} for m in markers}
    for line in log.read_text(errors="replace").splitlines():
        marker = next((m for m in markers if m in line), None)
        if marker is None:
            continue
        rec = json.loads(line)
        t = dt.datetime.fromisoformat(rec["timestamp"]).timestamp()
        if t >= since:
            out[marker].setdefault(rec["message"].split(":", 1)[0].split("/", 1)[-1], t)
    return out


def node_death(
    w: Watcher,
    core: client.CoreV1Api,
    dying: Kwok,
    node: str,
    timeout: float,
    log: Path,
    passes: Callable[[], float],
    processes: dict[str, int],
    requests: Callable[[], dict[str, float]],
) -> dict:
    on_node = core.list_namespaced_pod(NS, field_selector=f"spec.nodeName={node}").items
    affected = sorted({p.metadata.labels["tpi.dev/cluster"] for p in on_node})
    out: dict[str, Any] = {"ranks_on_node": len(on_node), "groups_on_node": len(affected)}
    w.watch_dying_node()
    time.sleep(2)  # its first list: pods a crash recreate earlier left terminating there are not this phase's
    w.dead_node_delete.clear()
    killed = time.time()
    dying.kill()
    deadline = time.monotonic() + timeout
    while w.not_ready_at is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if w.not_ready_at is None:
        raise SystemExit(f"node {node} never went NotReady")
    raw = json.loads(core.read_node(node, _preload_content=False).data)
    transition = dt.datetime.fromisoformat((ready_condition(raw) or {})["lastTransitionTime"].replace("Z", "+00:00"))
    due = transition.timestamp() + NODE_LOST_TIMEOUT  # when the operator's node-loss timeout expires
    out["kill_to_not_ready_s"] = round(w.not_ready_at - killed, 1)
    while time.time() < due - 0.5:
        time.sleep(0.02)
    requests_before = requests()  # ahead of the deadline: the operator is busiest right after it
    while time.time() < due:
        time.sleep(0.02)
    at_due, cpu_at_due = passes(), cpu_seconds(processes)
    while time.time() < due + 5:
        time.sleep(0.02)
    out["operator_passes_first_5s"] = passes() - at_due  # every cluster's, idle resyncs (~80) included
    cpu = cpu_seconds(processes)
    out["cpu_seconds_first_5s"] = {k: round(v - cpu_at_due[k], 2) for k, v in cpu.items() if k in cpu_at_due}
    sent = {k: v - requests_before.get(k, 0.0) for k, v in requests().items()}
    out["operator_api_requests_from_0.5s_before_to_5s_after"] = {k: v for k, v in sorted(sent.items()) if v}

    def served(cluster: str) -> float | None:
        act = w.dead_node_delete.get(cluster)
        return next((t for t in w.ready_at.get(cluster, []) if act is not None and t > act), None)

    while time.monotonic() < deadline and not all(served(c) is not None for c in affected):
        time.sleep(1)
    acted = [w.dead_node_delete[c] for c in affected if c in w.dead_node_delete]
    back = [t for c in affected if (t := served(c)) is not None]
    out["failure_to_action_s"] = summary([max(0.0, t - due) for t in acted])
    markers = {"failure_to_delete_sent_s": "force-deleting pods", "failure_to_delete_done_s": "force-deleted pods"}
    logged = operator_force_deletes(log, killed, list(markers.values()))
    for key, marker in markers.items():
        out[key] = summary([logged[marker][c] - due for c in affected if c in logged[marker]])
    # The delete was carried out by whichever saw it first: the watch (usually) or the operator's
    # answer (when the watch's delivery to this process lags behind it).
    answered = logged[markers["failure_to_delete_done_s"]]
    earliest = [min(w.dead_node_delete[c], answered.get(c, math.inf)) for c in affected if c in w.dead_node_delete]
    out["failure_to_action_seen_or_answered_s"] = summary([max(0.0, t - due) for t in earliest])
    out["failure_to_action_early_s"] = round(max([due - t for t in acted if t < due], default=0.0), 3)
    out["not_ready_to_action_s"] = summary([t - w.not_ready_at for t in acted])
    out["not_ready_to_group_ready_s"] = summary([t - w.not_ready_at for t in back])
    out["not_ready_to_every_group_ready_s"] = (
        round(max(back) - w.not_ready_at, 1) if len(back) == len(affected) and back else None
    )
    out["groups_not_ready_again_within_timeout"] = len(affected) - len(back)
    return out


def cleanup(api: client.ApiClient, timeout: float = 600) -> None:
    """Delete every cluster in one request while the operator runs (it releases its finalizers),
    then the namespace.  Clusters still there after ``timeout`` lose the finalizer by hand."""
    custom = client.CustomObjectsApi(api)
    args = {"group": "tpi.dev", "version": "v1alpha1", "namespace": NS, "plural": "tpinferenceclusters"}
    try:
        custom.delete_collection_namespaced_custom_object(**args)
        deadline = time.monotonic() + timeout
        while (left := custom.list_namespaced_custom_object(**args)["items"]) and time.monotonic() < deadline:
            time.sleep(5)
        for obj in left:
            body = {"metadata": {"finalizers": None}}
            custom.patch_namespaced_custom_object(name=obj["metadata"]["name"], body=body, **args)
    except client.ApiException as e:
        print(f"cleanup: {e.status} {e.reason}", file=sys.stderr)
    kubectl("delete", "namespace", NS, "--wait=false", check=False)


def clear_interrupted_run() -> None:
    """What a bench killed without its cleanup left: its nodes (no kwok plays them any more) and
    the pods bound to them, which no kubelet finalizes, so the namespace's deletion would wait."""
    kubectl("delete", "node", "-l", LABEL, "--wait=false", check=False)
    kubectl("delete", "pods", "-n", NS, "--all", "--force", "--grace-period=0", "--wait=false", check=False)


# ------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=500)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--faults", type=int, default=20, help="crashed containers injected one by one")
    p.add_argument("--node-ranks", type=int, default=50, help="ranks the dying node can host")
    p.add_argument("--ranks-per-node", type=int, default=100, help="room on each living node")
    p.add_argument("--steady-seconds", type=float, default=60)
    p.add_argument("--timeout", type=float, default=1800, help="for every cluster to run")
    p.add_argument("--heal-timeout", type=float, default=600, help="for the dead node's groups to be Ready again")
    p.add_argument("--log", default="/tmp/tpi-bench-operator.log", help="operator log file (JSON lines, timestamped)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--workers", type=int, help="the operator's reconcile workers (default: its own default)")
    args = p.parse_args()

    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True)
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    crd = REPO / "crds" / "tpi.dev_tpinferenceclusters.yaml"
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    clear_interrupted_run()
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=900)
    kubectl("create", "namespace", NS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still cleans up (finally)

    bench_id = f"bench-{os.getpid()}"
    ranks = args.clusters * args.tp
    living_nodes = max(1, math.ceil(ranks * 1.05 / args.ranks_per_node))
    logs = Path(args.log).parent
    dying, living = (
        Kwok(KUBECONFIG, f"{bench_id}-dying", "10.253.0.0/16", logs / "tpi-bench-kwok-dying.log"),
        Kwok(KUBECONFIG, f"{bench_id}-living", "10.254.0.0/16", logs / "tpi-bench-kwok-living.log"),
    )
    dead_node = f"{bench_id}-dying-0"
    node_names = [dead_node] + [f"{bench_id}-live-{i}" for i in range(living_nodes)]
    docs = [node_doc(dead_node, bench_id, dying.selector, args.node_ranks)]
    docs += [node_doc(n, bench_id, living.selector, args.ranks_per_node) for n in node_names[1:]]

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'contract'}"}
    port = free_port()
    result: dict = {"clusters": args.clusters, "tp": args.tp, "ranks": ranks, "living_nodes": living_nodes,
                    "dying_node_room": args.node_ranks}  # fmt: skip
    log = open(args.log, "wb")  # noqa: SIM115 - lives as long as the operator
    op: subprocess.Popen | None = None
    w = Watcher(api, dead_node)
    try:
        dying.start()
        living.start()
        kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), timeout=120)
        kubectl("wait", "--for=condition=Ready", *[f"node/{n}" for n in node_names], "--timeout=120s", timeout=150)
        op = subprocess.Popen(
            [sys.executable, "-m", "tpi_operator", "--namespace", NS, "--kubeconfig", str(KUBECONFIG),
             "--metrics-port", str(port), "--liveness-port", "0", "--log-format", "json",
             *(["--workers", str(args.workers)] if args.workers else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(3)
        w.start()
        manifests = "\n---\n".join(json.dumps(manifest(i, args.tp, bench_id)) for i in range(args.clusters))
        t0 = time.monotonic()
        kubectl("apply", "-f", "-", input=manifests, timeout=900)
        while len(apps.list_namespaced_stateful_set(NS, label_selector="tpi.dev/cluster").items) < args.clusters:
            time.sleep(1)
        result["apply_to_all_statefulsets_s"] = round(time.monotonic() - t0, 1)
        while True:
            items = json.loads(kubectl("get", "tpic", "-n", NS, "-o", "json", timeout=120))["items"]
            running = sum(1 for c in items if c.get("status", {}).get("phase") == "Running")
            if running == args.clusters:
                break
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"only {running} of {args.clusters} clusters Running after {args.timeout}s")
            time.sleep(5)
        result["apply_to_all_running_s"] = round(time.monotonic() - t0, 1)

        # steady state
        time.sleep(20)
        before, op_before = request_counts(), operator_requests(port)
        time.sleep(args.steady_seconds)
        after, op_after = request_counts(), operator_requests(port)
        op_rate = per_minute(op_after, op_before, args.steady_seconds)
        all_rate = per_minute(after, before, args.steady_seconds)
        result["operator_api_requests_per_min_steady"] = round(sum(op_rate.values()), 1)
        result["operator_api_requests_steady_by_kind"] = op_rate
        result["apiserver_requests_per_min_steady_all_clients"] = round(sum(all_rate.values()), 1)
        result["apiserver_requests_steady_top"] = dict(list(all_rate.items())[:8])
        result["operator_rss_mb_steady"] = round(rss_mb(op.pid), 1)

        if args.faults:
            result["crash"] = crash_faults(w, args.faults, args.clusters, args.tp)
        time.sleep(10)
        op_before, acts_before, t_before = operator_requests(port), operator_actions(port), time.monotonic()
        processes = {"operator": op.pid, **control_plane_pids()}
        if living.proc is not None:
            processes["kwok (living nodes)"] = living.proc.pid
        result["node_death"] = node_death(w, core, dying, dead_node, args.heal_timeout, Path(args.log),
                                          lambda: operator_passes(port), processes,
                                          lambda: operator_requests(port))  # fmt: skip
        phase_s = time.monotonic() - t_before
        result["node_death"]["phase_s"] = round(phase_s, 1)
        result["node_death"]["operator_api_requests_per_min"] = per_minute(operator_requests(port), op_before, phase_s)
        acts = operator_actions(port)
        result["node_death"]["operator_actions"] = {k: v - acts_before.get(k, 0) for k, v in acts.items()
                                                    if v > acts_before.get(k, 0)}  # fmt: skip
        result["operator_rss_mb_after_faults"] = round(rss_mb(op.pid), 1)
        nd = result["node_death"]["failure_to_action_s"]
        result["targets_met"] = bool(
            nd["p99"] is not None
            and nd["p99"] <= 2.0
            and result["operator_rss_mb_after_faults"] <= 300
            and result["node_death"]["groups_not_ready_again_within_timeout"] == 0
        )
    finally:
        w.stop.set()
        result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        cleanup(api)
        if op is not None:
            op.terminate()
            op.wait(30)
        dying.kill()
        living.kill()
        for n in node_names:  # PodGC then removes the pods still bound to them
            kubectl("delete", "node", n, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
