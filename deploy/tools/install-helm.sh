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

helm_ok() {
  [[ -x "$BIN_DIR/helm" ]] && "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

if ! helm_ok; then
  echo "installing helm $HELM_VERSION into $BIN_DIR (go install, first time takes a few minutes)" >&2
  # helm stamps its version through ldflags; without them `helm version` reports the module default.
  GOBIN="$BIN_DIR" CGO_ENABLED=0 go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  helm_ok || { echo "installed helm does not report $HELM_VERSION" >&2; "$BIN_DIR/helm" version >&2; exit 1; }
fi

# helm-unittest: optional (pass --with-unittest); built from the Go proxy, run as a plain binary.
if [[ "${1:-}" == "--with-unittest" ]]; then
  marker="$BIN_DIR/.helm-unittest-$HELM_UNITTEST_VERSION"
  if [[ ! -x "$BIN_DIR/helm-unittest" || ! -f "$marker" ]]; then
    echo "installing helm-unittest $HELM_UNITTEST_VERSION into $BIN_DIR" >&2
    GOBIN="$BIN_DIR" CGO_ENABLED=0 go install \
      "github.com/helm-unittest/helm-unittest/cmd/helm-unittest@$HELM_UNITTEST_VERSION"
    rm -f "$BIN_DIR"/.helm-unittest-*
    touch "$marker"
  fi
fi

echo "$BIN_DIR/helm"
