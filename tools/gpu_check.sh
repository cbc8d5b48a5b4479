#!/usr/bin/env bash
# One call on a GPU machine: build deepcomm, start CUDA MPS when ranks
# outnumber GPUs, run the whole test suite (GPU tests included) and the
# benchmarks, keep every log under $OUT, and print a short table last.
#
#   OUT=/tmp/out NRANKS="2 4" tools/gpu_check.sh
#
# NVLink multicast stays off (shared machines): NCCL_NVLS_ENABLE=0,
# NVSHMEM_DISABLE_NVLS=1, TORCH_SYMM_MEM_DISABLE_MULTICAST=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
NRANKS=${NRANKS:-"2 4"}
TESTS=${TESTS:-tests}
BENCH_ARGS=${BENCH_ARGS:-"--preset prefill --sms 8,16,24,32 --overlap --iters 20 --warmup 3"}
DECODE_ARGS=${DECODE_ARGS:-"--preset decode --backend intranode --dtypes bf16,fp8 --sms 24 --iters 50 --warmup 5"}
BENCH=${BENCH:-1}  # 0: tests only
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
status=0
summary=()
note() { summary+=("$1"); }

nvidia-smi -L > "$OUT/gpus.txt" 2>&1
num_gpus=$(grep -c '^GPU' "$OUT/gpus.txt" || true)
note "gpus: ${num_gpus} ($(head -1 "$OUT/gpus.txt" | cut -d'(' -f1))"

start=$(date +%s)
if python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  note "build: ok in $(( $(date +%s) - start ))s ($(python3 -c 'import deepcomm; b=deepcomm.features()["build"]; print("cuda", b["cuda_compiled"], "archs", b["cuda_archs"], "nvshmem", b["nvshmem"])'))"
else
  note "build: FAILED (see build.log)"; status=1
fi

max_ranks=$(echo $NRANKS | tr ' ' '\n' | sort -n | tail -1)
mps_started=0
if [ "$max_ranks" -gt "$num_gpus" ] && ! pgrep -f nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/deepcomm-mps/pipe}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/deepcomm-mps/log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    mps_started=1; note "mps: started (ranks outnumber GPUs)"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    note "mps: could not start; ranks sharing a GPU will be time-sliced"
  fi
fi

if timeout 900 python3 -m pytest $TESTS -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1; then
  note "tests: $(tail -1 "$OUT/tests.log")"
else
  note "tests: FAILED: $(tail -1 "$OUT/tests.log")"; status=1
fi

# NVSHMEM with two PEs sharing one GPU (under MPS): informative, not a gate; last among the
# tests because a failing NVSHMEM client can leave MPS unusable for later ones.
if [ "$num_gpus" -eq 1 ] && [ "$mps_started" -eq 1 ]; then
  if DEEPCOMM_NVSHMEM_SHARED_GPU=1 timeout 300 python3 -m pytest tests/test_internode.py -q -rs -p no:cacheprovider \
      -k one_gpu > "$OUT/nvshmem_internode_one_gpu.log" 2>&1; then
    note "nvshmem internode, 2 PEs on one GPU: $(tail -1 "$OUT/nvshmem_internode_one_gpu.log")"
  else
    note "nvshmem internode, 2 PEs on one GPU: FAILED (informative): $(tail -1 "$OUT/nvshmem_internode_one_gpu.log")"
  fi
  if timeout 120 python3 -c 'import sys; sys.path.insert(0, "tests"); from dist import run_ranks; from test_gpu import _nvshmem_worker; run_ranks(_nvshmem_worker, 2)' > "$OUT/nvshmem_one_gpu.log" 2>&1; then
    note "nvshmem, 2 PEs on one GPU: ring put ok"
  else
    note "nvshmem, 2 PEs on one GPU: failed or timed out (see nvshmem_one_gpu.log)"
  fi
fi

[ "$BENCH" = 1 ] || { echo "== deepcomm gpu_check =="; for line in "${summary[@]}"; do echo "  $line"; done; exit $status; }

bench() {  # name, ranks, args...
  local name=$1 n=$2; shift 2
  if timeout 600 python3 -m deepcomm.launch --standalone --nproc-per-node "$n" -m deepcomm.bench "$@" \
      --json "$OUT/${name}.json" > "$OUT/${name}.log" 2>&1; then
    note "bench ${name}: ok"
  else
    note "bench ${name}: FAILED (see ${name}.log)"; status=1
  fi
}
INTER_ARGS=${INTER_ARGS:-"--preset prefill --routing node-limited --max-nodes 2 --iters 8 --warmup 2"}
for n in $NRANKS; do
  bench "prefill_${n}ranks" "$n" $BENCH_ARGS
  bench "decode_${n}ranks" "$n" $DECODE_ARGS
  # Internode: the ranks split into 2 nodes, beside the flat intranode path on the same ranks.
  if [ "$n" -ge 2 ] && [ $(( n % 2 )) -eq 0 ]; then
    bench "internode_2x$(( n / 2 ))" "$n" $INTER_ARGS --ranks-per-node $(( n / 2 )) --sms $(( n > 4 ? 16 : 24 ))
  fi
done

# Kernel times against wall clock for a decode-size call (torch profiler), and a trace.
if timeout 300 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
    --tokens 128 --trace "$OUT/dispatch_trace.json" > "$OUT/profile_decode.log" 2>&1 && \
   timeout 300 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
    --tokens 4096 --iters 10 > "$OUT/profile_prefill.log" 2>&1; then
  note "profile: ok (profile_*.log, dispatch_trace.json)"
else
  note "profile: FAILED (see profile_*.log)"
fi

echo "== deepcomm gpu_check =="
for line in "${summary[@]}"; do echo "  $line"; done
for log in "$OUT"/prefill_*.log "$OUT"/decode_*.log "$OUT"/internode_*.log "$OUT"/profile_*.log; do
  [ -f "$log" ] && { echo; grep -A40 -E '^(deepcomm bench|backend=)' "$log" | grep -v '^rows written'; }
done
exit $status
