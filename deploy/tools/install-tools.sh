#!/usr/bin/env bash
# Install every pinned deployment tool the test suite uses, into ~/.cache/flywheel (outside the
# repository): helm 3.22.0 + helm-unittest 1.1.2 and promtool 3.16.0 (built with `go install`
# through the Go module proxy), checkov 3.3.30 (its own virtualenv). Idempotent and cached; the
# first run takes ~15 minutes on 2 cores, later runs a second. The tests call the individual
# scripts on demand too, so this is only a warm-up (e.g. `make tools`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install-helm.sh" --with-unittest
"$here/install-promtool.sh"
"$here/install-checkov.sh"
