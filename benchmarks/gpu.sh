#!/usr/bin/env bash
# The GPU comparison of issue 6 in one call on a lent GPU machine: the float64 agreement check,
# the timings and the GPU tests, most important first, inside a time budget.
#
#   here:        bash benchmarks/gpu_prepare.sh          # once: wheels and data into .whl/
#   the device:  run(command='METAFUNC_COMMIT=<sha> bash benchmarks/gpu.sh "$OUT"',
#                    carry=[".whl"], timeout_s=600)
#
# The lent machine's image has python3 with torch but no optree and no peers, and reaches no
# network: with .whl/ present this script installs them from there into /tmp/metafunc-site (and
# unpacks Omniglot for bench_precision). Elsewhere it uses .venv/bin/python if present (else
# python3) as it is.
#
# Steps run in order; one whose estimate would overrun BUDGET seconds (default 540, for a call
# of 600 s: pass less where less device time is left) is skipped and says so, and each is
# stopped after twice its estimate (or what is left, if less). Results are written under
# benchmarks/results/ with the device name and date in their names, and after every step they
# are packed again into OUT/gpu-results-<device>-<date>.tgz, so a call cut short still brings
# back what finished. The log is OUT/gpu.log.
#
# DEVICE=cpu rehearses the whole script on a machine without a GPU (with WARMUP, ITERS, MAX_SECONDS
# and BUDGET to keep it short); SKIP="name ..." leaves steps out; RES moves the results folder,
# WHEELS the folder that gpu_prepare.sh filled.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
WARMUP=${WARMUP:-2}
ITERS=${ITERS:-20}
MAX_SECONDS=${MAX_SECONDS:-5}
SKIP=${SKIP:-}
RES=${RES:-benchmarks/results}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$RES"
OUT=$(cd "$OUT" && pwd)
RES=$(cd "$RES" && pwd)
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1

if [ -d "$WHEELS" ]; then  # the lent machine: install what its image lacks, with no network
  PY=${PY:-python3}
  site=/tmp/metafunc-site
  rm -rf "$site" && mkdir -p "$site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$WHEELS"/*.whl || echo "gpu.sh: installing $WHEELS/*.whl failed"
  # learn2learn: the C that Cython generated (gpu_prepare.sh), compiled for this python
  if tar xzf "$WHEELS"/learn2learn-*-src.tar.gz -C "$site"; then
    inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    ext=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    pids=()
    for f in meta_dataset task_dataset transforms; do
      "${CC:-cc}" -shared -fPIC -O0 -I"$inc" "$site/learn2learn/data/$f.c" \
        -o "$site/learn2learn/data/$f$ext" &
      pids+=($!)
    done
    compiled=1
    for pid in "${pids[@]}"; do wait "$pid" || compiled=0; done  # each job's own status
    if ((!compiled)); then
      # No compiler or no Python headers there: importable stand-ins for the three data modules
      # (the benchmark uses learn2learn.algorithms.MAML alone), and the log says so.
      echo "gpu.sh: compiling learn2learn's data modules failed; import-only stand-ins instead"
      for f in meta_dataset task_dataset transforms; do
        rm -f "$site/learn2learn/data/$f$ext"
        cat >"$site/learn2learn/data/$f.py" <<'STANDIN'
"""Stand-in written by metafunc's benchmarks/gpu.sh where this Cython module could not be
compiled: importable, not usable (the benchmark uses learn2learn.algorithms.MAML alone)."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"learn2learn.data: {name} was not compiled on this machine")

    return type(name, (), {"__init__": unavailable})
STANDIN
      done
    fi
  fi
  export PYTHONPATH=$site
  if [ -f "$WHEELS/omniglot-py.tar.gz" ] && [ -z "${METAFUNC_DATA:-}" ]; then
    mkdir -p /tmp/metafunc-data && tar xzf "$WHEELS/omniglot-py.tar.gz" -C /tmp/metafunc-data \
      && export METAFUNC_DATA=/tmp/metafunc-data
  fi
elif [ -x .venv/bin/python ]; then
  PY=${PY:-.venv/bin/python}
else
  PY=${PY:-python3}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export METAFUNC_DATA=${METAFUNC_DATA:-../shared/data}

if [ "$DEVICE" = cpu ]; then
  NAME=cpu-rehearsal
else
  NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
    echo "gpu.sh: no CUDA device visible to $PY"
    exit 1
  }
fi
TAG="$NAME-$(date +%F)"
echo "gpu.sh: $TAG, python $PY, budget ${BUDGET} s, commit ${METAFUNC_COMMIT:-(git)}"

pack() {  # every result of this run (each impl's own JSON too), no tensors; replaced whole
  (cd "$RES" && tar czf "$OUT/.gpu-results.tmp" --exclude='*.pt' -- *"$TAG"* \
    && mv "$OUT/.gpu-results.tmp" "$OUT/gpu-results-$TAG.tgz") 2>/dev/null || true
}

step() {  # step NAME ESTIMATED_SECONDS COMMAND...
  local name=$1 est=$2 left cap rc t0=$SECONDS
  shift 2
  left=$((BUDGET - SECONDS))
  if [[ " $SKIP " == *" $name "* ]]; then
    echo "== $name: skipped (SKIP)"
    return
  fi
  if ((est > left)); then
    echo "== $name: skipped, estimated ${est} s and ${left} s are left"
    return
  fi
  cap=$((2 * est < left ? 2 * est : left))  # a step that runs long cannot take the rest
  echo "== $name (estimated ${est} s, stopped after ${cap} s, ${left} s left, $(date +%T))"
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  pack
}

# each impl's result JSON lands under RES too (packed after every step), so a step stopped at
# its cap keeps the impls it finished; the driver's table comes at the end of each call
driver=("$PY" benchmarks/peers/driver.py --device "$DEVICE" --workdir "$RES/peers-work-$TAG")
time_args=(--warmup "$WARMUP" --iters "$ITERS" --max-seconds "$MAX_SECONDS" --timeout 60)
IMPLS=plain,funcvmap,metafunc,metafunc-chunked,learn2learn,higher,torchopt

step environment 30 bash -c "
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
    for m in metafunc optree learn2learn higher torchopt; do
      $PY -c \"import \$m; print('\$m', getattr(\$m, '__version__', '?'))\" 2>&1 | tail -1
    done; } | tee '$RES/gpu-$TAG.txt'"
# float64 agreement with the plain loop before any timing: metafunc's strategies and the naive
# vmap, second order (the peers' agreement is checked on the CPU, and again in float32 by every
# timing run below)
step check 120 "${driver[@]}" --check --settings omniglot-5w1s,omniglot-20w1s --timeout 60 \
  --orders second --impls plain,funcvmap,metafunc,metafunc-chunked,metafunc-loop \
  --out "$RES/peers-check-$TAG.json"
# the targets: second order, the two Omniglot settings, one file each
for s in omniglot-5w1s omniglot-20w1s; do
  step "second-$s" 120 "${driver[@]}" --settings "$s" --impls "$IMPLS" "${time_args[@]}" \
    --out "$RES/peers-$TAG-$s.json"
done
# every algorithm's meta-gradient on CUDA against the float64 references (tests/test_gpu.py)
# and a short training run; the compiled meta-gradient's tests come later (compiling is slow)
step gpu-tests 60 bash -c "set -o pipefail; $PY -m pytest -q -rfE -m gpu -k 'not compiled' \
  -p no:cacheprovider tests 2>&1 | tee -a '$RES/gpu-$TAG.txt'"
# the whole training step (compile_step, tasks drawn inside): eager, compiled, and compiled with
# CUDA graphs (reduce-overhead), on the sinusoid and the two Omniglot shapes
step compiled-step 180 "$PY" benchmarks/bench_jax.py --no-jax --device "$DEVICE" \
  --settings sinusoid,omniglot-5w1s,omniglot-20w1s --modes eager,default,reduce-overhead \
  --rounds 3 --max-seconds 10 --timeout 170 --out "$RES/bench_step-$TAG.json"
# the sinusoid step precompiled, saved and loaded back (compile_step(cache=...)), as a repeated
# metafunc train runs it: never tried on CUDA before, so a step of its own
step precompiled-step 60 "$PY" benchmarks/bench_jax.py --no-jax --device "$DEVICE" \
  --settings sinusoid --modes precompiled --rounds 3 --max-seconds 10 --timeout 110 \
  --out "$RES/bench_step-precompiled-$TAG.json"
for s in omniglot-5w1s omniglot-20w1s; do
  step "first-$s" 100 "${driver[@]}" --settings "$s" --impls "$IMPLS" --first-order \
    "${time_args[@]}" --out "$RES/peers-$TAG-$s-first.json"
done
step gpu-compile-tests 120 bash -c "set -o pipefail; $PY -m pytest -q -rfE -m gpu \
  -k compiled -p no:cacheprovider tests 2>&1 | tee -a '$RES/gpu-$TAG.txt'"
# what else the strategy could be on this device, and the compiled meta-gradient
step variants 150 "${driver[@]}" --settings omniglot-5w1s,omniglot-20w1s "${time_args[@]}" \
  --impls plain,metafunc-loop,metafunc-compile,metafunc-compile-ro --timeout 150 \
  --out "$RES/peers-$TAG-variants.json"
step 5q 120 "${driver[@]}" --settings omniglot-20w1s-5q --impls "$IMPLS" "${time_args[@]}" \
  --out "$RES/peers-$TAG-5q.json"
step memory 90 "$PY" benchmarks/bench_memory.py --device "$DEVICE" --steps 1,5,10,25,50 \
  --impls metafunc,metafunc-checkpoint,learn2learn --iters 2 \
  --out "$RES/bench_memory-$TAG.json"
step precision 90 "$PY" benchmarks/bench_precision.py --device "$DEVICE" \
  --out "$RES/bench_precision-$TAG.json"
pack
echo "gpu.sh: done in ${SECONDS} s; results in $OUT/gpu-results-$TAG.tgz"
