#!/usr/bin/env bash
# learn2learn 0.2.0's source, ready to build on Python >= 3.11: downloads the sdist into DIR and
# regenerates the C of its three Cython modules with Cython 3 (the published C includes
# longintrepr.h, which Python 3.11 removed). Used by install.sh (the peers' venv) and by
# ../gpu_prepare.sh (built on the lent GPU machine instead).
#
#   bash benchmarks/peers/learn2learn_source.sh DIR [PYTHON]     -> DIR/learn2learn-0.2.0/
set -euo pipefail
DIR=$1
PY=${2:-python3}
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --no-binary :all: learn2learn==0.2.0 -d "$DIR"
tar xzf "$DIR/learn2learn-0.2.0.tar.gz" -C "$DIR"
cython_path=
if ! "$PY" -c "import Cython, sys; sys.exit(int(Cython.__version__.split('.')[0]) < 3)" 2>/dev/null
then
  cython_path="$DIR/cython"
  "$PY" -m pip install -q --target "$cython_path" "cython>=3"
fi
for f in meta_dataset task_dataset transforms; do
  PYTHONPATH="$cython_path" "$PY" -m cython -3 "$DIR/learn2learn-0.2.0/learn2learn/data/$f.pyx" \
    -o "$DIR/learn2learn-0.2.0/learn2learn/data/$f.c"
done
