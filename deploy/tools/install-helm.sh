#!/usr/bin/env bash
# Install pinned helm (and the helm-unittest plugin binary) with `go install` through the Go
# module proxy into a cache outside the repository. Idempotent: reinstalls only when the
# cached binary reports another version. Prints the helm path on its last line.
#
#   deploy/tools/install-helm.sh            # -> ~/.cache/flywheel/bin/helm
#   FLYWHEEL_TOOLS_DIR=/opt/tools deploy/tools/install-helm.sh
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_UNITTEST_VERSION="${HELM_UNITTEST_VERSION:-v1.1.2}"
TOOLS_DIR="${FLYWHEEL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel}"
BIN_DIR="$TOOLS_DIR/bin"
LOCK="$TOOLS_DIR/.install-helm.lock"

mkdir -p "$BIN_DIR"
command -v go >/dev/null || { echo "go is required (https://go.dev/dl/)" >&2; exit 1; }

exec 9>"$LOCK"
flock 9  # parallel test workers / make targets install once

# helm's Makefile stamps the version and the default Kubernetes version (client-go's minor; used by
# `helm template`/`lint` without a cluster) through ldflags; `go install` must pass them too.
HELM_K8S_MINOR="${HELM_K8S_MINOR:-37}"  # helm v3.22.0 builds against k8s.io/client-go v0.37.0
MARKER="$BIN_DIR/.helm-$HELM_VERSION-k8s1.$HELM_K8S_MINOR"

helm_ok() {
  [[ -x "$BIN_DIR/helm" && -f "$MARKER" ]] \
    && "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

if ! helm_ok; then
  echo "installing helm $HELM_VERSION into $BIN_DIR (go install, first time takes a few minutes)" >&2
  pkg=helm.sh/helm/v3
  GOBIN="$BIN_DIR" CGO_ENABLED=0 go install -ldflags "-s -w \
    -X $pkg/internal/version.version=$HELM_VERSION -X $pkg/internal/version.metadata= \
    -X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR \
    -X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR" \
    "$pkg/cmd/helm@$HELM_VERSION"
  rm -f "$BIN_DIR"/.helm-v*
  touch "$MARKER"
  helm_ok || { echo "installed helm does not report $HELM_VERSION" >&2; "$BIN_DIR/helm" version >&2; exit 1; }
fi

# helm-unittest: optional (pass --with-unittest); built from the Go proxy, run as a plain binary.
if [[ "${1:-}" == "--with-unittest" ]]; then
  marker="$BIN_DIR/.helm-unittest-$HELM_UNITTEST_VERSION"
  if [[ ! -x "$BIN_DIR/helm-unittest" || ! -f "$marker" ]]; then
    echo "installing helm-unittest $HELM_UNITTEST_VERSION into $BIN_DIR" >&2
    # Its go.mod has a replace directive, which `go install pkg@version` refuses: fetch the module
    # through the proxy and build it as the main module instead (same pinned sources, go.sum-checked).
    mod="github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION"
    dir="$(go mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -n "$dir" ]] || { echo "could not download $mod" >&2; exit 1; }
    (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/helm-unittest" ./cmd/helm-unittest)
    rm -f "$BIN_DIR"/.helm-unittest-*
    touch "$marker"
  fi
fi

echo "$BIN_DIR/helm"
