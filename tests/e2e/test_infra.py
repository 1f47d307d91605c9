"""The real node itself: pods start, talk over the bridge, find each other through cluster DNS
(the headless-Service names rank rendezvous relies on) and reach ClusterIP Services, including
the API server's own (10.96.0.1), through kube-proxy. No TPI code involved."""

from __future__ import annotations

import json
import time

from tpikit.cluster import Kube
from tpikit.provider import NODE_SELECTOR, TOLERATIONS, Provider

from tests.e2e.conftest import smoke_image

SERVER = r"""
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

PROBE = r"""
import json, socket, ssl, sys, urllib.request
out = {}
for name in sys.argv[1:]:
    try:
        addr = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError as e:
        out[name] = {"error": f"resolve: {e}"}; continue
    try:
        url = f"https://{name}/version" if name.startswith("kubernetes.") else f"http://{name}:8080/"
        ctx = ssl._create_unverified_context()
        with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
            out[name] = {"addr": addr, "body": r.read().decode()[:200]}
    except Exception as e:
        out[name] = {"addr": addr, "error": repr(e)}
print(json.dumps(out))
"""


def _pod(name: str, image: str, command: list[str], labels: dict[str, str], **spec: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": NODE_SELECTOR,
            "tolerations": TOLERATIONS,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                }
            ],
            **spec,
        },
    }


def test_pods_talk_over_headless_dns_and_cluster_ip(provider: Provider, kube: Kube, namespace: str) -> None:
    k = Kube(provider, namespace)
    image = smoke_image(provider)
    t0 = time.monotonic()
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "peers"},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"app": "smoke"},
                "ports": [{"name": "http", "port": 8080}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "front"},
            "spec": {"selector": {"app": "smoke", "role": "server"}, "ports": [{"port": 8080}]},
        },
        _pod("server", image, ["python3", "-c", SERVER], {"app": "smoke", "role": "server"},
             hostname="server", subdomain="peers"),
        _pod("client", image, ["python3", "-c", "import time; time.sleep(10**9)"], {"app": "smoke"},
             hostname="client", subdomain="peers"),
    )  # fmt: skip
    k("wait", "--for=condition=Ready", "pod/server", "pod/client", "--timeout=120s", timeout=130)
    print(f"\n[e2e timing] two pods Ready: {time.monotonic() - t0:.1f}s")

    pods = {p["metadata"]["name"]: p for p in k.items("pods")}
    node = provider.node_name()
    for p in pods.values():
        assert p["spec"]["nodeName"] == node
        assert p["status"]["podIP"].startswith("10.88.") or provider.name != "local", p["status"]["podIP"]

    fqdn = f"server.peers.{namespace}.svc.cluster.local"
    names = [fqdn, f"front.{namespace}.svc.cluster.local", "kubernetes.default.svc.cluster.local"]
    # DNS records follow EndpointSlices: give CoreDNS's watch a moment.
    deadline = time.monotonic() + 60
    while True:
        out = k("exec", "-i", "client", "--", "python3", "-", *names, input=PROBE, timeout=60)
        res = json.loads(out.strip().splitlines()[-1])
        if all("error" not in r for r in res.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert res[fqdn] == {"addr": pods["server"]["status"]["podIP"], "body": "server"}, res
    front = res[f"front.{namespace}.svc.cluster.local"]
    svc_ip = k.get("service", "front")["spec"]["clusterIP"]
    assert front == {"addr": svc_ip, "body": "server"}, res
    api = res["kubernetes.default.svc.cluster.local"]
    assert "error" not in api and '"gitVersion"' in api["body"], res
