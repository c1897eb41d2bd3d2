#!/usr/bin/env bash
# The sm_90 compile check (python -m bench.sm90) on Triton 3.6, the version GPU machines carry, next to the
# Triton CI pins: a throwaway venv holds only triton==3.6.0 and sees the current environment's packages
# (torch, ...) through a .pth file placed after its own site-packages, so its Triton shadows the pinned one.
#   bash .ci/sm90_triton36.sh [--json OUT.json]     (exit 1 on a compile error or a register spill)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# one cached venv per calling environment (Python version + site-packages): a venv of another Python would load
# this environment's compiled packages (torch) into the wrong interpreter, and a shared venv's .pth would be
# rewritten under a concurrent run from another environment
PYV=$("$PY" -c "import sys; print('%d.%d' % sys.version_info[:2])")
VENV=${SM90_T36_VENV:-${TMPDIR:-/tmp}/gxpo-triton36-py$PYV-$(printf %s "$SITE" | sha1sum | cut -c1-8)}
if ! "$VENV/bin/python" -c "import sys, triton
sys.exit(triton.__version__ != '3.6.0' or '%d.%d' % sys.version_info[:2] != '$PYV')" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps triton==3.6.0
fi
VSITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$VSITE/zz_gxpo_base_env.pth"
TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD" "$VENV/bin/python" -m bench.sm90 "$@"
