"""``python -m tpi_operator`` / ``tpi-operator``: run the TPI operator (kopf) with its handlers."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from tpi_operator import handlers, metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tpi-operator", description=__doc__)
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch only this namespace (repeatable); default: cluster-wide")  # fmt: skip
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("TPI_METRICS_PORT", 9090)),
                   help="Prometheus /metrics port (0: off)")  # fmt: skip
    p.add_argument("--liveness-port", type=int, default=int(os.environ.get("TPI_LIVENESS_PORT", 8080)),
                   help="kopf liveness endpoint port, serving /healthz (0: off)")  # fmt: skip
    p.add_argument("--peering", default=os.environ.get("TPI_PEERING") or None,
                   help="kopf peering name: needed when running more than one replica")  # fmt: skip
    p.add_argument("--priority", type=int, default=int(os.environ.get("TPI_PRIORITY", 0)))
    p.add_argument("--models-root", default=os.environ.get("TPI_MODELS_ROOT") or None,
                   help="where PVCs are mounted as <claimName>/, to read checkpoint headers")  # fmt: skip
    p.add_argument("--allowed-host-path", action="append", default=[], dest="allowed_host_paths",
                   help="allow hostPath model sources under this node path (repeatable); default: none")  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=64, help="reconcile worker threads (they mostly wait on the API server)"
    )
    p.add_argument("--idle-seconds", type=float, default=30.0, help="resync period of a steady cluster")
    p.add_argument("--busy-seconds", type=float, default=2.0, help="resync period while a cluster changes")
    p.add_argument("--log-format", choices=["json", "plain"], default=os.environ.get("TPI_LOG_FORMAT", "json"))
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = handlers.OperatorConfig(
        workers=args.workers,
        idle_seconds=args.idle_seconds,
        busy_seconds=args.busy_seconds,
        models_root=args.models_root,
        peering=args.peering,
        priority=args.priority,
        kubeconfig=args.kubeconfig,
        allowed_host_paths=tuple(args.allowed_host_paths),
    )
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    metrics.serve(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=not args.peering,
        peering_name=args.peering,
        memo=kopf.Memo(shared=handlers.Shared(config=config)),
        priority=args.priority,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
