#!/usr/bin/env bash
# Install chipscout into .venv, index the bundled real Sentinel-2 scene and serve the app on
# http://127.0.0.1:8501. Extra arguments go to `chipscout demo` (e.g. --no-app, --port 8600).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${CHIPSCOUT_VENV:-.venv}/bin/chipscout" demo "$@"
