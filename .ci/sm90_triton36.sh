#!/usr/bin/env bash
# The sm_90 compile check (python -m bench.sm90) on Triton 3.6, the version GPU machines carry, next to the
# Triton CI pins: triton==3.6.0 alone is installed into a cached folder (pip --target, no dependencies) that goes
# first on PYTHONPATH, so it shadows the pinned Triton while torch and the rest come from the calling environment.
#   bash .ci/sm90_triton36.sh [--json OUT.json]     (exit 1 on a compile error or a register spill)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# one folder per Python version (Triton's wheels hold compiled code), shared by every environment of that version:
# it is never written once complete, so concurrent runs and fresh clones reuse it instead of growing /tmp by 650 MB
PYV=$("$PY" -c "import sys; print('%d.%d' % sys.version_info[:2])")
T36=${SM90_T36_DIR:-${TMPDIR:-/tmp}/gxpo-triton36-py$PYV}
ok() { PYTHONPATH="$T36" "$PY" -c "import sys, triton; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; }
if ! ok; then
  TMP=$(mktemp -d "$T36.partial.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$TMP/pkg" triton==3.6.0
  if ! ok; then   # (a concurrent run may have completed it meanwhile: a complete folder is never replaced)
    if [ -e "$T36" ]; then mv "$T36" "$TMP/stale"; fi
    mv -T "$TMP/pkg" "$T36"
  fi
fi
TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$T36:$PWD" "$PY" -m bench.sm90 "$@"
