#!/usr/bin/env python3
"""Operator benchmark on the local control plane with kwok fake nodes (hack/cluster.sh up).

    python bench/bench_operator.py [--clusters 100] [--tp 4] [--faults 50] [--steady-seconds 60]

Measures, for N clusters x TP ranks:
  * apply -> every StatefulSet created, and -> every cluster Running;
  * injected failure -> operator action: from the watch event where kwok reports the crashed
    container (restartCount grows) to the event where the operator deletes the group's pods;
    p50/p99 over --faults injections (target p99 <= 2 s);
  * operator RSS (target <= 250 MB);
  * API requests/min at steady state: apiserver_request_total delta over --steady-seconds
    (all clients: kwok and the controllers are included, so this is an upper bound).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.kube import KUBECONFIG, kubectl  # noqa: E402

NS = "tpi-bench"


def manifest(i: int, tp: int) -> dict:
    return {
        "apiVersion": "tpi.dev/v1alpha1",
        "kind": "TPInferenceCluster",
        "metadata": {"name": f"b{i:03d}", "namespace": NS},
        "spec": {
            "image": "tpi-runtime:bench",
            "model": {"source": {"pvc": {"claimName": "models"}}},
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


def request_total() -> float:
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics", timeout=60).splitlines():
        if line.startswith("apiserver_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--faults", type=int, default=50)
    p.add_argument("--steady-seconds", type=float, default=60)
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

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}"}
    op = subprocess.Popen(
        [sys.executable, "-m", "tpi_operator", "--namespace", NS, "--kubeconfig", str(KUBECONFIG),
         "--metrics-port", "0", "--liveness-port", "0", "--log-format", "plain"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    result: dict = {"clusters": args.clusters, "tp": args.tp}
    try:
        time.sleep(3)
        docs = "\n---\n".join(json.dumps(manifest(i, args.tp)) for i in range(args.clusters))
        t0 = time.monotonic()
        kubectl("apply", "-f", "-", input=docs, timeout=300)
        while len(apps.list_namespaced_stateful_set(NS).items) < args.clusters:
            time.sleep(0.2)
        result["apply_to_all_statefulsets_s"] = round(time.monotonic() - t0, 2)
        while True:
            items = json.loads(kubectl("get", "tpic", "-n", NS, "-o", "json", timeout=120))["items"]
            if sum(1 for c in items if c.get("status", {}).get("phase") == "Running") == args.clusters:
                break
            if time.monotonic() - t0 > 900:
                raise SystemExit("clusters never all Running")
            time.sleep(1)
        result["apply_to_all_running_s"] = round(time.monotonic() - t0, 2)

        # steady state
        time.sleep(10)
        before = request_total()
        time.sleep(args.steady_seconds)
        result["api_requests_per_min_steady"] = round(
            (request_total() - before) * 60 / args.steady_seconds, 1
        )
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
                if cs is not None and cs.restart_count and name not in fault_seen:
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
            deadline = time.monotonic() + 30
            while cluster not in action_seen and time.monotonic() < deadline:
                time.sleep(0.02)
            if cluster in action_seen and pod in fault_seen:
                latencies.append(max(0.0, action_seen[cluster] - fault_seen[pod]))
        stop.set()
        result["failure_to_action_p50_s"] = round(statistics.median(latencies), 3) if latencies else None
        result["failure_to_action_p99_s"] = round(pct(latencies, 0.99), 3) if latencies else None
        result["failures_measured"] = len(latencies)
        result["operator_rss_mb_after_faults"] = round(rss_mb(op.pid), 1)
        result["targets_met"] = bool(
            latencies and pct(latencies, 0.99) <= 2.0 and result["operator_rss_mb_after_faults"] <= 250
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
