#!/usr/bin/env bash
# Run HERE, where PyPI is reachable, before a GPU run: fills WHEEL_DIR (default .whl, git-ignored)
# with what the lent GPU machine's image lacks and cannot fetch there (it reaches no network):
# optree (metafunc's one dependency missing there), and the peers learn2learn 0.2.0, higher 0.2.1
# and TorchOpt 0.7.3 with the pure-Python packages they import, and Omniglot. benchmarks/gpu.sh installs them
# with no network: wheels with pip, and learn2learn's three Cython modules (C regenerated here
# with Cython 3, since the published C does not build on Python >= 3.11) compiled there with the
# machine's own compiler and headers.
#
#   bash benchmarks/gpu_prepare.sh [WHEEL_DIR]      PYV=3.12 (the GPU image's python3) by default
#
# Then name the folder in the device call's `carry` and run `bash benchmarks/gpu.sh "$OUT"`.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-.whl}
PYV=${PYV:-3.12}
PY=${PY:-python3}
rm -rf "$W"
mkdir -p "$W"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${platforms[@]}" -d "$W" \
  optree==0.20.0 torchopt==0.7.3 higher==0.2.1 graphviz==0.21 gym_notices==0.1.0
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
# gym 0.26.2 (learn2learn imports it at import time) is published only as source: a pure wheel
"$PY" -m pip wheel -q --no-deps -w "$W" gym==0.26.2
bash benchmarks/peers/learn2learn_source.sh "$src" "$PY"
tar czf "$W/learn2learn-0.2.0-src.tar.gz" -C "$src/learn2learn-0.2.0" learn2learn
# Omniglot's two folders (15 MB of PNGs), for bench_precision's real meta-batch and the data tests
data=${METAFUNC_DATA:-../shared/data}
if [ -d "$data/omniglot-py/images_background" ]; then
  tar czf "$W/omniglot-py.tar.gz" -C "$data" omniglot-py/images_background \
    omniglot-py/images_evaluation
fi
du -sh "$W"
ls "$W"
