#!/usr/bin/env bash
# Build the Kubernetes tool chain from the Go module proxy (no GitHub, no registry):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, kube-proxy, etcd,
# kwok, kwokctl, helm and a CoreDNS with the plugins a local cluster needs (hack/node.sh).
# Results are cached outside the clone, keyed by version, so a second run is a no-op.
# Prints the cold build time. The versions are hack/lib/common.sh's (K8S_VERSION, ETCD_VERSION,
# KWOK_VERSION, HELM_VERSION, COREDNS_VERSION; the environment wins).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" tools # HACK, ROOT, ...; logs as [tools]

BUILD="$CACHE/build"
export GOPATH="${GOPATH:-$HOME/go}" GOFLAGS="-mod=mod" CGO_ENABLED=0 GOTOOLCHAIN=auto
mkdir -p "$BIN" "$BUILD"

start=$(date +%s)
built=()

have() { [[ -x "$BIN/$1" && -f "$BIN/.$1.$2" ]]; }
mark() { touch "$BIN/.$1.$2"; built+=("$1"); }

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager
  cri-api cri-client csi-translation-lib dynamic-resource-allocation endpointslice
  externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler
  kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver
  sample-cli-plugin sample-controller)

build_kubernetes() {
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy) todo=()
  for c in "${cmds[@]}"; do have "$c" "$K8S_VERSION" || todo+=("$c"); done
  [[ ${#todo[@]} -eq 0 ]] && return
  local dir="$BUILD/k8s-$K8S_VERSION" staging_version="v0.${K8S_VERSION#v1.}"
  mkdir -p "$dir"
  cd "$dir"
  if [[ ! -f go.mod ]]; then
    go mod init tpi.dev/k8s-build >/dev/null 2>&1
    for m in "${staging[@]}"; do
      # Only staging modules that exist at this release are replaced.
      if go list -m "k8s.io/$m@$staging_version" >/dev/null 2>&1; then
        go mod edit -replace "k8s.io/$m=k8s.io/$m@$staging_version"
      fi
    done
    go get "k8s.io/kubernetes@$K8S_VERSION"
  fi
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor -X $p.gitTreeState=clean"
  done
  for c in "${todo[@]}"; do
    log "building $c $K8S_VERSION"
    go build -trimpath -ldflags "$ld" -o "$BIN/$c" "k8s.io/kubernetes/cmd/$c"
    mark "$c" "$K8S_VERSION"
  done
}

build_etcd() {
  have etcd "$ETCD_VERSION" && return
  local dir="$BUILD/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cd "$dir"
  [[ -f go.mod ]] || { go mod init tpi.dev/etcd-build >/dev/null 2>&1; go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"; }
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  mark etcd "$ETCD_VERSION"
}

build_kwok() {
  for c in kwok kwokctl; do
    have "$c" "$KWOK_VERSION" && continue
    log "building $c $KWOK_VERSION"
    GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
      "sigs.k8s.io/kwok/cmd/$c@$KWOK_VERSION"
    mark "$c" "$KWOK_VERSION"
  done
}

build_helm() {
  have helm "$HELM_VERSION" && return
  log "building helm $HELM_VERSION"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
  GOBIN="$BIN" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mark helm "$HELM_VERSION"
}

build_coredns() {
  # `go install github.com/coredns/coredns@V` works (no replace directives) but compiles every
  # plugin (cloud DNS providers and their SDKs). The documented way to pick plugins is a main
  # package that imports them and sets dnsserver.Directives (in plugin.cfg's order): ~4x less to
  # compile. The node's Corefile uses bind, errors, health, ready, kubernetes and cache.
  have coredns "$COREDNS_VERSION" && return
  local dir="$BUILD/coredns-$COREDNS_VERSION"
  mkdir -p "$dir"
  cd "$dir"
  cat >main.go <<'GO'
// A CoreDNS with only the plugins a local cluster needs (written by hack/build-tools.sh).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/whoami"
)

// In plugin.cfg's order (the order plugins run in).
var directives = []string{
	"reload", "bind", "ready", "health", "errors", "log", "cache",
	"hosts", "kubernetes", "loop", "forward", "whoami",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
GO
  if [[ ! -f go.mod ]]; then
    go mod init tpi.dev/coredns-build >/dev/null 2>&1
    go get "github.com/coredns/coredns@$COREDNS_VERSION"
    go mod tidy
  fi
  log "building coredns $COREDNS_VERSION"
  go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
    -o "$BIN/coredns" .
  mark coredns "$COREDNS_VERSION"
}

build_helm
build_kwok
build_etcd
build_kubernetes
build_coredns

if [[ ${#built[@]} -eq 0 ]]; then
  log "tools up to date in $BIN"
else
  log "built ${built[*]} in $(( $(date +%s) - start ))s (cold build) into $BIN"
fi
