"""`make demo`, after hack/demo.sh has the cluster, the real node and the images up.

Installs the operator chart, makes a small checkpoint, applies a 2-rank TPInferenceCluster of it,
waits until it serves, and prints a completion (sent through the cluster's client Service from a
pod, as a user's in-cluster client would) and `kubectl get tpic`. The Kubernetes plumbing is
hack/tpikit's, which the e2e suite (tests/e2e) uses too, so the demo and the tests exercise the
same path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tpikit.cluster import Client, Kube, Operator, endpoint_url, tpic, wait_serving
from tpikit.kube import CACHE
from tpikit.provider import get_provider

NAMESPACE = "tpi-demo"
NAME = "demo"
PROMPT = "the cat sees a big red"


class DemoOperator(Operator):
    """The e2e release, watching only the demo namespace so it never acts on the test tiers' objects."""

    def values(self) -> dict[str, object]:
        return {**super().values(), "watchNamespaces": [NAMESPACE]}


def main() -> int:
    from tpi_runtime.testing import make_tiny_checkpoint

    provider = get_provider()
    # The operator watches only this namespace, so the chart's Role goes there: create it first.
    provider.kubectl("create", "namespace", NAMESPACE, check=False)
    # hack/e2e.sh stops what runs in namespaces with this label before the e2e tier needs the node.
    provider.kubectl("label", "namespace", NAMESPACE, "tpi.dev/demo=true", "--overwrite")
    print("[demo] helm install the operator (in-cluster, from its image)", flush=True)
    DemoOperator(provider).install()

    local = CACHE / "demo-model"
    if not (local / "config.json").exists():
        make_tiny_checkpoint(local, seed=1234)
    node_path = provider.stage_dir(Path(local), "demo-model")
    print(f"[demo] checkpoint {local} -> node:{node_path}", flush=True)

    k = Kube(provider, NAMESPACE)
    k.apply(tpic(NAME, node_path, failurePolicy={"heartbeatTimeoutSeconds": 30}))
    t0 = time.monotonic()
    print(f"[demo] applied TPInferenceCluster {NAMESPACE}/{NAME} (tp=2, gloo); waiting for Ready", flush=True)
    st = wait_serving(k, NAME, timeout=600)
    print(f"[demo] Ready in {time.monotonic() - t0:.1f}s", flush=True)

    client = Client(k, NAMESPACE)
    url = endpoint_url(st, NAME, NAMESPACE)
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    res = client.complete(url, body)
    if not res.get("ok"):
        print(f"[demo] completion failed: {json.dumps(res)}", file=sys.stderr)
        return 1
    print(f"\n$ curl {url} -d '{json.dumps(body)}'")
    print(json.dumps({"prompt": PROMPT, "text": res["text"], "token_ids": res["token_ids"]}, indent=1))
    print(f"\n$ kubectl get tpic -n {NAMESPACE} -o wide")
    print(provider.kubectl("get", "tpic", "-n", NAMESPACE, "-o", "wide"))
    print(f"(the demo cluster keeps running; remove it with: kubectl delete tpic {NAME} -n {NAMESPACE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
