#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then the speed and memory benchmarks, results under
# benchmarks/results/ with the device name and date in the file names. Needs the venv carried
# over (or `pip install -e '.[test]'`); peers run when .peers-venv exists, else are reported
# missing. Usage: bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
NAME=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
DAY=$(date +%F)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$NAME-$DAY.txt"
$PY -m pytest -q -m gpu tests 2>&1 | tail -3 | tee -a "$OUT/gpu-$NAME-$DAY.txt"
# agreement first (float64, tiny), then timing on the two Omniglot settings, both orders
$PY benchmarks/peers/driver.py --check --device cuda --settings omniglot-5w1s,omniglot-20w1s \
  --impls plain,funcvmap,metafunc,metafunc-vmap,learn2learn,higher,torchopt
for order in "" "--first-order"; do
  tag=${order:+-first}
  $PY benchmarks/peers/driver.py --device cuda --settings omniglot-5w1s,omniglot-20w1s \
    --impls plain,funcvmap,metafunc,metafunc-vmap,metafunc-compile,learn2learn,higher,torchopt \
    --warmup 3 --iters 20 $order --out "$OUT/peers-$NAME-$DAY$tag.json"
done
# the 20-way setting as issue 6 words it (5 queries per class), second order, without compile
$PY benchmarks/peers/driver.py --device cuda --settings omniglot-20w1s-5q \
  --impls plain,funcvmap,metafunc,metafunc-vmap,learn2learn,higher,torchopt \
  --warmup 3 --iters 20 --out "$OUT/peers-$NAME-$DAY-5q.json"
METAFUNC_DATA=${METAFUNC_DATA:-../shared/data} $PY benchmarks/bench_precision.py --device cuda \
  --out "$OUT/bench_precision-$NAME-$DAY.json" || echo "bench_precision: no Omniglot data here"
$PY benchmarks/bench_memory.py --device cuda --steps 1,5,10,25,50 \
  --impls metafunc,metafunc-checkpoint --iters 3 --out "$OUT/bench_memory-$NAME-$DAY.json"
