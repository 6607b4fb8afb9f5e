#!/usr/bin/env bash
# Install the peers of metafunc's benchmark -- learn2learn 0.2.0, higher 0.2.1, TorchOpt 0.7.3 --
# into their own virtual environment (default .peers-venv in the repo's root), with the torch
# and torchvision versions of metafunc's .venv (else 2.14.1 / 0.29.1), so the peers compute on
# the same kernels. The driver runs every peer under .peers-venv/bin/python when it exists.
#
#   bash benchmarks/peers/install.sh [VENV]        PYTHON=python3 by default
#
# Notes (Python 3.11, torch 2.14.1): learn2learn is built from source regenerated with Cython 3
# (learn2learn_source.sh); TorchOpt's compiled extension does not load with torch 2.14 and it
# falls back to its Python implementation, which is all a MAML benchmark uses; higher works
# unmodified.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$(realpath -m "${1:-$root/.peers-venv}")  # a relative VENV is the caller's
cd "$root"
PY=${PYTHON:-python3}
ref=.venv/bin/python  # metafunc's environment, whose torch the peers get
[ -x "$ref" ] || ref=$PY
versions=$("$ref" -c "import torch, torchvision as tv; print(torch.__version__.split('+')[0], \
  tv.__version__.split('+')[0])" 2>/dev/null || echo "2.14.1 0.29.1")
read -r torch_v vision_v <<<"$versions"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$torch_v" "torchvision==$vision_v" \
  -r benchmarks/peers/requirements.txt
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
bash benchmarks/peers/learn2learn_source.sh "$src" "$VENV/bin/python"
"$VENV/bin/pip" install -q "$src/learn2learn-0.2.0"
"$VENV/bin/python" - <<'PY'
import importlib

for name in ("learn2learn", "higher", "torchopt", "torch"):
    module = importlib.import_module(name)
    print(f"{name:12s} {getattr(module, '__version__', '?')}")
PY
