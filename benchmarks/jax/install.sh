#!/usr/bin/env bash
# Install JAX and optax for benchmarks/bench_jax.py into their own virtual environment (default
# .jax-venv in the repo's root), as the PyTorch peers get theirs: nothing of metafunc's
# environment changes. Pinned to the versions the committed results were measured with.
#
#   bash benchmarks/jax/install.sh [VENV]        PYTHON=python3 by default
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$(realpath -m "${1:-$root/.jax-venv}")
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r "$root/benchmarks/jax/requirements.txt"
"$VENV/bin/python" -c "import jax, optax, numpy; print('jax', jax.__version__, \
'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"
