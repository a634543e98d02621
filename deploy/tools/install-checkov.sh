#!/usr/bin/env bash
# Install pinned checkov into its own virtualenv outside the repository (its dependency tree
# conflicts with Flywheel's), once, from the checked-in lock deploy/tools/checkov.lock (re-resolve
# with `uv pip compile` when CHECKOV_VERSION changes), with uv where `make env` installed it.
# Prints the checkov executable path on its last line.
#
#   deploy/tools/install-checkov.sh         # -> ~/.cache/flywheel/checkov-venv/bin/checkov
set -euo pipefail

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
TOOLS_DIR="${FLYWHEEL_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel}"
VENV="$TOOLS_DIR/checkov-venv"
PYTHON="${CHECKOV_PYTHON:-python3}"
LOCK="$(cd "$(dirname "$0")" && pwd)/checkov.lock"
UV="$(ls -d "$TOOLS_DIR"/uv-*/bin/uv 2>/dev/null | tail -n 1 || true)"

mkdir -p "$TOOLS_DIR"
exec 9>"$TOOLS_DIR/.install-checkov.lock"
flock 9

installed() {
  [[ -x "$VENV/bin/checkov" ]] && "$VENV/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('checkov') != '$CHECKOV_VERSION')" 2>/dev/null
}

if ! installed; then
  echo "installing checkov $CHECKOV_VERSION into $VENV (first time takes a few minutes)" >&2
  [[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
  grep -q "^checkov==$CHECKOV_VERSION " "$LOCK" || { echo "$LOCK does not pin checkov $CHECKOV_VERSION" >&2; exit 1; }
  if [[ -n "$UV" ]]; then
    "$UV" pip sync --quiet --python "$VENV/bin/python" --require-hashes "$LOCK"
  else
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r "$LOCK"
  fi
  installed || { echo "checkov $CHECKOV_VERSION did not install" >&2; exit 1; }
fi

echo "$VENV/bin/checkov"
