// Warp-level row movers shared by the intranode and internode kernels: one
// warp reads a token's row once and writes it to up to kMaxTargets places
// (null target = skip; arrays stay in registers because every loop over
// targets is unrolled), copying bf16/fp8 rows or quantising bf16 to fp8 on
// the way with deepcomm/fp8.py's exact formula.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/common/ptx.cuh"

namespace deepcomm::rows {

constexpr int kCopyUnroll = 8;  // 16-byte loads in flight per lane (copy_row: a whole fp8 row of 7168 in two rounds)
constexpr float kFp8Max = 448.0f;

// Source rows are either this rank's own inputs (read-only for the whole
// kernel: the non-coherent path is safe) or rows a peer wrote during the
// kernel (must bypass L1).
template <bool kPeerWritten>
__device__ __forceinline__ int4 load_unit(const int4* address) {
  if constexpr (kPeerWritten) return ptx::load_cg(address);
  else return ptx::load_nc(address);
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Eight bf16 in an int4 → eight floats (exact).
__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&out)[8]) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = bf16_bits_to_float(words[i] & 0xffffu);
    out[2 * i + 1] = bf16_bits_to_float(words[i] >> 16);
  }
}

// Eight floats → eight bf16 (round to nearest even) in an int4.
__device__ __forceinline__ int4 pack_bf16x8(const float (&values)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(values[2 * i], values[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  return make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                   static_cast<int>(words[3]));
}

// Rounds eight floats to bf16 and back (a partial sum crossing a node boundary).
__device__ __forceinline__ void round_to_bf16x8(float (&values)[8]) {
  float rounded[8];
  unpack_bf16x8(pack_bf16x8(values), rounded);
#pragma unroll
  for (int i = 0; i < 8; ++i) values[i] = rounded[i];
}

// deepcomm/fp8.py: scale = max(amax, 1e-4) * float32(1/448), optionally rounded
// up to a power of two by its exponent bits.
template <bool kPow2>
__device__ __forceinline__ float fp8_scale(float amax) {
  const float scale = fmaxf(amax, static_cast<float>(1e-4)) * static_cast<float>(1.0 / 448.0);
  if (!kPow2) return scale;
  uint32_t bits = __float_as_uint(scale);
  if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;
  return __uint_as_float(bits);
}

__device__ __forceinline__ uint2 quantize_fp8x8(const float (&values)[8], float scale) {
  uint8_t bytes[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float scaled = fminf(fmaxf(__fdiv_rn(values[i], scale), -kFp8Max), kFp8Max);
    bytes[i] = __nv_cvt_float_to_fp8(scaled, __NV_SATFINITE, __NV_E4M3);
  }
  uint2 packed;
  packed.x = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (static_cast<uint32_t>(bytes[3]) << 24);
  packed.y = bytes[4] | (bytes[5] << 8) | (bytes[6] << 16) | (static_cast<uint32_t>(bytes[7]) << 24);
  return packed;
}

// Every lane's copy of the pointers that lanes [0, kLanes) hold: the register path needs every
// target in every lane, while the bulk path (bulk.cuh) keeps one per lane.
template <int kLanes, typename T>
__device__ __forceinline__ void gather_from_lanes(T* lane_value, T* (&all)[kLanes]) {
#pragma unroll
  for (int t = 0; t < kLanes; ++t)
    all[t] = reinterpret_cast<T*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_value), t));
}

// Copies one row of num_units 16-byte units to every non-null target.
template <int kMaxTargets, bool kPeerWritten = false, int kUnroll = kCopyUnroll>
__device__ __forceinline__ void copy_row(const int4* source, int num_units, uint8_t* const (&targets)[kMaxTargets],
                                         int lane) {
  for (int base = lane; base < num_units; base += 32 * kUnroll) {
    int4 values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int unit = base + u * 32;
      if (unit < num_units) values[u] = load_unit<kPeerWritten>(source + unit);
    }
#pragma unroll
    for (int t = 0; t < kMaxTargets; ++t) {
      if (targets[t] == nullptr) continue;
      int4* row = reinterpret_cast<int4*>(targets[t]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int unit = base + u * 32;
        if (unit < num_units) row[unit] = values[u];
      }
    }
  }
}

constexpr int kScalesPerLane = 4;  // held in registers: a row's first 128 scales (hidden <= 16384)

// A token's fp8 scales in flight: loaded before its row is copied and stored
// after, so their load latency hides under the row's instead of adding to it
// (a store that waits for its load would hold back every load behind it).
// Scales past the first 32 * kScalesPerLane are copied directly by store().
template <bool kPeerWritten = false>
struct PendingScales {
  const float* source;
  int count;
  float values[kScalesPerLane];

  __device__ __forceinline__ static float load_one(const float* address) {
    if constexpr (kPeerWritten) return *reinterpret_cast<const volatile float*>(address);
    else return __ldg(address);
  }

  __device__ __forceinline__ void load(const float* from, int num_scales, int lane) {
    source = from;
    count = num_scales;
#pragma unroll
    for (int i = 0; i < kScalesPerLane; ++i)
      if (lane + 32 * i < count) values[i] = load_one(source + lane + 32 * i);
  }

  template <int kMaxTargets>
  __device__ __forceinline__ void store(float* const (&targets)[kMaxTargets], int lane) const {
#pragma unroll
    for (int t = 0; t < kMaxTargets; ++t)
      if (targets[t] != nullptr) store_one(targets[t], lane);
  }

  // Stores to the target that each of lanes [0, kLanes) holds (nullptr: none).
  template <int kLanes>
  __device__ __forceinline__ void store_to_lane_targets(float* lane_target, int lane) const {
#pragma unroll
    for (int t = 0; t < kLanes; ++t) {
      float* target = reinterpret_cast<float*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_target), t));
      if (target != nullptr) store_one(target, lane);
    }
  }

 private:
  __device__ __forceinline__ void store_one(float* target, int lane) const {
#pragma unroll
    for (int i = 0; i < kScalesPerLane; ++i)
      if (lane + 32 * i < count) target[lane + 32 * i] = values[i];
    for (int i = lane + 32 * kScalesPerLane; i < count; i += 32) target[i] = load_one(source + i);
  }
};

// Quantises one bf16 row (this rank's input) to fp8 + per-128-channel scales
// and writes both to every non-null target. A pass covers 256 channels: lanes
// 0-15 one 128-channel block, lanes 16-31 the next; kUnroll passes' loads are
// in flight before the first is quantised (one at a time, a row would take a
// load latency per 256 channels). Fewer with many targets: their pointers
// live in registers too (16 targets and 4 loads spill in the internode sender).
template <bool kPow2, int kMaxTargets, int kUnroll = (kMaxTargets > 8 ? 2 : kCopyUnroll)>
__device__ __forceinline__ void quantize_row(const int4* source, int hidden, uint8_t* const (&x_targets)[kMaxTargets],
                                             float* const (&scale_targets)[kMaxTargets], int lane) {
  for (int first = 0; first < hidden; first += 256 * kUnroll) {  // the same trip count in every lane
    int4 loaded[kUnroll];
#pragma unroll
    for (int pass = 0; pass < kUnroll; ++pass) {
      const int channel = first + pass * 256 + lane * 8;
      if (channel < hidden) loaded[pass] = ptx::load_nc(source + channel / 8);
    }
#pragma unroll
    for (int pass = 0; pass < kUnroll; ++pass) {
      if (first + pass * 256 >= hidden) break;  // uniform: the shuffles below need the whole warp
      const int channel = first + pass * 256 + lane * 8;
      const bool active = channel < hidden;
      float values[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (active) unpack_bf16x8(loaded[pass], values);
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(values[i]));
#pragma unroll
      for (int offset = 8; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      if (!active) continue;
      const float scale = fp8_scale<kPow2>(amax);
      const uint2 packed = quantize_fp8x8(values, scale);
#pragma unroll
      for (int t = 0; t < kMaxTargets; ++t) {
        if (x_targets[t] == nullptr) continue;
        *reinterpret_cast<uint2*>(x_targets[t] + channel) = packed;
        if ((lane & 15) == 0) scale_targets[t][channel / 128] = scale;
      }
    }
  }
}

}  // namespace deepcomm::rows
