#!/usr/bin/env bash
# Install pinned promtool (Prometheus 3.16.0; Go module github.com/prometheus/prometheus v0.316.0)
# with `go install` through the Go module proxy into a cache outside the repository. Used to check
# and unit-test the alert rules (`promtool check rules`, `promtool test rules`) and to parse the
# dashboard's PromQL. Idempotent. Prints the promtool path on its last line.
set -euo pipefail

PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-3.16.0}"
PROMETHEUS_MODULE_VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"
TOOLS_DIR="${FLYWHEEL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel}"
BIN_DIR="$TOOLS_DIR/bin"
# promtool is used here only for rule checks and rule unit tests, which need no service discovery:
# Prometheus's own `remove_all_sd` build tag leaves the cloud SDKs (AWS, Azure, GCE, Kubernetes, ...)
# out of the build, which otherwise cost most of a 10+ minute compile on 2 cores.
BUILD_TAGS="remove_all_sd"
MARKER="$BIN_DIR/.promtool-$PROMETHEUS_VERSION-$BUILD_TAGS"

mkdir -p "$BIN_DIR"
command -v go >/dev/null || { echo "go is required (https://go.dev/dl/)" >&2; exit 1; }
exec 9>"$TOOLS_DIR/.install-promtool.lock"
flock 9

if [[ ! -x "$BIN_DIR/promtool" || ! -f "$MARKER" ]]; then
  echo "installing promtool $PROMETHEUS_VERSION into $BIN_DIR (go install -tags $BUILD_TAGS)" >&2
  GOBIN="$BIN_DIR" CGO_ENABLED=0 go install -tags "$BUILD_TAGS" -ldflags "-s -w \
    -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION"
  rm -f "$BIN_DIR"/.promtool-*
  touch "$MARKER"
fi
"$BIN_DIR/promtool" --version 2>&1 | grep -q "version $PROMETHEUS_VERSION" \
  || { echo "promtool does not report version $PROMETHEUS_VERSION" >&2; exit 1; }
echo "$BIN_DIR/promtool"
