#!/usr/bin/env bash
# The sm_90 compile check (python -m bench.sm90) on Triton 3.6, the version GPU machines carry, next to the
# Triton CI pins: a throwaway venv holds only triton==3.6.0 and sees the current environment's packages
# (torch, ...) through a .pth file placed after its own site-packages, so its Triton shadows the pinned one.
#   bash .ci/sm90_triton36.sh [--json OUT.json]     (exit 1 on a compile error or a register spill)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VENV=${SM90_T36_VENV:-${TMPDIR:-/tmp}/gxpo-triton36}
if ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps triton==3.6.0
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
VSITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$VSITE/zz_gxpo_base_env.pth"
TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m bench.sm90 "$@"
