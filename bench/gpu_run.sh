#!/usr/bin/env bash
# The GPU measurements of the README, in one run (about 10 minutes on one H100/H200), each
# part under its own time limit so that a slow part leaves the others' results:
#   0. tests/test_gpu.py: a seed gives the same picture on CUDA as on the CPU; tiled VAE exact;
#   1. the tiled VAE at 4096² (full-size random VAE, disk store, 4 GB budget): peak RSS, GPU
#      memory, time (encode, then decode);
#   2. OSEDiff and CCSR two-step at 512², full-size random models: ours vs the official way,
#      stage times, peak allocated GPU memory, and each lever alone;
#   3. OSEDiff at 2048²: tiled ours vs the official way vs untiled ours;
#   4. OSEDiff 512² with torch.compile (default mode; the warm-up runs include the compile);
#   eager: part 2 again with the CUDA graphs off, no levers.
# PARTS picks some of them (default: "test tiling speed 2048 compile"); LEVERS=0 skips the levers,
# LEVER_NAMES=a,b measures only those.
# JSON results go to $OUT (default bench/results/gpu); the printed tables are the log.
#   bash bench/gpu_run.sh 2>&1 | tee gpu.log
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PARTS=${PARTS:-test tiling speed 2048 compile} LEVERS=${LEVERS:-1}
T_COMPILE=${T_COMPILE:-150} T_TEST=${T_TEST:-60} T_ENC=${T_ENC:-125} T_DEC=${T_DEC:-200} T_SPEED=${T_SPEED:-140} T_2048=${T_2048:-65}
BUDGET=${BUDGET:-4G}  # the tiled VAE's memory budget: 4 GB keeps a 4096² mid attention's K/V (1 GB) on the GPU
quiet() { grep -v "warm-up\|run [0-9]*/[0-9]*:\|should be kept in float32"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, diffusers, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" || exit 1
df -h /tmp | tail -1

part() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }

if part test; then
echo "== 0. tests/test_gpu.py"
timeout "$T_TEST" python3 -m pytest -p no:cacheprovider tests/test_gpu.py tests/test_resize.py -q -rfs 2>&1 | tail -40
fi

if part tiling; then
echo "== 1. tiled VAE, 4096², full size, disk store, $BUDGET budget"
for stage in encode decode; do
  t=$T_ENC; [ $stage = decode ] && t=$T_DEC
  timeout "$t" python3 bench/tiling_bench.py --device cuda --stages full:$stage:4096:256 --store disk \
    --max-memory $BUDGET --threads 4 --timeout $((t - 5)) --json "$OUT/tiling_${stage}4096.json" 2>&1 | tail -1
  pkill -f tiling_bench
done
fi

if part speed; then
echo "== 2. 512², full models, ours vs official, levers"
lev=""; [ "$LEVERS" = 1 ] && lev="--levers --lever-runs 6 ${LEVER_NAMES:+--lever-names $LEVER_NAMES}"
timeout "$T_SPEED" python3 -m bench --device cuda --models full --methods osediff,ccsr --sizes 512 \
  --runs 8 --warmup 2 $lev --timeout $((T_SPEED / 2 - 5)) --json "$OUT/gpu_512.json" 2>&1 | quiet
pkill -f bench.worker
fi

if part eager; then
echo "== 2b. 512², full models, ours without CUDA graphs"
timeout "$T_SPEED" python3 -m bench --device cuda --models full --methods osediff,ccsr --sizes 512 \
  --runs 8 --warmup 2 --set cuda_graphs=false --timeout $((T_SPEED / 2 - 5)) --json "$OUT/gpu_512_eager.json" 2>&1 | quiet
pkill -f bench.worker
fi

if part 2048; then
echo "== 3. OSEDiff 2048², full models"
timeout "$T_2048" python3 -m bench --device cuda --models full --methods osediff --sizes 2048 \
  --runs 2 --warmup 1 --timeout $((T_2048 - 5)) --json "$OUT/gpu_2048.json" 2>&1 | quiet
pkill -f bench.worker
fi

if part compile; then
echo "== 4. OSEDiff 512², torch.compile"
timeout "$T_COMPILE" python3 -m bench --device cuda --models full --methods osediff --sizes 512 --compile \
  --runs 5 --warmup 2 --timeout $((T_COMPILE - 5)) --json "$OUT/gpu_512_compile.json" 2>&1 | quiet
fi
echo "== done"
