# Images for TPI: the operator (`--target operator`) and the rank runtime (`--target runtime`).
#
#   docker build --target operator -t tpi/operator:dev .
#   docker build --target runtime  -t tpi/runtime:dev  .
#   hack/build-images.sh            # both, optionally with a wheelhouse and loading into a node
#
# Works with the classic builder and with BuildKit (no RUN --mount, no heredocs, no
# `# syntax=` line, which would pull a frontend image from a registry).
#
# BASE_IMAGE only needs python3 (>= 3.11) with the venv module, e.g. python:3.11-slim-bookworm,
# or a plain Debian bookworm made with debootstrap (python3,python3-venv,ca-certificates) and
# `docker import` where no registry is reachable.
#
# Dependencies come from pyproject.toml's `operator` / `runtime` extras. If the build context has
# wheelhouse/*.whl (see hack/build-images.sh --wheelhouse), pip installs only from it
# (--no-index), so air-gapped builds work. ARG WHEELHOUSE: "" (auto: the wheelhouse when it has
# wheels, else the package index), "required" (fail without one), "off" (ignore it).
#
# GPU nodes: the PyPI torch wheel brings CUDA and NCCL as nvidia-* wheels, so the image needs no
# CUDA base; the node needs the NVIDIA driver and the NVIDIA container toolkit (device plugin),
# which mount libcuda/NVML into the container. The same image runs gloo ranks on CPU-only nodes.
# The driver must be new enough for the CUDA release the torch wheel bundles (e.g. >= 580 for
# CUDA 13 wheels); pin another with --build-arg TORCH_REQUIREMENT=... (or the wheelhouse).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    HOME=/home/tpi
# An unprivileged user (uid/gid 10001, matching the chart's securityContext). Also drop any
# system-wide pip a base image ships (python:slim does; plain Debian does not).
RUN set -eu; \
    python3 -c 'import sys, venv; assert sys.version_info >= (3, 11), sys.version'; \
    groupadd --system --gid 10001 tpi; \
    useradd --system --uid 10001 --gid 10001 --home-dir /home/tpi --create-home \
        --shell /usr/sbin/nologin tpi; \
    rm -rf /usr/local/bin/pip /usr/local/bin/pip3* /usr/local/lib/python3*/site-packages/pip \
        /usr/local/lib/python3*/site-packages/pip-*.dist-info /root/.cache

# ---------------------------------------------------------------------------------------------
# Shared builder: a venv with pip, the optional wheelhouse and a pip wrapper that picks it.
FROM base AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
ARG WHEELHOUSE=
# `Dockerfile` is always in the context; `wheelhouse*` may match nothing (then only the
# Dockerfile is copied). A directory's contents land in /wheelhouse.
COPY Dockerfile wheelhouse* /wheelhouse/
RUN set -eu; \
    python3 -m venv /opt/venv; \
    n=$(find /wheelhouse -maxdepth 1 -name '*.whl' | wc -l); \
    case "${WHEELHOUSE}" in \
      off) mode=index ;; \
      required) [ "$n" -gt 0 ] || { echo "WHEELHOUSE=required but wheelhouse/ has no wheels" >&2; exit 1; }; mode=wheelhouse ;; \
      "") if [ "$n" -gt 0 ]; then mode=wheelhouse; else mode=index; fi ;; \
      *) echo "WHEELHOUSE must be empty, 'required' or 'off', not '${WHEELHOUSE}'" >&2; exit 1 ;; \
    esac; \
    echo "pip source: $mode ($n wheels in wheelhouse/)"; \
    if [ "$mode" = wheelhouse ]; then flags="--no-index --find-links /wheelhouse"; else flags=""; fi; \
    printf '#!/bin/sh\nset -eu\nexec /opt/venv/bin/python -m pip install %s "$@"\n' "$flags" \
        > /usr/local/bin/pip-install; \
    chmod 0755 /usr/local/bin/pip-install; \
    printf '%s\n' \
      'import re, sys, tomllib' \
      'skip = {s.lower() for s in sys.argv[2:]}' \
      'with open("/build/pyproject.toml", "rb") as f:' \
      '    deps = tomllib.load(f)["project"]["optional-dependencies"][sys.argv[1]]' \
      'for d in deps:' \
      '    if re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() not in skip:' \
      '        print(d)' \
      > /usr/local/bin/extra-requirements.py; \
    printf '#!/bin/sh\nset -eu\n/opt/venv/bin/python -m pip check\nexec /opt/venv/bin/python -m pip uninstall -y pip setuptools wheel\n' \
      > /usr/local/bin/strip-venv; \
    chmod 0755 /usr/local/bin/strip-venv

# ---------------------------------------------------------------------------------------------
FROM builder AS operator-builder
COPY pyproject.toml /build/pyproject.toml
RUN set -eu; \
    python3 /usr/local/bin/extra-requirements.py operator > /build/requirements.txt; \
    cat /build/requirements.txt; \
    if grep -qi '^torch' /build/requirements.txt; then echo "torch must not be in the operator image" >&2; exit 1; fi; \
    pip-install -r /build/requirements.txt; \
    strip-venv

# ---------------------------------------------------------------------------------------------
FROM base AS operator
COPY --from=operator-builder /opt/venv /opt/venv
COPY contract/tpi_contract /app/tpi_contract
COPY operator/tpi_operator /app/tpi_operator
USER 10001:10001
WORKDIR /home/tpi
# Metrics (9090) and kopf's liveness endpoint (8080), as the Helm chart configures them.
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "tpi_operator"]

# ---------------------------------------------------------------------------------------------
FROM builder AS runtime-builder
# torch (with its nvidia-* CUDA/NCCL wheels) is the heavy part: its own early layer, which only
# a change of this requirement or of the wheelhouse invalidates. Keep it in step with the
# `runtime` extra in pyproject.toml (a unit test checks they agree).
ARG TORCH_REQUIREMENT="torch>=2.3"
RUN pip-install "${TORCH_REQUIREMENT}"
COPY pyproject.toml /build/pyproject.toml
RUN set -eu; \
    python3 /usr/local/bin/extra-requirements.py runtime torch > /build/requirements.txt; \
    cat /build/requirements.txt; \
    pip-install -r /build/requirements.txt; \
    strip-venv

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
# With the NVIDIA container toolkit, mount the CUDA driver and NVML (for GPU metrics).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.inductor
COPY --from=runtime-builder /opt/venv /opt/venv
COPY contract/tpi_contract /app/tpi_contract
COPY runtime/tpi_runtime /app/tpi_runtime
USER 10001:10001
WORKDIR /home/tpi
# HTTP (/healthz, /readyz, /metrics, rank 0: /v1/completions) and the rendezvous port.
EXPOSE 8000 29500
ENTRYPOINT ["python", "-m", "tpi_runtime"]
