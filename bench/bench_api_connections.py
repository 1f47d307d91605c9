#!/usr/bin/env python3
"""What a burst of requests on new connections costs: the operator's API client
(``Kube.connect``: one TLS context, sessions resumed) against the kubernetes client's own pool
(a fresh TLS context, CA and client key loaded for every connection, full handshakes), on the
local control plane (hack/cluster.sh up).

    python bench/bench_api_connections.py [--requests 172] [--threads 64] [--rounds 5]

Each round, for each client in turn: a new client makes one request (its first connection, and a
session ticket), then `--threads` threads send `--requests` GETs of missing pods at once, as the
reconcilers' deletes go out when a node dies (172: the bench_operator node's ~43 groups x 4).
Reports, per burst, this process's CPU, the API server's CPU (from /proc) and the wall time,
the medians over the rounds, and the ratios ours / theirs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "contract"), str(REPO / "hack")]
from bench_statefulset_writes import apiserver_cpu_s  # noqa: E402
from kubernetes import client  # noqa: E402
from tpi_operator.kube import Kube, KubeError, load_configuration  # noqa: E402
from tpikit.kube import KUBECONFIG  # noqa: E402


def new_client(kind: str, pool: int) -> Kube:
    if kind == "ours":
        return Kube.connect(pool_size=pool, kubeconfig=str(KUBECONFIG))
    cfg = load_configuration(str(KUBECONFIG))
    cfg.connection_pool_maxsize = pool
    return Kube(client.ApiClient(configuration=cfg))


def get_missing(kube: Kube, i: int) -> None:
    try:
        kube.request("GET", f"/api/v1/namespaces/default/pods/tpi-bench-missing-{i}")
    except KubeError as e:
        if e.status != 404:
            raise


def burst(kind: str, requests: int, threads: int) -> tuple[float, float, float]:
    """(wall, this process's CPU, the API server's CPU) of one burst, in seconds."""
    kube = new_client(kind, pool=threads)
    get_missing(kube, -1)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: i, range(threads * 4)))  # every thread started before the clock
        cpu0, api0, wall0 = time.process_time(), apiserver_cpu_s(), time.perf_counter()
        list(pool.map(lambda i: get_missing(kube, i), range(requests)))
        wall, cpu, api = time.perf_counter() - wall0, time.process_time() - cpu0, apiserver_cpu_s() - api0
    kube.api.close()
    return wall, cpu, api


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=172)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True)
    kinds = {"ours": "Kube.connect (one TLS context, sessions resumed)",
             "theirs": "kubernetes client's pool (a context per connection)"}  # fmt: skip
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:  # alternating, so a drift of the machine's speed hits both
            measured = burst(kind, args.requests, args.threads)
            results[kind].append(measured)
            wall, cpu, api = measured
            print(f"round {r} {kind:6}: wall {wall * 1e3:5.0f} ms, client CPU {cpu * 1e3:5.0f} ms, "
                  f"API server CPU {api * 1e3:5.0f} ms", flush=True)  # fmt: skip
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in results.items()}
    print(f"\n{args.requests} GETs from {args.threads} threads on a new client, medians of {args.rounds} rounds:")
    for kind, label in kinds.items():
        wall, cpu, api = med[kind]
        print(
            f"  {label:52}: wall {wall * 1e3:5.0f} ms, client CPU {cpu * 1e3:5.0f} ms, "
            f"API server CPU {api * 1e3:5.0f} ms"
        )
    ours, theirs = med["ours"], med["theirs"]
    print(
        f"ours / theirs: wall {ours[0] / theirs[0]:.2f}x, client CPU {ours[1] / theirs[1]:.2f}x, "
        f"API server CPU {ours[2] / theirs[2]:.2f}x (lower is better)"
    )


if __name__ == "__main__":
    main()
