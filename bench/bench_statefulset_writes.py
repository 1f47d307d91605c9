#!/usr/bin/env python3
"""What a recreate's StatefulSet write costs the API server: the merge patch the operator sends
now (``reconcile.incarnation_move``) against the server-side apply of the whole object it sent
before, on the local control plane (hack/cluster.sh up).

    python bench/bench_statefulset_writes.py [--statefulsets 40] [--rounds 5]

Applies N StatefulSets rendered by the operator (replicas 0: no pods, so only the write and the
StatefulSet controller's answer to it count), then moves each to a new incarnation, round after
round, once by apply and once by merge patch.  Reports the API server's CPU per write (from
/proc, over the round and SETTLE_SECONDS after it, so the write and everything it sets off there:
the controller's ControllerRevision and status writes; less its idle CPU) and the median request
latency, and the ratios patch / apply of the best round of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "contract"), str(REPO / "hack")]
from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec  # noqa: E402
from tpi_operator.core import render  # noqa: E402
from tpi_operator.kube import Kube  # noqa: E402
from tpikit.kube import KUBECONFIG, kubectl  # noqa: E402

NS = "tpi-bench-sts"
#: After each round, for kube-controller-manager's answers (ControllerRevisions, status) to land:
#: with 3 s they spilled into the next round, and whichever mode went second looked twice as dear.
SETTLE_SECONDS = 15.0
SPEC = TPInferenceClusterSpec.model_validate({
    "image": "tpi-runtime:bench", "model": {"source": {"image": {"path": "/models/bench"}}}, "tensorParallelSize": 4,
})  # fmt: skip
IDENT = render.Identity(name="b", namespace=NS, uid="bench")


def rendered(group: int, incarnation: int) -> dict:
    """The operator's StatefulSet, without pods (replicas 0) or an owner (no cluster here)."""
    gs = render.GroupSettings(group=group, tp=4, batch=8, incarnation=incarnation)
    sts = render.statefulset(SPEC, IDENT, gs)
    sts["metadata"].pop("ownerReferences")
    return render.with_replicas(sts, 0)


def apiserver_cpu_s() -> float:
    pid = subprocess.run(["pgrep", "-f", "bin/kube-apiserver"], capture_output=True, text=True, check=True).stdout
    fields = Path(f"/proc/{pid.split()[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--statefulsets", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], check=True)
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=300)  # an earlier run's
    kubectl("create", "namespace", NS)
    kube = Kube.connect(pool_size=4, kubeconfig=str(KUBECONFIG))
    n, incarnation = args.statefulsets, 0
    for g in range(n):
        kube.apply(rendered(g, incarnation))
    time.sleep(SETTLE_SECONDS)
    cpu0 = apiserver_cpu_s()
    time.sleep(2 * SETTLE_SECONDS)
    idle = (apiserver_cpu_s() - cpu0) / (2 * SETTLE_SECONDS)  # cores the API server uses with nothing to do
    print(f"API server idle: {idle:.3f} cores (subtracted)")
    results: dict[str, list[tuple[float, float]]] = {"apply": [], "patch": []}
    try:
        for r in range(args.rounds):
            for mode in ("apply", "patch"):
                incarnation += 1
                cpu0, t_start, latencies = apiserver_cpu_s(), time.monotonic(), []
                for g in range(n):
                    before, after = rendered(g, incarnation - 1), rendered(g, incarnation)
                    t0 = time.perf_counter()
                    if mode == "apply":
                        kube.apply(after)
                    else:  # what reconcile.incarnation_move sends: the difference of the two renderings
                        kube.patch("StatefulSet", NS, after["metadata"]["name"], render.merge_patch(before, after))
                    latencies.append(time.perf_counter() - t0)
                time.sleep(SETTLE_SECONDS)  # the controller's answers to these writes land here too
                cpu = (apiserver_cpu_s() - cpu0 - idle * (time.monotonic() - t_start)) / n
                results[mode].append((cpu, statistics.median(latencies)))
                print(f"round {r} {mode:5}: API server CPU {cpu * 1e3:5.1f} ms/write, "
                      f"latency median {statistics.median(latencies) * 1e3:5.1f} ms")  # fmt: skip
    finally:
        kubectl("delete", "namespace", NS, "--wait=false", check=False)
    # The best round of each: the API server has a periodic burst of its own (~1 s of CPU about
    # once a minute) that lands in some rounds of either mode, tripling their cost.
    best = {m: (min(c for c, _ in v), min(t for _, t in v)) for m, v in results.items()}
    sizes = {"apply": len(json.dumps(rendered(0, 1))), "patch": len(json.dumps(render.merge_patch(*map(
        lambda i: rendered(0, i), (0, 1)))))}  # fmt: skip
    print(f"body: apply {sizes['apply']} B, patch {sizes['patch']} B")
    print(
        f"best round: apply {best['apply'][0] * 1e3:.1f} ms CPU, {best['apply'][1] * 1e3:.1f} ms latency; "
        f"patch {best['patch'][0] * 1e3:.1f} ms CPU, {best['patch'][1] * 1e3:.1f} ms latency"
    )
    print(f"merge patch / whole apply: API server CPU {best['patch'][0] / best['apply'][0]:.2f}x, "
          f"latency {best['patch'][1] / best['apply'][1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
