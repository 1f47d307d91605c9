#!/usr/bin/env python3
"""Operator benchmark on the local control plane with kwok fake nodes (hack/cluster.sh up).

    python bench/bench_operator.py [--clusters 100] [--tp 4] [--faults 50] [--steady-seconds 60]

Measures, for N clusters x TP ranks:
  * apply -> every StatefulSet created, and -> every cluster Running;
  * injected failure -> operator action: from the watch event where kwok reports the crashed
    container (restartCount grows) to the event where the operator deletes the group's pods;
    p50/p99 over --faults injections (target p99 <= 2 s);
  * operator RSS (target <= 250 MB);
  * API requests/min at steady state over --steady-seconds: the operator's own requests (its
    tpi_operator_api_requests_total counter: everything but kopf's watches and Event posts, target 0)
    and apiserver_request_total for all clients (kwok and the controllers included: an upper
    bound), with the busiest verb/resource pairs.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))
from tpikit.kube import KUBECONFIG, kubectl  # noqa: E402

NS = "tpi-bench"


def manifest(i: int, tp: int) -> dict:
    return {
        "apiVersion": "tpi.dev/v1alpha1",
        "kind": "TPInferenceCluster",
        "metadata": {"name": f"b{i:03d}", "namespace": NS},
        "spec": {
            "image": "tpi-runtime:bench",
            "model": {"source": {"image": {"path": "/models/bench"}}},  # no volume to wait for
            "tensorParallelSize": tp,
            "resources": {"cpu": "10m", "memory": "16Mi"},
            "failurePolicy": {"backoffSeconds": 0, "maxGroupRestarts": 20},
        },
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


def operator_requests(port: int) -> dict[str, float]:
    """The operator's own API requests by 'METHOD resource' (its Prometheus counter)."""
    counts: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    for line in text.splitlines():
        if line.startswith("tpi_operator_api_requests_total{"):
            sample, value = line.rsplit(" ", 1)
            labels = dict(kv.split("=", 1) for kv in sample[sample.index("{") + 1 : -1].split(","))
            counts[f"{labels['method'].strip(chr(34))} {labels['resource'].strip(chr(34))}"] = float(value)
    return counts


def per_minute(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    delta = {k: (v - before.get(k, 0.0)) * 60 / seconds for k, v in after.items()}
    return {k: round(v, 1) for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--faults", type=int, default=50)
    p.add_argument("--steady-seconds", type=float, default=60)
    p.add_argument("--log", default="/tmp/tpi-bench-operator.log", help="operator log file")
    args = p.parse_args()

    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True)
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO / "crds" / "tpi.dev_tpinferenceclusters.yaml"),
    )
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=300)
    kubectl("create", "namespace", NS)

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'contract'}"}
    port = free_port()
    log = open(args.log, "wb")  # noqa: SIM115 - lives as long as the operator
    op = subprocess.Popen(
        [sys.executable, "-m", "tpi_operator", "--namespace", NS, "--kubeconfig", str(KUBECONFIG),
         "--metrics-port", str(port), "--liveness-port", "0", "--log-format", "plain"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    result: dict = {"clusters": args.clusters, "tp": args.tp}
    try:
        time.sleep(3)
        docs = "\n---\n".join(json.dumps(manifest(i, args.tp)) for i in range(args.clusters))
        t0 = time.monotonic()
        kubectl("apply", "-f", "-", input=docs, timeout=300)
        while len(apps.list_namespaced_stateful_set(NS, label_selector="tpi.dev/cluster").items) < args.clusters:
            time.sleep(0.25)
        result["apply_to_all_statefulsets_s"] = round(time.monotonic() - t0, 2)
        while True:
            items = json.loads(kubectl("get", "tpic", "-n", NS, "-o", "json", timeout=120))["items"]
            if sum(1 for c in items if c.get("status", {}).get("phase") == "Running") == args.clusters:
                break
            if time.monotonic() - t0 > 300:
                raise SystemExit("clusters never all Running")
            time.sleep(1)
        result["apply_to_all_running_s"] = round(time.monotonic() - t0, 2)

        # steady state
        time.sleep(10)
        before, op_before = request_counts(), operator_requests(port)
        time.sleep(args.steady_seconds)
        after, op_after = request_counts(), operator_requests(port)
        op_rate = per_minute(op_after, op_before, args.steady_seconds)
        all_rate = per_minute(after, before, args.steady_seconds)
        result["operator_api_requests_per_min_steady"] = round(sum(op_rate.values()), 1)
        result["operator_api_requests_steady_by_kind"] = op_rate
        result["apiserver_requests_per_min_steady_all_clients"] = round(sum(all_rate.values()), 1)
        result["apiserver_requests_steady_top"] = dict(list(all_rate.items())[:8])
        result["operator_rss_mb"] = round(rss_mb(op.pid), 1)

        # failure -> action latency
        fault_seen: dict[str, float] = {}
        action_seen: dict[str, float] = {}
        stop = threading.Event()

        def watcher() -> None:
            w = watch.Watch()
            for ev in w.stream(
                core.list_namespaced_pod, NS, label_selector="tpi.dev/cluster", timeout_seconds=600
            ):
                pod = ev["object"]
                name, now = pod.metadata.name, time.monotonic()
                cs = (pod.status.container_statuses or [None])[0]
                # kwok reports the failure as kubelet does: terminated first, then restartCount + 1
                failed = cs is not None and (cs.restart_count or (cs.state and cs.state.terminated))
                if failed and name not in fault_seen:
                    fault_seen[name] = now
                group = pod.metadata.labels.get("tpi.dev/cluster")
                if pod.metadata.deletion_timestamp and group not in action_seen:
                    action_seen[group] = now
                if stop.is_set():
                    w.stop()

        thread = threading.Thread(target=watcher, daemon=True)
        thread.start()
        time.sleep(2)
        victims = random.sample(range(args.clusters), min(args.faults, args.clusters))
        latencies = []
        for i in victims:
            cluster, pod = f"b{i:03d}", f"b{i:03d}-g0-{random.randrange(args.tp)}"
            kubectl("annotate", "pod", pod, "-n", NS, "--overwrite", "tpi.dev/fault=crash",
                    "tpi.dev/fault-restart=true", "tpi.dev/fault-restart-delay=0s")  # fmt: skip
            deadline = time.monotonic() + 10  # an action later than this counts as missed
            while cluster not in action_seen and time.monotonic() < deadline:
                time.sleep(0.02)
            if cluster in action_seen and pod in fault_seen:
                latencies.append(max(0.0, action_seen[cluster] - fault_seen[pod]))
        stop.set()
        result["failure_to_action_p50_s"] = round(statistics.median(latencies), 3) if latencies else None
        result["failure_to_action_p99_s"] = round(pct(latencies, 0.99), 3) if latencies else None
        result["failures_measured"] = len(latencies)
        result["failures_without_action_within_10s"] = len(victims) - len(latencies)
        result["operator_rss_mb_after_faults"] = round(rss_mb(op.pid), 1)
        result["targets_met"] = bool(
            latencies
            and pct(latencies, 0.99) <= 2.0
            and result["operator_rss_mb_after_faults"] <= 250
            and result["operator_api_requests_per_min_steady"] == 0
        )
    finally:
        kubectl("delete", "tpic", "--all", "-n", NS, "--wait=true", timeout=600, check=False)
        op.terminate()
        op.wait(30)
        kubectl("delete", "namespace", NS, "--wait=false", check=False)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
