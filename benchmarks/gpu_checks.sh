#!/usr/bin/env bash
# Issue 12's accelerator checks in one go, each benchmark under its own time limit, so that one
# that fails or overruns does not cost the others. Logs go to $1 (default gpu_logs/); further
# arguments pick steps by name (default: all; their time limits add up to ~20 minutes, so pick
# steps to fit a lease).
#
#   bash benchmarks/gpu_checks.sh [LOGDIR [mfu] [mfu_variants] [train_fp32] [train_bf16] [sampling]
#                                         [quickstart] [tests]]
#
# Needs a GPU and, for the PyTorch side, diffusers importable beside torch; on a machine without
# a registry, carry the wheels of benchmarks/gpu_wheels.txt (its header says how).
# 1. versions and the card;
# 2. DiT-XL/2 bfloat16 train-step MFU against the card's measured bf16 matmul peak, batch 64, 32
#    and 128 (256, DiT's training batch, needs more than 80 GB), with a kernel-time profile of the
#    batch-64 step written to $TRACE_DIR (default /tmp/gpu_trace: a trace is too large to bring
#    back) (mfu); batch 64 in one
#    process with each of the GPU defaults undone: blocks scanned, XLA's unfused attention, both
#    (the defaults before 2026-11-27) (mfu_variants);
# 3. ddpm_cifar10 train step, batch 128, JAX vs diffusers PyTorch on the same card, float32 (TF32
#    matmuls on both sides) and bfloat16, alternated, each side in its own process;
# 4. ddpm_cifar10 sampling (DDIM 50 steps, ancestral extrapolated to 1000), batch 128, two
#    alternated rounds;
# 5. the README's Quickstart as written, less its pip installs (the machine has no registry), on
#    the GPU (quickstart: on request only; it writes runs/digits, and refuses to start when that
#    exists, which the trainer would resume);
# 6. the fast test suite (on the CPU, as conftest.py sets it, with this machine's jax and
#    cores) (tests: on request only).
# The bfloat16 train step needs ~100 s a round (JAX compiles for ~45 s, PyTorch's first call
# takes ~20 s): it ran out of a 200 s limit in round 2 twice on 2026-11-26.
set -u
out=${1:-gpu_logs}
shift || true
wanted=" ${*:-mfu mfu_variants train_fp32 train_bf16 sampling} "
cores=$(nproc)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax, torch, diffusers, diffusion_jax
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee "$out/versions.txt" \
  || exit 1

step() {  # step NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  [[ $wanted == *" $name "* ]] || return 0
  echo "== $name ($limit s at most): python3 $*"
  timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
step mfu 260 benchmarks/bench_mfu.py --model DiT-XL/2 --batch 64,32,128 --dtype bfloat16 \
  --iters 10 --profile_dir "${TRACE_DIR:-/tmp/gpu_trace}"
step mfu_variants 240 benchmarks/bench_mfu.py --model DiT-XL/2 --batch 64 --dtype bfloat16 \
  --iters 10 --model_kwargs \
  '[{"scan_blocks": true}, {"attention": "xla"}, {"scan_blocks": true, "attention": "xla"}]'
step train_fp32 150 benchmarks/bench_train.py --models ddpm_cifar10 --batch 128 --rounds 2 --iters 5
step train_bf16 300 benchmarks/bench_train.py --models ddpm_cifar10 --batch 128 --rounds 2 \
  --iters 5 --dtype bfloat16
step sampling 220 benchmarks/bench_sampling.py --batch 128 --rounds 2 --ddpm_steps 50

if [[ $wanted == *" quickstart "* ]]; then
  # The README block's command, less `pip install ... &&` (the packages come as wheels).
  cmd=$(sed -n '/command:quickstart:start/,/command:quickstart:end/p' README.md | grep '^pip' \
        | sed 's/^pip install -r requirements.txt && pip install --no-deps -e . && //')
  echo "== quickstart (500 s at most): $cmd"
  if [[ -e runs/digits ]]; then
    echo "== quickstart: skipped, runs/digits exists (the trainer would resume it): move it away"
  else
    SECONDS=0
    timeout 500 bash -ec "$cmd" > "$out/quickstart.log" 2>&1
    echo "== quickstart: exit $? after ${SECONDS} s"
    grep -E "frechet_distance|real floor|steps/s" "$out/quickstart.log" | tail -4
    cp runs/digits/samples.png "$out/quickstart_samples.png" 2>/dev/null
  fi
fi
if [[ $wanted == *" tests "* ]]; then
  echo "== tests (290 s at most): python3 -m pytest -v -n $((cores - 1)) -m 'not slow' tests"
  timeout 290 python3 -m pytest -v -n $((cores - 1)) -m "not slow" tests -p no:cacheprovider \
    > "$out/tests.log" 2>&1
  echo "== tests: exit $?"
  tail -3 "$out/tests.log"
fi
