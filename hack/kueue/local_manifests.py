#!/usr/bin/env python3
"""Kueue's CRDs and webhook configurations for a Kueue manager run *outside* the cluster.

    python hack/kueue/local_manifests.py KUEUE_MODULE_DIR URL CA_FILE > kueue-manifests.yaml

A release's manifests.yaml is kustomize's build of ``config/default``; the Go module holds the same
sources (``config/components/crd``, ``config/components/webhook``), not the built file. This does
the part of that build the local check needs, and nothing else:

* the CRDs of ``crd/bases``, with the conversion webhook ``crd/kustomization.yaml`` enables (the
  same CRDs as there) pointing at ``URL/convert``;
* the Mutating/ValidatingWebhookConfigurations of ``webhook/manifests.yaml``, named as Kueue's
  own install names them, with ``clientConfig.url = URL + path`` instead of the in-cluster
  Service, the CA of ``CA_FILE`` as ``caBundle``, and the namespace selectors
  ``webhook/kustomization.yaml`` patches in (never kube-system or kueue-system).

Standard library and PyYAML only (the project's venv has it).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import yaml

#: The CRDs whose conversion webhook Kueue's kustomization enables (config/components/crd).
CONVERTED = {"localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"}
#: The webhooks Kueue's kustomization keeps out of its own and the system's namespaces.
SYSTEM_EXCLUDED = {"mpod.kb.io", "mdeployment.kb.io", "mstatefulset.kb.io",
                   "vpod.kb.io", "vdeployment.kb.io", "vstatefulset.kb.io"}  # fmt: skip
#: What config/default names them (namePrefix "kueue-").
NAMES = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}


def client_config(url: str, path: str, ca: str) -> dict[str, Any]:
    return {"url": url.rstrip("/") + path, "caBundle": ca}


def crds(module: Path, url: str, ca: str) -> list[dict[str, Any]]:
    out = []
    for f in sorted((module / "config/components/crd/bases").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {"clientConfig": client_config(url, "/convert", ca), "conversionReviewVersions": ["v1"]},
            }
        out.append(crd)
    return out


def webhooks(module: Path, url: str, ca: str) -> list[dict[str, Any]]:
    out = []
    for doc in yaml.safe_load_all((module / "config/components/webhook/manifests.yaml").read_text()):
        if not doc:
            continue
        doc["metadata"]["name"] = NAMES[doc["kind"]]
        for hook in doc["webhooks"]:
            hook["clientConfig"] = client_config(url, hook["clientConfig"]["service"]["path"], ca)
            if hook["name"] in SYSTEM_EXCLUDED:
                hook["namespaceSelector"] = {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                     "values": ["kube-system", "kueue-system"]}]}  # fmt: skip
        out.append(doc)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    module, url, ca_file = Path(argv[1]), argv[2], Path(argv[3])
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    docs = [*crds(module, url, ca), *webhooks(module, url, ca)]
    if not any(d["kind"] == "CustomResourceDefinition" for d in docs):
        print(f"no CRDs under {module}/config/components/crd/bases", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
