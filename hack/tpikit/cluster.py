"""The Kubernetes plumbing the e2e tier (tests/e2e) and the demo (hack/demo.py) share: kubectl
bound to a namespace, the operator as a Helm release, an in-cluster client pod, TPInferenceCluster
manifests for the real node and waiting until one serves. Test fixtures stay in tests/e2e/conftest.py.

Environment:
  TPI_E2E_RUNTIME_IMAGE   runtime image on the node (tpi/runtime:dev)
  TPI_E2E_OPERATOR_IMAGE  operator image on the node (tpi/operator:dev)
  TPI_E2E_OPERATOR_VERBOSE  run the operator with --verbose
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any

from tpikit.kube import DEFAULT_OPERATOR_IMAGE, DEFAULT_RUNTIME_IMAGE, REPO, wait_until
from tpikit.provider import NODE_DATA_DIR, NODE_SELECTOR, TOLERATIONS, Provider

RUNTIME_IMAGE = os.environ.get("TPI_E2E_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE)
OPERATOR_IMAGE = os.environ.get("TPI_E2E_OPERATOR_IMAGE", DEFAULT_OPERATOR_IMAGE)
RELEASE = "tpi-e2e"
OPERATOR_NAMESPACE = "tpi-e2e-system"
CHART = REPO / "charts" / "tpi-operator"
#: What the client sends by default (the tests compare the answer with a local generate).
PROMPT_IDS = [1, 17, 42, 99, 7, 123, 5]
MAX_TOKENS = 12


class Kube:
    """Small kubectl-based helpers bound to one provider (and optionally one namespace)."""

    def __init__(self, provider: Provider, namespace: str = "") -> None:
        self.p = provider
        self.ns = namespace

    def __call__(self, *args: str, **kw: Any) -> str:
        ns = ("-n", self.ns) if self.ns else ()
        return self.p.kubectl(*ns, *args, **kw)

    def apply(self, *objs: dict[str, Any]) -> None:
        self("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))

    def get(self, kind: str, name: str = "", selector: str = "", check: bool = True) -> dict[str, Any]:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if selector:
            args += ["-l", selector]
        out = self(*args, check=check)
        return json.loads(out) if out.strip() else {}

    def items(self, kind: str, selector: str = "") -> list[dict[str, Any]]:
        return self.get(kind, selector=selector).get("items", [])

    def exists(self, kind: str, name: str) -> bool:
        return bool(self("get", kind, name, "--ignore-not-found", "-o", "name").strip())

    def logs(self, pod: str, container: str = "", previous: bool = False, tail: int = 60) -> str:
        args = ["logs", pod, f"--tail={tail}"]
        if container:
            args += ["-c", container]
        if previous:
            args.append("--previous")
        return self(*args, check=False)


def dump_namespace(kube: Kube, namespace: str) -> None:
    k = Kube(kube.p, namespace)
    print(f"\n===== state of namespace {namespace}")
    print(k("get", "tpic,sts,pods,svc,endpoints,leases", "-o", "wide", check=False))
    print(k("get", "events", "--sort-by=.lastTimestamp", check=False)[-4000:])
    for cr in k.items("tpinferenceclusters"):
        print(json.dumps(cr.get("status", {}), indent=1)[-4000:])
    for pod in k.items("pods"):
        name = pod["metadata"]["name"]
        print(f"----- logs of {name}")
        print(k.logs(name, tail=40))


# ----------------------------------------------------------------------------------- operator
class Operator:
    """The operator as a Helm release, installed in-cluster from its image (re-installable)."""

    def __init__(self, provider: Provider) -> None:
        self.p = provider
        self.installed = False

    def values(self) -> dict[str, Any]:
        repo, _, tag = OPERATOR_IMAGE.rpartition(":")
        return {
            "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "allowedHostPaths": [NODE_DATA_DIR],  # where the tier's hostPath checkpoints are staged
            "extraArgs": ["--verbose"] if os.environ.get("TPI_E2E_OPERATOR_VERBOSE") else [],
        }

    def install(self) -> float:
        t0 = time.monotonic()
        values = REPO / "_out" / "e2e-operator-values.json"
        values.parent.mkdir(parents=True, exist_ok=True)
        values.write_text(json.dumps(self.values()))
        # Helm installs a chart's crds/ only when the CRD is absent and never upgrades it: a cluster
        # left from an older checkout would reject this revision's spec and status fields.
        crd = CHART / "crds" / "tpi.dev_tpinferenceclusters.yaml"
        self.p.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        self.p.kubectl("wait", "--for=condition=Established", "crd/tpinferenceclusters.tpi.dev", "--timeout=60s")
        self.p.helm(
            "upgrade", "--install", RELEASE, str(CHART),
            "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
            "--values", str(values), "--wait", "--timeout", "180s",
        )  # fmt: skip
        self.installed = True
        return time.monotonic() - t0

    def ensure(self) -> None:
        if not self.installed:
            self.install()

    def uninstall(self) -> None:
        self.p.helm("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait", "--timeout", "120s")
        self.installed = False

    def logs(self, tail: int = 200) -> str:
        return self.p.kubectl(
            "logs", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/instance=" + RELEASE,
            f"--tail={tail}", check=False,
        )  # fmt: skip


# -------------------------------------------------------------------------------------- client
CLIENT_SCRIPT = r"""
import json, os, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

mode, url, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def one():
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=float(os.environ.get("T", "120"))) as r:
            out = json.loads(r.read())
            c = out["choices"][0]
            return {"ok": True, "status": r.status, "token_ids": c.get("token_ids"), "text": c.get("text"),
                    "content": (c.get("message") or {}).get("content"), "t": t, "s": time.time() - t}
    except urllib.error.HTTPError as e:
        return {"ok": False, "status": e.code, "error": e.read().decode(errors="replace")[:300], "t": t}
    except Exception as e:
        return {"ok": False, "status": 0, "error": repr(e)[:300], "t": t}

if mode == "once":
    print(json.dumps(one()), flush=True)
elif mode == "parallel":  # n at once (connections opened STAGGER s apart: small accept backlogs)
    n, stagger = int(sys.argv[4]), float(os.environ.get("STAGGER", "0.02"))
    with ThreadPoolExecutor(n) as ex:
        for res in ex.map(lambda i: (time.sleep(i * stagger), one())[1], range(n)):
            print(json.dumps(res), flush=True)
elif mode == "loop":  # until /tmp/stop-<id> exists
    stop = "/tmp/stop-" + sys.argv[4]
    while not os.path.exists(stop):
        print(json.dumps(one()), flush=True)
        time.sleep(float(os.environ.get("INTERVAL", "0.2")))
"""


class Client:
    """A pod in the test namespace that sends completions to a Service by its DNS name.

    Going through a pod exercises what users rely on (cluster DNS, the ClusterIP Service and
    kube-proxy) the same way on both providers.
    """

    def __init__(self, kube: Kube, namespace: str, image: str = RUNTIME_IMAGE) -> None:
        self.k = Kube(kube.p, namespace)
        self.ns = namespace
        self.pod = "e2e-client"
        self.k.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": self.pod, "labels": {"app": "e2e-client"}},
                "spec": {
                    "nodeSelector": NODE_SELECTOR,
                    "tolerations": TOLERATIONS,
                    "terminationGracePeriodSeconds": 0,
                    "enableServiceLinks": False,
                    "containers": [
                        {
                            "name": "client",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "command": ["python3", "-c", "import time; time.sleep(10**9)"],
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "64Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                        }
                    ],
                },
            }
        )
        self.k("wait", "--for=condition=Ready", f"pod/{self.pod}", "--timeout=120s", timeout=130)

    def _exec(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        out = self.k(
            "exec", "-i", self.pod, "--", "env", *envs, "python3", "-", *args, input=CLIENT_SCRIPT, timeout=timeout
        )
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    @staticmethod
    def body(prompt_ids: list[int] = PROMPT_IDS, max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
        return {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, **extra}

    def complete(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._exec("once", url, json.dumps(body or self.body()))[0]

    def parallel(
        self, url: str, n: int, body: dict[str, Any] | None = None, stagger: float = 0.02
    ) -> list[dict[str, Any]]:
        """n requests at once; connections opened `stagger` seconds apart."""
        return self._exec("parallel", url, json.dumps(body or self.body()), str(n), env={"STAGGER": str(stagger)})

    def start_loop(self, url: str, body: dict[str, Any] | None = None) -> tuple[subprocess.Popen[str], str]:
        """Send requests one after another until stop_loop; returns the kubectl exec process."""
        token = uuid.uuid4().hex[:8]
        proc = subprocess.Popen(
            [
                self.k.p.kubectl_bin, "--kubeconfig", self.k.p.kubeconfig, "-n", self.ns,
                "exec", "-i", self.pod, "--", "python3", "-", "loop", url, json.dumps(body or self.body()), token,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(CLIENT_SCRIPT)
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it again
        return proc, token

    def stop_loop(self, proc: subprocess.Popen[str], token: str) -> list[dict[str, Any]]:
        self.k("exec", self.pod, "--", "touch", f"/tmp/stop-{token}")
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"client loop failed: {err[-2000:]}"
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------ TPInferenceCluster
def tpic(name: str, model_path: str, **spec: Any) -> dict[str, Any]:
    """A TPInferenceCluster for the real node: hostPath checkpoint, runtime image, gloo, CPU."""
    base: dict[str, Any] = {
        "image": RUNTIME_IMAGE,
        "imagePullPolicy": "Never",
        "model": {"source": {"hostPath": {"path": model_path}}},
        "tensorParallelSize": 2,
        "replicas": 1,
        "backend": "gloo",
        "resources": {"cpu": "200m", "memory": "1Gi"},
        "runtime": {"dtype": "float32", "maxBatchSize": 8},
        "scheduling": {"nodeSelector": NODE_SELECTOR, "tolerations": TOLERATIONS},
        "failurePolicy": {
            "heartbeatTimeoutSeconds": 15,
            "backoffSeconds": 1,
            "maxBackoffSeconds": 10,
            "maxGroupRestarts": 10,
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {"apiVersion": "tpi.dev/v1alpha1", "kind": "TPInferenceCluster", "metadata": {"name": name}, "spec": base}


def status(k: Kube, name: str) -> dict[str, Any]:
    return k.get("tpinferenceclusters", name).get("status", {}) or {}


def is_serving(k: Kube, name: str, groups: int = 1) -> dict[str, Any] | None:
    """The status once `groups` groups are ready for the current generation, else None."""
    obj = k.get("tpinferenceclusters", name)
    st = obj.get("status") or {}
    if st.get("observedGeneration") != obj["metadata"].get("generation"):
        return None
    if (st.get("readyReplicas") or 0) >= groups and st.get("phase") in ("Running", "Degraded"):
        return st
    return None


def wait_serving(k: Kube, name: str, timeout: float = 300, groups: int = 1) -> dict[str, Any]:
    try:
        return wait_until(lambda: is_serving(k, name, groups), timeout=timeout, interval=1, what=f"{name} serving")
    except AssertionError:
        dump_namespace(k, k.ns)
        raise


def endpoint_url(st: dict[str, Any], name: str, namespace: str, port: int = 8000) -> str:
    base = st.get("endpoint") or f"http://{name}.{namespace}.svc.cluster.local:{port}"
    return base.rstrip("/") + "/v1/completions"


def chat_url(st: dict[str, Any], name: str, namespace: str, port: int = 8000) -> str:
    """The OpenAI chat endpoint next to endpoint_url's completions."""
    return endpoint_url(st, name, namespace, port).removesuffix("/v1/completions") + "/v1/chat/completions"
