"""Rendering: names, contract env, pod security, ownership, hashes."""

from __future__ import annotations

import pytest
from op_builders import IDENT, make_spec
from tpi_operator.core import render


def sts(**spec_overrides):
    spec = make_spec(**spec_overrides)
    return spec, render.statefulset(spec, IDENT, render.GroupSettings(group=1, tp=4, batch=6, incarnation=2))


def test_statefulset_shape():
    _, obj = sts()
    assert obj["metadata"]["name"] == "demo-g1"
    s = obj["spec"]
    assert (s["replicas"], s["podManagementPolicy"], s["updateStrategy"]) == (
        4,
        "Parallel",
        {"type": "OnDelete"},
    )
    assert s["serviceName"] == "demo-ranks"
    labels = s["template"]["metadata"]["labels"]
    assert labels["tpi.dev/cluster"] == "demo" and labels["tpi.dev/group"] == "1"
    assert labels["tpi.dev/incarnation"] == "2" and labels["app.kubernetes.io/managed-by"] == "tpi-operator"
    assert set(s["selector"]["matchLabels"]) == {"tpi.dev/cluster", "tpi.dev/group"}  # immutable part only
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_contract_env_and_command():
    _, obj = sts()
    c = obj["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["WORLD_SIZE"]["value"] == "4"
    assert env["MASTER_ADDR"]["value"] == "demo-g1-0.demo-ranks.ns.svc.cluster.local"
    assert env["MASTER_PORT"]["value"] == "29500" and env["LOCAL_RANK"]["value"] == "0"
    assert env["TPI_LEASE_NAME"]["value"] == "$(POD_NAME)"  # the Lease is named after the pod
    assert [e["name"] for e in c["env"]].index("POD_NAME") < [e["name"] for e in c["env"]].index("TPI_LEASE_NAME")
    assert c["command"] == ["python", "-m", "tpi_runtime", "serve"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "/models/tiny"
    assert args[args.index("--effective-batch-size") + 1] == "6"
    assert env["TPI_HEARTBEAT_INTERVAL_SECONDS"]["value"] == "2"
    # The assigned batch reaches the rank one way only: the flag (no env twin, no pod annotation).
    assert "TPI_EFFECTIVE_BATCH_SIZE" not in env
    assert not any("batch" in k for k in obj["spec"]["template"]["metadata"]["annotations"])


def test_restricted_pod_security():
    _, obj = sts()
    pod = obj["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize(
    ("source", "volume_key", "model_dir"),
    [
        ({"pvc": {"claimName": "m", "path": "/a/b"}}, "persistentVolumeClaim", "/models/a/b"),
        ({"hostPath": {"path": "/data/llama"}}, "hostPath", "/models"),
        ({"image": {"path": "/weights"}}, None, "/weights"),
        ({"image": {"path": "/w", "reference": "reg/w:1"}}, "image", "/models/w"),
    ],
)
def test_model_sources(source, volume_key, model_dir):
    spec, obj = sts(model={"source": source})
    volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
    if volume_key:
        assert volume_key in volumes["model"]
    else:
        assert "model" not in volumes
    assert render.model_dir(spec) == model_dir


def test_resources_and_scheduling():
    _, obj = sts(
        ranksPerPod=1,  # one rank per pod: the per-rank amounts (GPU ranks default to one pod per group)
        resources={"cpu": "2", "memory": "8Gi", "gpus": 1},
        scheduling={"nodeSelector": {"gpu": "yes"}, "tolerations": [{"key": "g", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {"x": 1}}},
    )  # fmt: skip
    pod = obj["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"} == res["requests"]
    assert pod["nodeSelector"] == {"gpu": "yes"} and pod["tolerations"] == [{"key": "g", "operator": "Exists"}]
    assert pod["affinity"]["nodeAffinity"] == {"x": 1}  # the user's, kept (placement terms are added)


def test_template_hash_changes_with_spec_size_batch_restart_but_not_incarnation():
    spec = make_spec()

    def h(spec=spec, **kw):
        gs = render.GroupSettings(**{"group": 0, "tp": 4, "batch": 8, **kw})
        return render.template_hash(spec, IDENT, gs)

    base = h()
    assert h(incarnation=5) == base
    assert len({base, h(tp=2), h(batch=4), h(restarted_at="now"), h(spec=make_spec(image="other"))}) == 5


def test_services_leases_rbac():
    spec = make_spec()
    headless = render.headless_service(spec, IDENT)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    client = render.client_service(spec, IDENT)
    assert client["metadata"]["name"] == "demo"
    assert client["spec"]["selector"] == {"tpi.dev/cluster": "demo", "apps.kubernetes.io/pod-index": "0"}
    lease = render.lease(spec, IDENT, 1, 3)
    assert lease["metadata"]["name"] == "demo-g1-3" == lease["spec"]["holderIdentity"]
    assert "renewTime" not in lease["spec"]  # the runtime's field
    sa, role, binding = render.rbac(IDENT, ["demo-g0-1", "demo-g0-0"])
    # least privilege: its own cluster's Leases by name, no create (the operator creates them)
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "resourceNames": ["demo-g0-0", "demo-g0-1"],
                              "verbs": ["get", "update", "patch"]}]  # fmt: skip
    assert render.rbac(IDENT, [])[1]["rules"][0]["resourceNames"]  # never empty (that grants all)
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"] == "demo-runtime"
    for obj in [headless, client, lease, sa, role, binding]:
        assert obj["metadata"]["ownerReferences"][0]["controller"] is True
        assert obj["metadata"]["annotations"][render.A_OBJECT_HASH]


def test_template_hash_is_the_same_for_every_group_of_one_revision() -> None:
    # recovery compares every group's StatefulSet against hash_for(tp, batch): one hash per revision
    spec = make_spec()
    hashes = {render.template_hash(spec, IDENT, render.GroupSettings(group=g, tp=2, batch=8)) for g in range(3)}
    assert len(hashes) == 1
    sts1 = render.statefulset(spec, IDENT, render.GroupSettings(group=1, tp=2, batch=8))
    env = {e["name"]: e.get("value") for e in sts1["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"].startswith("demo-g1-0.")
