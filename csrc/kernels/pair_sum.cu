// One block per row (grid-stride), each thread 8 columns at a time: for k in
// ascending order, acc = acc + weight * value, every product and sum rounded
// on its own (no fused multiply-add), a missing pair adding +0.0 — the same
// operations, in the same order, as deepcomm/pair_sum.py's torch path, so the
// two agree bit for bit. That path spends five passes over float32 pairs
// (convert, scale, pad, gather per k, add per k); this reads each bf16 pair
// once and writes each row once.
#include <cuda_bf16.h>

#include "kernels/common/ptx.cuh"
#include "kernels/common/rows.cuh"
#include "kernels/pair_sum.h"
#include "runtime/error.h"

namespace deepcomm {

namespace {

constexpr int kPairSumThreads = 256;
constexpr int kMaxBlocks = 4096;

__global__ void __launch_bounds__(kPairSumThreads) pair_sum_kernel(PairSumArgs args) {
  const int64_t units = args.hidden / 8;
  const int4* values = static_cast<const int4*>(args.values);
  int4* out = static_cast<int4*>(args.out);
  for (int64_t row = blockIdx.x; row < args.num_rows; row += gridDim.x) {
    const int64_t* pairs = args.pair_of + row * args.num_topk;
    const float* weights = args.weights + row * args.num_topk;
    for (int64_t unit = threadIdx.x; unit < units; unit += blockDim.x) {
      float acc[8];
      for (int k = 0; k < args.num_topk; ++k) {
        const int64_t pair = pairs[k];
        float term[8];
        if (pair >= 0) {
          rows::unpack_bf16x8(ptx::load_nc(values + pair * units + unit), term);
          const float weight = weights[k];
#pragma unroll
          for (int i = 0; i < 8; ++i) term[i] = __fmul_rn(term[i], weight);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) term[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = k == 0 ? term[i] : __fadd_rn(acc[i], term[i]);
      }
      out[row * units + unit] = rows::pack_bf16x8(acc);
    }
  }
}

}  // namespace

void launch_pair_sum(const PairSumArgs& args, cudaStream_t stream) {
  DC_CHECK_ARG(args.hidden > 0 && args.hidden % 8 == 0, "hidden: must be a positive multiple of 8");
  DC_CHECK_ARG(args.num_topk > 0, "num_topk: must be > 0");
  DC_CHECK_ARG(args.num_rows >= 0, "num_rows: must be >= 0");
  if (args.num_rows == 0) return;
  const int blocks = static_cast<int>(args.num_rows < kMaxBlocks ? args.num_rows : kMaxBlocks);
  pair_sum_kernel<<<blocks, kPairSumThreads, 0, stream>>>(args);
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm
