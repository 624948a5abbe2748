#!/usr/bin/env bash
# One command that sets flowtrain up on a fresh machine (Python >= 3.10 with pip): torch, the package and its
# test tools, into the Python that runs this script. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: keep one that is already there (CI may pre-install a CPU build); else install the pinned release.
# Override with FLOWTRAIN_TORCH="torch==X.Y.Z" (e.g. a CUDA build on a GPU machine).
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "${FLOWTRAIN_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[dev]"

# Headless Chromium for the report's browser tests (CI installs it this way). Only as root with apt-get, and only
# when missing; a failure here never fails the setup (those tests then skip, saying why).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
       } >/dev/null 2>&1; then
    echo "note: could not install chromium with apt-get; the browser tests will skip" >&2
  fi
fi
"$PY" -c "import flowtrain, torch; print(f'flowtrain {flowtrain.__version__} ready (torch {torch.__version__})')"
