#!/usr/bin/env bash
# One-step set-up on Debian/Ubuntu: system packages, a venv in .venv, avatar-agent and its models.
#   ./install.sh          runtime (embedded profile, microphone, virtual camera, local web page)
#   ./install.sh --dev    + the test and lint (pytest, ruff, mypy), official-profile, ONNX-bench,
#                         LiveKit and pipecat extras (what .ci/run uses)
#   VENV=/path ./install.sh  to put the venv elsewhere
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu ./install.sh
#                         a CPU-only torch on a machine without a GPU (PyPI's default build
#                         brings CUDA libraries: several GB)
set -euo pipefail
cd "$(dirname "$0")"
DEV=0; [ "${1:-}" = "--dev" ] && DEV=1
VENV=${VENV:-.venv}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

APT="python3-venv libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins espeak-ng"
[ "$DEV" = 1 ] && APT="$APT alsa-utils sox chromium systemd gcc libc6-dev"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
missing=$(for p in $APT; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "avatar-agent needs Python >= 3.11 (found $("$PYTHON" -V 2>&1)); set PYTHON=/path/to/python3.11+" >&2
  exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# The pinned CPU torch first, on its own: an unpinned resolve could pull a multi-GB CUDA build.
"$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
  2> >(grep -v "is ignored" >&2)
EXTRAS="webrtc,vcam"; [ "$DEV" = 1 ] && EXTRAS="webrtc,vcam,official,bench,livekit,pipecat,dev"
"$PY" -m pip install -q -e ".[$EXTRAS]" 2> >(grep -v "is ignored" >&2)
# mediapipe 0.10.21 is the last release with the face models inside the wheel; --no-deps keeps
# numpy 2 and skips jax/jaxlib, which the legacy FaceMesh path does not use.
"$PY" -m pip install -q --no-deps mediapipe==0.10.21 2> >(grep -v "is ignored" >&2)
echo "avatar-agent installed in $VENV"
