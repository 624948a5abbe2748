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
"$PY" -c "import flowtrain, torch; print(f'flowtrain {flowtrain.__version__} ready (torch {torch.__version__})')"
