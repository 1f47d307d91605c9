"""The Helm chart, rendered and linted by a real helm binary (no mocks).

helm comes from ${TPI_HELM:-~/.cache/tpi/k8s-v1.34.4/bin/helm}; the tests fail, never skip, when it
is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, REPO, run_helm

RELEASE, NS = "tpi", "tpi-system"
FULLNAME = "tpi-tpi-operator"
ALL_VERBS = ["create", "get", "list", "watch", "patch", "update", "delete"]

# What the operator needs in every namespace it reconciles: (apiGroup, resource) -> verbs.
NAMESPACED_RULES: dict[tuple[str, str], set[str]] = {
    ("tpi.dev", "tpinferenceclusters"): {"get", "list", "watch", "patch", "update"},
    ("tpi.dev", "tpinferenceclusters/status"): {"get", "patch", "update"},
    ("tpi.dev", "tpinferenceclusters/scale"): {"get", "patch", "update"},
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on the finalizers
    ("tpi.dev", "tpinferenceclusters/finalizers"): {"update"},
    ("apps", "statefulsets"): set(ALL_VERBS),
    ("", "services"): set(ALL_VERBS),
    ("", "configmaps"): set(ALL_VERBS),
    ("", "serviceaccounts"): set(ALL_VERBS),
    ("coordination.k8s.io", "leases"): set(ALL_VERBS),
    ("rbac.authorization.k8s.io", "roles"): set(ALL_VERBS),
    ("rbac.authorization.k8s.io", "rolebindings"): set(ALL_VERBS),
    ("", "pods"): {"get", "list", "watch", "delete"},
    # the per-cluster PodDisruptionBudget: applied and read, never listed or deleted (GC does)
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
NAMESPACED_PEERING = {("zalando.org", "kopfpeerings"): {"get", "list", "watch", "patch"}}
CLUSTER_SCOPED_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
    ("", "nodes"): {"list", "watch"},  # the node index: node loss and free capacity
}
CLUSTER_PEERING = {("zalando.org", "clusterkopfpeerings"): {"get", "list", "watch", "patch"}}


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """Flatten a Role's rules to (group, resource) -> verbs, asserting there are no wildcards."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, f"unexpected rule fields {rule}"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field} of {role['metadata']['name']}: {rule}"
            assert all("*" not in v for v in rule[field]), f"wildcard in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource)
                assert key not in out, f"{key} granted twice in {role['metadata']['name']}"
                out[key] = set(rule["verbs"])
    return out


def operator_container(docs) -> dict[str, Any]:
    dep = docs.one("Deployment", FULLNAME)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["watchNamespaces={team-a,team-b}", "serviceMonitor.enabled=true", "runtimeMonitor.enabled=true"],
        [
            "dashboards.enabled=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
            "rbac.listPodsClusterWide=true",
            "watchNamespaces={team-a}",
        ],
        ["replicaCount=2", "peering.enabled=true", "peering.name=tpi"],
    ],
    ids=["defaults", "namespaced-monitors", "existing-sa", "replicated"],
)
def test_helm_lint_strict(helm: Path, sets: list[str]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tpi-operator"
    assert chart["kubeVersion"] == ">=1.28.0-0"


def test_kube_version_constraint(helm: Path) -> None:
    old = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.27.9")
    assert old.returncode != 0 and "requires kubeVersion: >=1.28.0-0" in old.stderr, old.stderr
    ok = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.28.0")
    assert ok.returncode == 0, ok.stderr


def test_default_render_objects(render) -> None:
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("ServiceAccount", FULLNAME),
            ("ConfigMap", f"{FULLNAME}-dashboard"),
            ("ClusterRole", FULLNAME),
            ("ClusterRoleBinding", FULLNAME),
            ("Service", f"{FULLNAME}-metrics"),
            ("Deployment", FULLNAME),
        ]
    )
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NS, d["metadata"]


# --- Deployment -------------------------------------------------------------------------------


def test_deployment_defaults(render) -> None:
    docs = render()
    dep = docs.one("Deployment", FULLNAME)
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    c = operator_container(docs)
    assert c["image"] == "tpi/operator:dev"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert pod["serviceAccountName"] == docs.one("ServiceAccount")["metadata"]["name"]
    # The selector matches the pod template.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_deployment_is_restricted_pss(render) -> None:
    """The pod passes the Pod Security Standard `restricted` profile (and then some)."""
    docs = render()
    pod = docs.one("Deployment", FULLNAME)["spec"]["template"]["spec"]
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), host
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for v in volumes.values():
        assert set(v) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}, v
    containers = pod["containers"] + pod.get("initContainers", [])
    for c in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc.get("runAsUser", psc["runAsUser"]) == 10001
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert sc["readOnlyRootFilesystem"] is True
        assert not any("hostPort" in p for p in c.get("ports", []))
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be a writable emptyDir"


def test_liveness_probe_and_metrics_port(render) -> None:
    docs = render()
    c = operator_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == 9090
    assert ports["liveness"] == 8080
    assert "--liveness-port=8080" in c["args"]
    assert "--metrics-port=9090" in c["args"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert probe["port"] in ("liveness", 8080)
    svc = docs.one("Service", f"{FULLNAME}-metrics")
    (sport,) = svc["spec"]["ports"]
    assert (sport["name"], sport["port"], sport["targetPort"]) == ("metrics", 9090, "metrics")
    dep = docs.one("Deployment", FULLNAME)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_image_values(render) -> None:
    c = operator_container(render("image.repository=reg.local/tpi/op", "image.tag=1.2.3", "image.pullPolicy=Always"))
    assert c["image"] == "reg.local/tpi/op:1.2.3"
    assert c["imagePullPolicy"] == "Always"


# --- watched namespaces and RBAC ---------------------------------------------------------------


def test_host_paths_are_refused_unless_allowed(render) -> None:
    """Default: no --allowed-host-path, so the operator refuses every hostPath model source."""
    assert not [a for a in operator_container(render())["args"] if a.startswith("--allowed-host-path")]
    args = operator_container(render("allowedHostPaths={/var/lib/tpi-e2e,/data}"))["args"]
    assert [a for a in args if a.startswith("--allowed-host-path")] == [
        "--allowed-host-path=/var/lib/tpi-e2e",
        "--allowed-host-path=/data",
    ]
    from tpi_operator.__main__ import parse_args

    assert parse_args(args).allowed_host_paths == ["/var/lib/tpi-e2e", "/data"]  # the operator reads them


def test_cluster_wide_by_default(render) -> None:
    docs = render()
    c = operator_container(docs)
    # No --namespace at all is how `python -m tpi_operator` goes cluster-wide; standalone by default.
    assert c["args"] == ["--liveness-port=8080", "--metrics-port=9090"]
    assert "command" not in c, "without peering the image's entrypoint runs as is"
    assert not docs.kinds("Role") and not docs.kinds("RoleBinding")
    role = docs.one("ClusterRole", FULLNAME)
    # The pods rule of the namespaced set also covers the cluster-wide capacity LIST.
    assert rules_of(role) == {**NAMESPACED_RULES, **CLUSTER_SCOPED_RULES}
    binding = docs.one("ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NS}]


def test_watch_namespaces_gives_roles_per_namespace(render) -> None:
    docs = render("watchNamespaces={team-a,team-b}")
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]

    roles = docs.kinds("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == NAMESPACED_RULES
    bindings = docs.kinds("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        role = next(r for r in roles if r["metadata"]["namespace"] == b["metadata"]["namespace"])
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NS}]

    # Only what kopf reads cluster-wide stays cluster-scoped.
    (cluster_role,) = docs.kinds("ClusterRole")
    assert rules_of(cluster_role) == CLUSTER_SCOPED_RULES
    (crb,) = docs.kinds("ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NS}]


def test_list_pods_cluster_wide_is_opt_in(render) -> None:
    (cluster_role,) = render("watchNamespaces={team-a}", "rbac.listPodsClusterWide=true").kinds("ClusterRole")
    assert rules_of(cluster_role) == {**CLUSTER_SCOPED_RULES, ("", "pods"): {"list"}}
    # Cluster-wide, the namespaced rules already cover it: the flag adds nothing.
    assert rules_of(render("rbac.listPodsClusterWide=true").one("ClusterRole")) == rules_of(render().one("ClusterRole"))


def test_peering_cluster_wide(render) -> None:
    docs = render("replicaCount=3", "peering.enabled=true", "peering.name=tpi-peers")
    assert docs.one("Deployment", FULLNAME)["spec"]["replicas"] == 3
    c = operator_container(docs)
    assert "--peering=tpi-peers" in c["args"]
    assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][3] == "tpi-operator"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env["POD_NAME"] == env["POD_ID"] == "metadata.name"
    assert docs.one("ClusterKopfPeering", "tpi-peers")["apiVersion"] == "zalando.org/v1"
    assert rules_of(docs.one("ClusterRole", FULLNAME)) == {
        **NAMESPACED_RULES,
        **CLUSTER_SCOPED_RULES,
        **CLUSTER_PEERING,
    }


def test_peering_namespaced(render) -> None:
    docs = render("peering.enabled=true", "watchNamespaces={team-a,team-b}")
    assert "--peering=tpi-operator" in operator_container(docs)["args"]
    peerings = docs.kinds("KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "tpi-operator"),
        ("team-b", "tpi-operator"),
    ]
    assert not docs.kinds("ClusterKopfPeering")
    for role in docs.kinds("Role"):
        assert rules_of(role) == {**NAMESPACED_RULES, **NAMESPACED_PEERING}
    assert rules_of(docs.one("ClusterRole")) == CLUSTER_SCOPED_RULES


def test_peering_objects_optional_and_kopf_dev_group(render) -> None:
    docs = render("peering.enabled=true", "peering.create=false")
    assert not docs.kinds("ClusterKopfPeering")
    docs = render("peering.enabled=true", "peering.apiGroup=kopf.dev")
    assert docs.one("ClusterKopfPeering")["apiVersion"] == "kopf.dev/v1"
    assert ("kopf.dev", "clusterkopfpeerings") in rules_of(docs.one("ClusterRole"))


def test_peering_priority_wrapper_runs(render, tmp_path: Path) -> None:
    """The /bin/sh wrapper execs `python -m tpi_operator` with a per-pod priority and all args."""
    c = operator_container(render("peering.enabled=true", "watchNamespaces={team-a}"))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # Stands in for the image's python: prints the argv it was exec'd with.
    (fake_bin / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (fake_bin / "python").chmod(0o755)

    def argv(pod: str) -> list[str]:
        proc = subprocess.run(
            [*c["command"], *c["args"]],
            capture_output=True, text=True, timeout=30, check=True,
            env={"PATH": f"{fake_bin}:/usr/bin:/bin", "POD_NAME": pod},
        )  # fmt: skip
        return proc.stdout.splitlines()

    a = argv("tpi-tpi-operator-6d9f7c-abcde")
    assert a[:2] == ["-m", "tpi_operator"]
    assert re.fullmatch(r"--priority=\d+", a[2]), a
    assert a[3:] == c["args"]
    assert argv("tpi-tpi-operator-6d9f7c-abcde") == a, "the priority is stable for a pod"
    assert argv("tpi-tpi-operator-6d9f7c-fghij")[2] != a[2], "replicas get distinct priorities"


def test_operator_can_grant_the_runtime_role(render) -> None:
    """RBAC escalation check: the operator holds every verb of the Role it creates for rank pods."""
    from tpi_operator.core.render import Identity, rbac

    objs = rbac(Identity(name="demo", namespace="team-a", uid="0000"), ["demo-g0-0"])
    (runtime_role,) = [o for o in objs if o["kind"] == "Role"]
    wanted = rules_of(runtime_role)
    assert wanted, "the runtime Role grants nothing?"
    for sets in ((), ("watchNamespaces={team-a}",)):
        docs = render(*sets)
        held: dict[tuple[str, str], set[str]] = {}
        for role in docs.kinds("ClusterRole") + [
            r for r in docs.kinds("Role") if r["metadata"]["namespace"] == "team-a"
        ]:
            for key, verbs in rules_of(role).items():
                held.setdefault(key, set()).update(verbs)
        for key, verbs in wanted.items():
            assert verbs <= held.get(key, set()), f"{sets}: operator cannot grant {key} {verbs - held.get(key, set())}"


def test_rbac_covers_the_operators_api_calls(render) -> None:
    """Every resource the operator's API client talks to is granted, cluster-wide and per namespace."""
    from tpi_operator import kube

    def group(prefix: str) -> str:
        return "" if prefix == "api/v1" else prefix.split("/")[1]

    used = {(group(prefix), plural) for prefix, plural in kube._KINDS.values()}
    cluster_wide = rules_of(render().one("ClusterRole"))
    assert used <= cluster_wide.keys(), f"not granted: {sorted(used - cluster_wide.keys())}"
    docs = render("watchNamespaces={team-a}")
    namespaced = rules_of(docs.one("Role")).keys() | rules_of(docs.one("ClusterRole")).keys()
    assert used <= namespaced, f"not granted: {sorted(used - namespaced)}"


def test_no_rbac_when_disabled(render) -> None:
    docs = render("rbac.create=false")
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]


def test_existing_service_account(render) -> None:
    docs = render("serviceAccount.create=false", "serviceAccount.name=ops")
    assert not docs.kinds("ServiceAccount")
    assert docs.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert docs.one("ClusterRoleBinding")["subjects"][0]["name"] == "ops"


# --- monitoring --------------------------------------------------------------------------------


def test_service_monitor_toggle(render) -> None:
    assert not render().kinds("ServiceMonitor")
    docs = render("serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom")
    sm = docs.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    svc = docs.one("Service", f"{FULLNAME}-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NS]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" == svc["spec"]["ports"][0]["name"]
    assert ep["path"] == "/metrics"


def test_runtime_pod_monitor(render) -> None:
    assert not render().kinds("PodMonitor")
    pm = render("runtimeMonitor.enabled=true").one("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tpi-runtime"}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("http", "/metrics")
    pm = render("runtimeMonitor.enabled=true", "watchNamespaces={team-a,team-b}").one("PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


# --- dashboard ---------------------------------------------------------------------------------


def dashboard_from(docs) -> dict[str, Any]:
    cm = docs.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(cm["data"]["tpi.json"])


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_dashboard_configmap(render) -> None:
    docs = render()
    dash = dashboard_from(docs)
    assert dash == json.loads((CHART / "dashboards" / "tpi.json").read_text())
    assert not render("dashboards.enabled=false").kinds("ConfigMap")
    cm = render("dashboards.namespace=monitoring").one("ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"


def test_dashboard_panels(render) -> None:
    dash = dashboard_from(render())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    def panels_with(pattern: str) -> list[dict[str, Any]]:
        return [p for p in panels if any(re.search(pattern, e) for e in exprs(p))]

    latency = panels_with(r"histogram_quantile\(0\.\d+, sum by \(le[^)]*\) \(rate\(tpi_request_latency_seconds_bucket")
    tokens = panels_with(r"rate\(tpi_generated_tokens_total")
    memory = panels_with(r"tpi_gpu_memory_used_bytes")
    util = panels_with(r"tpi_gpu_utilization_ratio")
    restarts = panels_with(r"kube_pod_container_status_restarts_total")
    actions = panels_with(r"tpi_operator_actions_total")
    for name, found in [
        ("latency", latency),
        ("tokens/s", tokens),
        ("GPU memory", memory),
        ("GPU utilisation", util),
        ("restarts", restarts),
        ("operator actions", actions),
    ]:
        assert found, f"no {name} panel"

    # Aggregated and per-rank / per-GPU views of each.
    for name, found in [
        ("latency", latency),
        ("tokens/s", tokens),
        ("GPU memory", memory),
        ("GPU utilisation", util),
        ("restarts", restarts),
    ]:
        assert [p for p in found if not any("$rank" in e for e in exprs(p))], f"no aggregated {name} panel"
        assert [p for p in found if any("$rank" in e for e in exprs(p))], f"no per-rank {name} panel"
    for found in (memory, util):
        assert [p for p in found if any("$gpu" in e for e in exprs(p))], "no per-GPU panel"
    assert {p["fieldConfig"]["defaults"]["unit"] for p in latency} == {"s"}
    assert {p["fieldConfig"]["defaults"]["unit"] for p in memory} == {"bytes"}


def test_dashboard_template_variables(render) -> None:
    dash = dashboard_from(render())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "cluster", "rank", "gpu"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert re.fullmatch(r"label_values\(tpi_\w+\{[^}]*\}, rank\)", variables["rank"]["query"]["query"])
    assert re.fullmatch(r"label_values\(tpi_gpu_\w+\{[^}]*\}, gpu\)", variables["gpu"]["query"]["query"])
    for name in ("rank", "gpu"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
    # Every query targets the dashboard's data source variable.
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


# Target labels the PodMonitor adds (from the rank pods' tpi.dev/* labels), not metrics.
TARGET_LABELS = {"tpi_cluster", "tpi_group"}


def dashboard_metrics() -> set[str]:
    text = (CHART / "dashboards" / "tpi.json").read_text()
    return set(re.findall(r"\b(?:tpi|kube)_[a-z0-9_]+", text)) - TARGET_LABELS


def documented_metrics() -> set[str]:
    readme = (CHART / "README.md").read_text()
    return set(re.findall(r"^\| `((?:tpi|kube)_[a-z0-9_]+)` \|", readme, flags=re.M))


def test_dashboard_metrics_are_documented() -> None:
    """The chart README's metrics table is the one list of names the dashboard may use."""
    used = {m.removesuffix("_bucket") for m in dashboard_metrics()}
    assert used <= documented_metrics(), f"undocumented metrics: {sorted(used - documented_metrics())}"


def declared_metrics(package: Path) -> set[str]:
    source = "\n".join(p.read_text() for p in package.rglob("*.py"))
    return set(re.findall(r"""["'](tpi_[a-z0-9_]+)["']""", source))


@pytest.mark.parametrize(
    ("package", "owns"),
    [
        ("runtime/tpi_runtime", lambda m: not m.startswith("tpi_operator_")),
        ("operator/tpi_operator", lambda m: m.startswith("tpi_operator_")),
    ],
    ids=["runtime", "operator"],
)
def test_dashboard_metrics_exist_in_the_code(package: str, owns) -> None:
    """The runtime and the operator declare every tpi_* metric the dashboard queries
    (prometheus_client adds `_total` to counters and `_bucket` to histograms)."""
    declared = declared_metrics(REPO / package)
    used = {m for m in dashboard_metrics() if m.startswith("tpi_") and owns(m)}
    assert used, "the dashboard queries none of this component's metrics"
    missing = {m for m in used if not {m, m.removesuffix("_total"), m.removesuffix("_bucket")} & declared}
    assert not missing, f"dashboard queries metrics {package} does not declare: {sorted(missing)}"


# --- values.schema.json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["replicaCount=-1"], r"replicaCount.*minimum"),
        (["replicas=2"], r"additional propert.*'replicas'"),
        (["image.pullPolicy=Sometimes"], r"pullPolicy"),
        (["watchNamespaces={Team_A}"], r"watchNamespaces/0"),
        (["serviceMonitor.enabeld=true"], r"enabeld"),
        (["allowedHostPaths={relative/path}"], r"allowedHostPaths/0"),
    ],
    ids=[
        "negative-replicas",
        "unknown-top-level-key",
        "bad-pull-policy",
        "bad-namespace",
        "typo-nested",
        "relative-host-path",
    ],
)
def test_schema_rejects_bad_values(helm: Path, sets: list[str], message: str) -> None:
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode != 0, f"helm accepted {sets}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_several_replicas_need_peering(helm: Path) -> None:
    for sets in (["replicaCount=2"], ["replicaCount=2", "peering.enabled=false", "peering.name=x"]):
        args = ["template", RELEASE, str(CHART)]
        for s in sets:
            args += ["--set", s]
        proc = run_helm(helm, *args)
        assert proc.returncode != 0
        assert "replicaCount > 1 needs kopf peering" in proc.stderr, proc.stderr


def test_schema_is_strict_at_top_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "values.yaml and the schema list different keys"


def test_notes_explain_first_steps() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for needle in ("apply -f", "get tpic", "/v1/completions"):
        assert needle in notes


# --- CRDs ---------------------------------------------------------------------------------------


def test_chart_crds_are_copies_of_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert top, "crds/ at the repository root has no CRDs (they are generated from the operator's models)"
    assert chart.keys() == top.keys(), f"chart crds/ {sorted(chart)} != top-level crds/ {sorted(top)}"
    for name, data in top.items():
        assert chart[name] == data, f"charts/tpi-operator/crds/{name} differs from crds/{name}"
    names = {yaml.safe_load(d)["metadata"]["name"] for d in top.values()}
    assert "tpinferenceclusters.tpi.dev" in names


def test_every_object_the_operator_renders_is_granted(render) -> None:
    """What ``render`` makes of a cluster (PodDisruptionBudget included) is what the chart lets
    the operator apply: get (ownership check), create and patch (server-side apply)."""
    from tpi_operator.api.v1alpha1 import TPInferenceClusterSpec
    from tpi_operator.core import render as r

    rules = rules_of(render().one("ClusterRole", FULLNAME))
    spec = TPInferenceClusterSpec.model_validate({"image": "x", "model": {"source": {"image": {"path": "/m"}}}})
    ident = r.Identity("demo", "ns", "uid-1")
    objects = [*r.shared_objects(spec, ident, ["demo-g0-0"]), r.statefulset(spec, ident, r.GroupSettings(0, 4, 8))]
    kinds = {o["kind"] for o in objects}
    assert "PodDisruptionBudget" in kinds
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        plural = obj["kind"].lower() + "s"
        assert {"get", "create", "patch"} <= rules[(group, plural)], obj["kind"]
