#!/usr/bin/env bash
# Install pinned checkov into its own virtualenv outside the repository (its dependency tree
# conflicts with Flywheel's), once. Prints the checkov executable path on its last line.
#
#   deploy/tools/install-checkov.sh         # -> ~/.cache/flywheel/checkov-venv/bin/checkov
set -euo pipefail

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
TOOLS_DIR="${FLYWHEEL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel}"
VENV="$TOOLS_DIR/checkov-venv"
PYTHON="${CHECKOV_PYTHON:-python3}"

mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.install-checkov.lock"
flock 9

installed() {
  [[ -x "$VENV/bin/checkov" ]] && [[ "$("$VENV/bin/pip" show checkov 2>/dev/null | sed -n 's/^Version: //p')" == "$CHECKOV_VERSION" ]]
}

if ! installed; then
  echo "installing checkov $CHECKOV_VERSION into $VENV (first time takes a few minutes)" >&2
  [[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  installed || { echo "checkov $CHECKOV_VERSION did not install" >&2; exit 1; }
fi

echo "$VENV/bin/checkov"
