#pragma once
// Device helpers shared by the CUDA backend's kernels: launch geometry, deterministic warp and block
// reductions (fixed butterfly order, so every lane ends with the same bits run to run), and the GPTQ
// reference quantization grid used by quant_params, quantize and gptq_block alike.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pipequant::kernels {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

inline constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `threads` covering `n` elements, capped for the x dimension; kernels using this stride over n.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (int64_t{1} << 30) ? (int64_t{1} << 30) : blocks));
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ inline float warp_min(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fminf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Block-wide reductions for blockDim.x a multiple of 32 (at most 1024). `scratch` is shared memory of 32
// elements; every thread gets the result. Contains __syncthreads: call from all threads of the block.
template <typename T, typename Op>
__device__ inline T block_reduce(T v, T* scratch, Op op) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : op.identity();
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

template <typename T>
struct SumOp {
  __device__ T operator()(T a, T b) const { return a + b; }
  __device__ T identity() const { return T(0); }
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ float identity() const { return -INFINITY; }
};

// Bounds of a stored scale (see CpuBackend::quant_params): a scale that rounds to 0 in fp16 becomes the
// smallest fp16 normal so that w / scale stays finite; one above the largest finite fp16 is capped.
inline constexpr float kMinScale = 6.103515625e-05f;  // 2^-14
inline constexpr float kMaxScale = 65504.0f;

// std::clamp's semantics (a NaN passes through), so that CUDA and CPU agree on every input.
__device__ inline float clamp_like_std(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }

// The scale and zero of the GPTQ reference quantizer for values spanning [lo, hi], exactly as the CPU backend
// computes them (params_from_range in kernels/cpu/quant_grid.hpp, the specification): the range is widened to
// include 0, made symmetric for sym, [-1, 1] when empty; scale = range / maxq rounded to fp16 and kept in
// [kMinScale, kMaxScale]; zero = (maxq + 1) / 2 for sym, else round_half_even(-xmin / scale) clamped to
// [0, maxq].
__device__ inline void grid_params(float lo, float hi, int maxq, bool sym, float* scale, float* zero) {
  float xmin = fminf(lo, 0.0f);
  float xmax = fmaxf(hi, 0.0f);
  if (sym) {
    xmax = fmaxf(fabsf(xmin), xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  const float fmaxq = static_cast<float>(maxq);
  float s = __half2float(__float2half_rn((xmax - xmin) / fmaxq));
  if (!(s > 0.0f)) s = kMinScale;  // also catches NaN from non-finite weights
  s = fminf(s, kMaxScale);
  const float z = sym ? static_cast<float>((maxq + 1) / 2) : rintf(-xmin / s);
  *scale = s;
  *zero = clamp_like_std(z, 0.0f, fmaxq);
}

// q = clamp(round_half_even(w / scale) + zero, 0, maxq), returned as a float holding an integer.
__device__ inline float grid_quantize(float w, float scale, float zero, float maxq) {
  return clamp_like_std(rintf(w / scale) + zero, 0.0f, maxq);
}

}  // namespace pipequant::kernels
