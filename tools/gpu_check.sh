#!/usr/bin/env bash
# One call on a GPU machine: build deepcomm, run the GPU tests with one GPU per
# rank, then (CUDA MPS started when ranks outnumber GPUs) with several ranks per
# GPU, the benchmarks (DeepEP beside them when its source is carried), keep every
# log under $OUT, and print a short table last.
#
#   OUT=/tmp/out NRANKS="2 4" tools/gpu_check.sh
#   OUT=/tmp/out STEPS="tests" tools/gpu_check.sh          # a subset, in this order:
#   STEPS: tests (one GPU per rank; several GPUs only) shared (ranks share GPUs, MPS)
#          nvshmem (PEs sharing one GPU) bench deepep (deepep_build: build only)
#          overlap (MoE block plain vs two micro-batches, 2 ranks, half the SMs each; training curves) profile
#          decode_overlap (the same through the low-latency mode, receive hooks, 8 experts a rank: the experts
#              over whole receive regions, then over the received rows; not in the default list)
#          lowlatency (decode in the low-latency mode: bench rows and a profile per rank count)
#          ab (before/after: another tree, carried as AB_DIR, built in place and benchmarked
#              alternately with this one, AB_ROUNDS times, on AB_NRANKS ranks with AB_ARGS)
#          ray (ranks placed by Ray, a GPU each, beside deepcomm.launch; Ray from RAY_BUNDLE where missing)
#   LL_NRANKS (default NRANKS): the rank counts step lowlatency runs.
#   DECODE_LAUNCHES=N launches step bench's decode run N times and tabulates each row's spread
#   (tools/ab_table.py --spread). BUILD=0 reuses the extension an earlier call built. INTERNODE=0 leaves the internode rows out of
#   step bench (the flat intranode path, prefill and decode, beside DeepEP with step deepep):
#     OUT=/tmp/out NRANKS=2 STEPS="tests bench deepep" INTERNODE=0 \
#       BENCH_ARGS="--preset prefill --backend intranode --sms 8,24 --dtypes bf16,fp8" tools/gpu_check.sh
#
#   A before/after run of the previous commit against the working tree:
#     mkdir -p .ab/base && git archive HEAD~1 | tar -x -C .ab/base     # .ab/ is git-ignored: carry it
#     OUT=/tmp/out STEPS="ab" AB_DIR=.ab/base AB_ARGS="--preset prefill --dtypes fp8" tools/gpu_check.sh
#
# NVLink multicast stays off (shared machines): NCCL_NVLS_ENABLE=0,
# NVSHMEM_DISABLE_NVLS=1, TORCH_SYMM_MEM_DISABLE_MULTICAST=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
NRANKS=${NRANKS:-"2 4"}
TESTS=${TESTS:-tests}
STEPS=${STEPS:-"tests shared nvshmem bench deepep lowlatency overlap profile"}
LL_ARGS=${LL_ARGS:-"--preset decode --mode low-latency --sms 24 --iters 50 --warmup 5"}
BENCH_ARGS=${BENCH_ARGS:-"--preset prefill --sms 8,16,24,32 --overlap --iters 20 --warmup 3"}
DECODE_ARGS=${DECODE_ARGS:-"--preset decode --backend intranode --dtypes bf16,fp8 --sms 24 --iters 50 --warmup 5"}
[ "${BENCH:-1}" = 0 ] && STEPS=${STEPS//bench/} && STEPS=${STEPS//deepep/} && STEPS=${STEPS//overlap/} && STEPS=${STEPS//profile/}
step() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the ab step runs from another tree
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
status=0
summary=()
note() { summary+=("$1"); }

nvidia-smi -L > "$OUT/gpus.txt" 2>&1
num_gpus=$(grep -c '^GPU' "$OUT/gpus.txt" || true)
note "gpus: ${num_gpus} ($(head -1 "$OUT/gpus.txt" | cut -d'(' -f1))"
# Latency-bound kernels follow the SM clock that copies barely notice: keep it beside the numbers.
note "clocks (application sm MHz, max sm MHz, power limit): $(nvidia-smi --query-gpu=clocks.applications.graphics,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | head -1)"

start=$(date +%s)
if [ "${BUILD:-1}" = 0 ] && python3 -c 'import deepcomm._C' 2> /dev/null; then
  note "build: skipped (BUILD=0, the extension from an earlier call imports)"
elif python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  note "build: ok in $(( $(date +%s) - start ))s ($(python3 -c 'import deepcomm; b=deepcomm.features()["build"]; print("cuda", b["cuda_compiled"], "archs", b["cuda_archs"], "nvshmem", b["nvshmem"])'))"
else
  note "build: FAILED (see build.log)"; status=1
fi

# DeepEP (tools/build_deepep.sh) builds alongside the tests when its source is carried; step
# deepep_build only builds it (into .peer/site, kept for a later call), deepep also runs it.
deepep_build=""
if { step deepep || step deepep_build; } && [ -d .peer/DeepEP ] && [ ! -f .peer/site/BUILT ]; then
  tools/build_deepep.sh .peer/site > "$OUT/deepep_build.log" 2>&1 & deepep_build=$!
fi

deepep_ll_build=""
if step lowlatency && [ -d .peer/DeepEP ] && [ ! -f .peer/site_ll/deep_ep/__init__.py ]; then
  DEEPEP_WITH_NVSHMEM=1 tools/build_deepep.sh .peer/site_ll > "$OUT/deepep_ll_build.log" 2>&1 & deepep_ll_build=$!
fi

# The other tree of a before/after comparison builds alongside, in place (its own deepcomm/_C).
ab_build=""
if step ab && [ -d "${AB_DIR:-}" ]; then
  (cd "$AB_DIR" && python3 setup.py build_ext --inplace) > "$OUT/ab_build.log" 2>&1 & ab_build=$!
fi

pytest_to() {  # log name, pytest args...
  local log=$1; shift
  if timeout 540 python3 -m pytest -q -rs -p no:cacheprovider "$@" > "$OUT/$log.log" 2>&1; then
    note "$log: $(tail -1 "$OUT/$log.log")"
  else
    note "$log: FAILED: $(tail -1 "$OUT/$log.log")"; status=1
  fi
}

# One GPU per rank, as on a cluster: the multigpu marks, NCCL for the reference path.
if step tests && [ "$num_gpus" -ge 2 ]; then
  pytest_to tests_gpu_per_rank $TESTS -m "gpu or multigpu"
fi

max_ranks=$(echo $NRANKS | tr ' ' '\n' | sort -n | tail -1)
mps_started=0
# Whether an MPS daemon answers in this pipe folder, asked the way the tests ask (a live daemon's pid
# file beside its socket): any MPS process (pgrep) may be one a killed launcher left elsewhere, or dying.
mps_answers() { python3 -c 'import sys; from deepcomm.launch import mps_running; sys.exit(not mps_running())'; }
start_mps() {
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/deepcomm-mps/pipe}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/deepcomm-mps/log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    mps_started=1; note "mps: started (ranks outnumber GPUs)"
    trap 'stop_mps' EXIT
  elif mps_answers; then
    # A daemon of an earlier call (one its time limit ended) still answers in this folder: use it, quit it after.
    mps_started=1; note "mps: a daemon left in $CUDA_MPS_PIPE_DIRECTORY answers; using it"
    trap 'stop_mps' EXIT
  else
    note "mps: could not start; ranks sharing a GPU will be time-sliced"
  fi
}
# After quitting, forget the daemon's folders: the launcher then starts (and checks) its own.
stop_mps() {
  [ "$mps_started" = 1 ] || return 0
  echo quit | timeout 30 nvidia-cuda-mps-control; mps_started=0
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; sleep 1
}

# Several ranks per GPU under MPS (everything on a one-GPU machine; on several GPUs
# the tests that need more ranks than GPUs, the NVSHMEM ones having run above).
if step shared && [ "$max_ranks" -gt "$num_gpus" ]; then
  mps_answers || start_mps
  if [ "$num_gpus" -ge 2 ]; then
    pytest_to tests_shared_gpus $TESTS -m gpu -k "not nvshmem"
  else
    pytest_to tests $TESTS
  fi
fi

# NVSHMEM with two PEs sharing one GPU (under MPS): informative, not a gate; last among the
# tests because a failing NVSHMEM client can leave MPS unusable for later ones.
if step nvshmem && [ "$num_gpus" -eq 1 ] && [ "$mps_started" -eq 1 ]; then
  if DEEPCOMM_NVSHMEM_SHARED_GPU=1 timeout 300 python3 -m pytest tests/test_internode.py -q -rs -p no:cacheprovider \
      -k one_gpu > "$OUT/nvshmem_internode_one_gpu.log" 2>&1; then
    note "nvshmem internode, 2 PEs on one GPU: $(tail -1 "$OUT/nvshmem_internode_one_gpu.log")"
  else
    note "nvshmem internode, 2 PEs on one GPU: FAILED (informative): $(tail -1 "$OUT/nvshmem_internode_one_gpu.log")"
  fi
fi
# Benchmarks: the launcher starts MPS itself when a run's ranks outnumber GPUs, so one GPU per rank runs without.
stop_mps

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
finish_deepep_build() {
  [ -n "$deepep_build" ] || return 0
  wait "$deepep_build" && touch .peer/site/BUILT
  note "deepep build: $(tail -1 "$OUT/deepep_build.log")"; deepep_build=""
}
# A compiler running beside the benchmarks skews them (the latency-bound rows most): DeepEP's build ends first.
step bench && finish_deepep_build
if step bench; then
  for n in $NRANKS; do
    bench "prefill_${n}ranks" "$n" $BENCH_ARGS
    if [ "${DECODE_LAUNCHES:-1}" -gt 1 ]; then
      # Decode-size calls move between launches by more than most changes do: launch them several
      # times and keep the spread (fastest / median / slowest per row) beside the figures.
      for launch in $(seq "$DECODE_LAUNCHES"); do bench "decode_${n}ranks_launch${launch}" "$n" $DECODE_ARGS; done
      launched=("$OUT"/decode_${n}ranks_launch*.json)
      if [ -f "${launched[0]}" ] && python3 tools/ab_table.py --spread "${launched[@]}" \
          --json "$OUT/decode_${n}ranks_spread.json" > "$OUT/decode_${n}ranks_spread.txt" 2>&1; then
        note "decode ${n} ranks: ${#launched[@]} of ${DECODE_LAUNCHES} launches ran, spread in decode_${n}ranks_spread.txt"
      else
        note "decode ${n} ranks: no spread (no launch wrote its rows)"
      fi
    else
      bench "decode_${n}ranks" "$n" $DECODE_ARGS
    fi
    # Internode: the ranks split into 2 nodes (and into 4 when each gets 2 or more), beside the flat
    # intranode path on the same ranks; over NVSHMEM too when every PE has its own GPU.
    # nvshmem: stores into the peers NVSHMEM maps (GPUs of this host); nvshmem_staged: puts only, a NIC's path.
    transports="ipc"; [ "$num_gpus" -ge "$n" ] && transports="ipc nvshmem nvshmem_staged"
    [ "${INTERNODE:-1}" = 1 ] || continue
    for nodes in 2 4; do
      [ $(( n % nodes )) -eq 0 ] && [ $(( n / nodes )) -ge $(( nodes == 2 ? 1 : 2 )) ] || continue
      for t in $transports; do
        bench "internode_${nodes}x$(( n / nodes ))_${t}" "$n" $INTER_ARGS --ranks-per-node $(( n / nodes )) \
          --transport "$t" --sms $(( n > 4 ? 16 : 24 ))
      done
    done
  done
fi

# Before/after: the two builds alternate (base, this, base, this, ...), so drift between runs on a
# shared GPU falls on both sides; tools/ab_table.py pairs the rows and takes medians.
step ab && finish_deepep_build
if step ab; then
  if [ -z "$ab_build" ]; then
    note "ab: not run (AB_DIR=${AB_DIR:-unset} is not a carried directory)"
  elif ! wait "$ab_build"; then
    note "ab: the base tree did not build (see ab_build.log)"; status=1
  else
    mkdir -p "$OUT/ab"
    for round in $(seq "${AB_ROUNDS:-2}"); do
      for side in base this; do
        tree=$PWD; [ "$side" = base ] && tree=$(cd "$AB_DIR" && pwd)
        log="$OUT/ab/${side}_${round}.log"
        # Run from inside the tree: `python -m` puts the working directory ahead of PYTHONPATH, so
        # from here the base side would import this tree's deepcomm. The log names the one imported.
        (cd "$tree" && export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" \
          && python3 -c 'import deepcomm; print("deepcomm from", deepcomm.__file__)' > "$log" 2>&1 \
          && timeout 600 python3 -m deepcomm.launch --standalone --nproc-per-node "${AB_NRANKS:-4}" -m deepcomm.bench \
            ${AB_ARGS:-} --json "$OUT/ab/${side}_${round}.json" >> "$log" 2>&1) \
          || note "ab: ${side} run ${round} FAILED (see ab/${side}_${round}.log)"
        [ "$round" = 1 ] && note "ab: ${side}: $(grep -m1 '^deepcomm from' "$log")"
      done
    done
    if [ "$(grep -m1 '^deepcomm from' "$OUT/ab/base_1.log")" = "$(grep -m1 '^deepcomm from' "$OUT/ab/this_1.log")" ]; then
      note "ab: FAILED: both sides imported the same deepcomm (see ab/*_1.log)"; status=1
    elif python3 tools/ab_table.py --base "$OUT"/ab/base_*.json --this "$OUT"/ab/this_*.json \
        --json "$OUT/ab_table.json" > "$OUT/ab_table.txt" 2>&1; then
      note "ab: ${AB_ROUNDS:-2} rounds, table in ab_table.txt (printed below)"
    else
      note "ab: FAILED to tabulate (see ab_table.txt)"; status=1
    fi
  fi
fi

# DeepEP v1's intranode kernels on the same workloads and routing, same machine, same call.
finish_deepep_build
if step deepep; then
  if [ -f .peer/site/BUILT ]; then
    for n in $NRANKS; do
      for preset in prefill decode; do
        # DeepEP's normal mode takes at most 128 experts a rank: with fewer ranks than 288/128,
        # decode runs with 128 a rank, and so does a deepcomm run beside it.
        extra=""
        if [ "$preset" = decode ] && [ $(( 288 / n )) -gt 128 ]; then
          extra="--experts $(( 128 * n ))"
          step bench && bench "decode_${n}ranks_e$(( 128 * n ))" "$n" $DECODE_ARGS $extra
        fi
        if PYTHONPATH="$PWD/.peer/site${PYTHONPATH:+:$PYTHONPATH}" timeout 600 python3 -m deepcomm.launch --standalone \
            --nproc-per-node "$n" tools/bench_deepep.py --preset "$preset" $extra \
            --json "$OUT/deepep_${preset}_${n}ranks.json" > "$OUT/deepep_${preset}_${n}ranks.log" 2>&1; then
          note "deepep ${preset} ${n} ranks: ok"
        else
          note "deepep ${preset} ${n} ranks: FAILED (see deepep_${preset}_${n}ranks.log)"
        fi
      done
    done
  else
    note "deepep: not run (source not carried, or its build failed: deepep_build.log)"
  fi
fi

# The low-latency mode on the decode workload: its rows (and the reference path's), where a call's time goes, and
# DeepEP v1's low-latency mode beside it when its source is carried and every rank has a GPU (its NVSHMEM build,
# into .peer/site_ll, started at the top).
if step lowlatency; then
  for n in ${LL_NRANKS:-$NRANKS}; do
    bench "ll_decode_${n}ranks" "$n" $LL_ARGS
    # One launch a call with its phases stamped and the host's functions named (the combine pulling, then summing
    # at the owners), then the send and the receive apart (a receive hook called at once).
    for mode in phases owner_phases hook; do
      case $mode in
        phases) flags="--phases --host-functions 25" ;;
        owner_phases) flags="--phases --owner-sums" ;;
        hook) flags="--hook" ;;
      esac
      timeout 120 python3 -m deepcomm.launch --standalone --nproc-per-node "$n" tools/profile_low_latency.py $flags \
        > "$OUT/profile_ll_${n}ranks_${mode}.log" 2>&1 || note "profile low-latency ${n} ranks $mode: FAILED (see its log)"
    done
    if [ -n "$deepep_ll_build" ] && [ "$num_gpus" -ge "$n" ]; then
      wait "$deepep_ll_build"; deepep_ll_build=""
      note "deepep (NVSHMEM) build: $(tail -1 "$OUT/deepep_ll_build.log")"
    fi
    if [ -f .peer/site_ll/deep_ep/__init__.py ] && [ "$num_gpus" -ge "$n" ]; then
      PYTHONPATH="$PWD/.peer/site_ll${PYTHONPATH:+:$PYTHONPATH}" timeout 300 python3 -m deepcomm.launch --standalone \
        --nproc-per-node "$n" tools/bench_deepep.py --mode low-latency --preset decode --iters 50 --warmup 5 \
        --json "$OUT/deepep_ll_decode_${n}ranks.json" > "$OUT/deepep_ll_decode_${n}ranks.log" 2>&1 \
        && note "deepep low-latency ${n} ranks: ok" || note "deepep low-latency ${n} ranks: FAILED (see its log)"
    fi
  done
fi

# The ranks placed by Ray instead of torchrun (python -m deepcomm.ray_launch), a GPU each, beside the same run
# launched by deepcomm.launch, alternating; Ray from RAY_BUNDLE (tools/ray_bundle.sh) where it is not installed.
if step ray; then
  rm -f "$OUT"/launch_prefill_*ranks_r*.json "$OUT"/ray_prefill_*ranks_r*.json "$OUT"/ray_vs_launch_*ranks.txt
  if ! python3 -c 'import ray' 2> /dev/null && [ -d "${RAY_BUNDLE:-}" ]; then
    tools/ray_bundle.sh install "$RAY_BUNDLE" > "$OUT/ray_install.log" 2>&1 || note "ray: install FAILED (see ray_install.log)"
  fi
  if ! python3 -c 'import ray' 2> /dev/null; then
    note "ray: FAILED: not run, ray is not installed (RAY_BUNDLE=${RAY_BUNDLE:-unset})"; status=1
  else
    pytest_to tests_ray tests/test_ray_launch.py
    RAY_ARGS=${RAY_ARGS:-"--preset prefill --backend intranode --dtypes bf16,fp8 --sms 24"}
    for n in $NRANKS; do
      if [ "$n" -gt "$num_gpus" ]; then note "ray: ${n} ranks not run (a GPU each; ${num_gpus} here)"; continue; fi
      for round in 1 2; do
        bench "launch_prefill_${n}ranks_r${round}" "$n" $RAY_ARGS
        # A Ray instance of the run's own (never a cluster RAY_ADDRESS may name).
        if env -u RAY_ADDRESS timeout -k 30 600 python3 -m deepcomm.ray_launch --nproc "$n" --gpus-per-rank 1 \
            --timeout 540 -m deepcomm.bench $RAY_ARGS --json "$OUT/ray_prefill_${n}ranks_r${round}.json" \
            > "$OUT/ray_prefill_${n}ranks_r${round}.log" 2>&1; then
          note "ray bench prefill ${n} ranks, round ${round}: ok"
        else
          note "ray bench prefill ${n} ranks, round ${round}: FAILED (see its log)"; status=1
        fi
      done
      python3 tools/ab_table.py --base "$OUT"/launch_prefill_${n}ranks_r*.json --this "$OUT"/ray_prefill_${n}ranks_r*.json \
        > "$OUT/ray_vs_launch_${n}ranks.txt" 2>&1 || note "ray: no table of ${n} ranks (see ray_vs_launch_${n}ranks.txt)"
    done
  fi
fi

# Two-micro-batch overlap: a DeepSeek-V3-width block on 2 ranks with half the SMs each, and
# the small model trained plain and overlapped on the same ranks.
if step overlap; then
  mkdir -p "$OUT/overlap_traces"
  if timeout ${OVERLAP_TIMEOUT:-420} python3 -m deepcomm.launch --standalone --nproc-per-node 2 --sm-share 50 tools/bench_overlap.py \
      ${OVERLAP_ARGS:-} --trace-dir "$OUT/overlap_traces" --json "$OUT/overlap_block.json" > "$OUT/overlap_block.log" 2>&1; then
    note "overlap block: ok"
    python3 tools/overlap_report.py "$OUT"/overlap_traces/*.json --same-step --exposed 12 --stage-times --launches 8 \
      --png "$OUT/overlap_timeline.png" \
      > "$OUT/overlap_report.log" 2>&1 || note "overlap report: FAILED (see overlap_report.log)"
  else
    note "overlap block: FAILED (see overlap_block.log)"; status=1
  fi
  if [ "${TRAIN_STEPS:-200}" = 0 ]; then
    note "train_moe: skipped (TRAIN_STEPS=0)"
  elif timeout 600 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/train_moe.py \
      --steps ${TRAIN_STEPS:-200} --json "$OUT/train_moe_gpu.json" --png "$OUT/train_moe_gpu.png" > "$OUT/train_moe.log" 2>&1; then
    note "train_moe: $(grep '^train_moe' "$OUT/train_moe.log")"
  else
    note "train_moe: FAILED (see train_moe.log)"; status=1
  fi
fi

# Decode in two micro-batches through the low-latency mode (bench_overlap --decode), the decode experts padded and
# packed (MoEConfig.decode_experts), with a report of each traced step; DECODE_OVERLAP_ARGS adds arguments.
if step decode_overlap; then
  for experts in padded packed; do
    traces="$OUT/overlap_decode_traces_$experts"
    mkdir -p "$traces"
    if timeout ${OVERLAP_TIMEOUT:-420} python3 -m deepcomm.launch --standalone --nproc-per-node 2 --sm-share 50 \
        tools/bench_overlap.py --decode --experts 16 --layers 2 --decode-experts "$experts" ${DECODE_OVERLAP_ARGS:-} \
        --trace-dir "$traces" --json "$OUT/overlap_decode_$experts.json" > "$OUT/overlap_decode_$experts.log" 2>&1; then
      note "decode overlap, $experts experts: ok"
      python3 tools/overlap_report.py "$traces"/overlap_rank*.json --same-step --exposed 6 --stage-times \
        > "$OUT/overlap_decode_${experts}_report.log" 2>&1 || note "decode overlap report, $experts: FAILED (see its log)"
    else
      note "decode overlap, $experts experts: FAILED (see overlap_decode_$experts.log)"; status=1
    fi
  done
fi

# Kernel times against wall clock for a decode-size call (torch profiler), a trace, and the
# decode-size dispatch's host time split at the notify wait.
if step profile; then
  if timeout 300 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
      --tokens 128 --trace "$OUT/dispatch_trace.json" > "$OUT/profile_decode.log" 2>&1 && \
     timeout 300 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
      --tokens 4096 --iters 10 > "$OUT/profile_prefill.log" 2>&1 && \
     timeout 300 python3 -m deepcomm.launch --standalone --nproc-per-node 2 tools/profile_dispatch.py \
      --tokens 128 --host-split --host-functions 30 > "$OUT/profile_host_split.log" 2>&1; then
    note "profile: ok (profile_*.log, dispatch_trace.json)"
  else
    note "profile: FAILED (see profile_*.log)"
  fi
fi

echo "== deepcomm gpu_check =="
for line in "${summary[@]}"; do echo "  $line"; done
for log in "$OUT"/prefill_*.log "$OUT"/decode_*.log "$OUT"/ll_decode_*.log "$OUT"/deepep_ll_decode_*.log "$OUT"/internode_*.log "$OUT"/deepep_*ranks.log \
           "$OUT"/overlap_block.log "$OUT"/overlap_report.log "$OUT"/overlap_decode_*.log "$OUT"/profile_*.log; do
  [ -f "$log" ] && { echo; grep -A40 -E '^(deepcomm bench|deepep bench|deepcomm block bench|layer|backend=|low-latency call)' "$log" | grep -v '^rows written'; }
done
[ -f "$OUT/ab_table.txt" ] && { echo; echo "before/after (base: $AB_DIR):"; cat "$OUT/ab_table.txt"; }
for table in "$OUT"/ray_vs_launch_*ranks.txt; do
  [ -f "$table" ] && { echo; echo "launched by deepcomm.launch (base) and by Ray (this), $(basename "$table"):"; cat "$table"; }
done
for spread in "$OUT"/decode_*ranks_spread.txt; do
  [ -f "$spread" ] && { echo; echo "spread between launches ($(basename "$spread")):"; cat "$spread"; }
done
exit $status
