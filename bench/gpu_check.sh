#!/usr/bin/env bash
# The official profile's GPU check (issue 11): CUDA conformance tests + one JSON object of figures
# (per-stage ms, single-session RTF, first-frame latency, live speech onset -> first speech frame,
# sessions per GPU at 25 fps and 512², GPU memory shared + per session).  See bench/gpu_check.py.
#
#   bench/gpu_check.sh [--device cuda|cpu] [--quick] [--models DIR]
#                      [--precision release|fp32|fp16|bf16] [--compile off|compile|cudagraphs]
#                      [--skip-tests] [--skip-live]
#
# Host assumptions (a fresh H100/H200 host): Python 3.12 with its own preinstalled torch (2.11 with
# CUDA), numpy, scipy, opencv-python-headless, transformers, pytest, pytest-timeout,
# prometheus-client; NOT this project's pinned versions.  The project runs from this working tree
# (PYTHONPATH=<repo>), never pip-installed, so the host's torch stays.  Light dependencies the host
# lacks (webrtcvad-wheels, soxr, soundfile, ...) are installed from wheels in <repo>/.whl if that
# folder exists (pip --no-index --no-deps into /tmp/gpu_check_site; nothing is fetched; a module
# that is already importable is never replaced).  Make the wheels on a machine with internet:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl webrtcvad-wheels==2.0.14.post1
# Output: progress on stderr, the JSON object alone on stdout; exit 0 unless the conformance tests
# fail.  Budget: < 8 minutes on an H100/H200 (release shapes, 20 repetitions per stage, 20 s live).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python          # a developer checkout
else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/gpu_check_site
  for whl in .whl/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    mod=$(case "$name" in webrtcvad_wheels) echo webrtcvad;; *) echo "${name,,}";; esac)
    if ! "$PY" -c "import $mod" 2>/dev/null; then
      echo "[gpu_check] installing $(basename "$whl") (no $mod on this host)" >&2
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl" >&2 \
        || echo "[gpu_check] could not install $(basename "$whl"): going on without $mod" >&2
    fi
  done
  [[ -d $site ]] && export PYTHONPATH="$PYTHONPATH:$site"
fi
exec "$PY" bench/gpu_check.py "$@"
