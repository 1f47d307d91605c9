"""Fixtures for the e2e tier: real pods on a real node (see tests/e2e/provider.py).

hack/e2e.sh brings the cluster, the node and the images up and then runs this suite; the fixtures
here only check that they are there (and fail loudly, never skip, when they are not).

Environment:
  TPI_E2E_PROVIDER        local (default) | kind
  TPI_E2E_RUNTIME_IMAGE   runtime image on the node (tpi/runtime:dev)
  TPI_E2E_OPERATOR_IMAGE  operator image on the node (tpi/operator:dev)
  TPI_E2E_SMOKE_IMAGE     any image with python3 for the infrastructure smoke test
                          (local: tpi/base:bookworm, kind: the runtime image)
  TPI_E2E_TIMINGS         JSON file the measured timings are appended to (_out/e2e-timings.json)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.provider import NODE_SELECTOR, TOLERATIONS, Provider, get_provider
from tests.kube import REPO, wait_until

RUNTIME_IMAGE = os.environ.get("TPI_E2E_RUNTIME_IMAGE", "tpi/runtime:dev")
OPERATOR_IMAGE = os.environ.get("TPI_E2E_OPERATOR_IMAGE", "tpi/operator:dev")
TIMINGS = Path(os.environ.get("TPI_E2E_TIMINGS", REPO / "_out" / "e2e-timings.json"))
RELEASE = "tpi-e2e"
OPERATOR_NAMESPACE = "tpi-e2e-system"
CHART = REPO / "charts" / "tpi-operator"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


def smoke_image(provider: Provider) -> str:
    default = "tpi/base:bookworm" if provider.name == "local" else RUNTIME_IMAGE
    return os.environ.get("TPI_E2E_SMOKE_IMAGE", default)


def record_timing(name: str, seconds: float, **extra: Any) -> None:
    """Print a measured time and append it to TIMINGS (the README and reports quote these)."""
    print(f"\n[e2e timing] {name}: {seconds:.1f}s {extra or ''}")
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else []
    entries.append({"name": name, "seconds": round(seconds, 2), "at": time.time(), **extra})
    TIMINGS.write_text(json.dumps(entries, indent=1))


# ------------------------------------------------------------------------------------ cluster
@pytest.fixture(scope="session")
def provider() -> Provider:
    p = get_provider()
    node = p.node_name()
    ready = p.kubectl("get", "node", node, "-o", 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')
    assert ready == "True", f"node {node} is not Ready: run hack/e2e.sh (or hack/node.sh up)"
    return p


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


@pytest.fixture(scope="session")
def kube(provider: Provider) -> Kube:
    return Kube(provider)


def _make_namespace(kube: Kube, base: str) -> str:
    name = f"{re.sub(r'[^a-z0-9-]', '-', base.lower())[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    kube("create", "namespace", name)
    kube("label", "namespace", name, "tpi.dev/e2e=true")
    wait_until(
        lambda: kube.p.kubectl("get", "serviceaccount", "default", "-n", name, check=False).strip(),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    return name


def _delete_namespace(kube: Kube, name: str) -> None:
    """Delete and wait until its pods are gone, so the next test gets the node's capacity back."""
    kube("delete", "namespace", name, "--wait=false", check=False)
    try:
        wait_until(
            lambda: not kube.p.kubectl("get", "pods", "-n", name, "-o", "name", check=False).strip(),
            timeout=120,
            what=f"pods of namespace {name} gone",
        )
    except AssertionError as e:  # report, but do not mask the test's own result
        print(f"warning: {e}")


@pytest.fixture()
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted (pods waited for) afterwards."""
    name = _make_namespace(kube, request.node.name)
    yield name
    _dump_on_failure(kube, name, request)
    _delete_namespace(kube, name)


@pytest.fixture(scope="module")
def module_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _make_namespace(kube, request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    yield name
    _delete_namespace(kube, name)


def _dump_on_failure(kube: Kube, namespace: str, request: pytest.FixtureRequest) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        return
    dump_namespace(kube, namespace)


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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


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
            "extraArgs": ["--verbose"] if os.environ.get("TPI_E2E_OPERATOR_VERBOSE") else [],
        }

    def install(self) -> float:
        t0 = time.monotonic()
        values = REPO / "_out" / "e2e-operator-values.json"
        values.parent.mkdir(parents=True, exist_ok=True)
        values.write_text(json.dumps(self.values()))
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


@pytest.fixture(scope="session")
def operator(provider: Provider) -> Iterator[Operator]:
    op = Operator(provider)
    seconds = op.install()
    record_timing("helm install (operator Available)", seconds)
    yield op
    if op.installed:
        try:
            op.uninstall()
        except RuntimeError as e:
            print(f"warning: {e}")


# --------------------------------------------------------------------------------- checkpoint
PROMPT_IDS = [1, 17, 42, 99, 7, 123, 5]
MAX_TOKENS = 12


def _venv_python() -> str:
    import sys

    return sys.executable


def reference_generation(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from one local process: `python -m tpi_runtime generate` (world size 1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "runtime"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            _venv_python(), "-m", "tpi_runtime", "generate", "--model", str(model_dir),
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-tokens", str(max_tokens),
            "--temperature", "0", "--dtype", "float32", "--device", "cpu",
        ],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"local generate failed: {out.stderr[-2000:]}"
    m = re.search(r"^token_ids: *([0-9, ]*)$", out.stdout, re.M)
    assert m, f"no token_ids in the generate output: {out.stdout!r}"
    return [int(x) for x in m.group(1).split(",") if x.strip()]


class Checkpoint:
    def __init__(self, local: Path, node_path: str, reference: list[int]) -> None:
        self.local, self.node_path, self.reference = local, node_path, reference


@pytest.fixture(scope="session")
def checkpoint(provider: Provider, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A tiny Llama checkpoint made here, copied onto the node, with its single-process reference."""
    from tpi_runtime.testing import make_tiny_checkpoint

    local = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_tiny_checkpoint(local, seed=1234)
    node_path = provider.stage_dir(local, f"tiny-{uuid.uuid4().hex[:6]}")
    return Checkpoint(local, node_path, reference_generation(local, PROMPT_IDS, MAX_TOKENS))


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
                    "t": t, "s": time.time() - t}
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
