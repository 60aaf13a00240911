#pragma once
// The quantization grid of the GPTQ reference quantizer (IST-DASLab gptq quant.py: find_params with weight=True,
// no mse, and quantize), in fp32 as PyTorch runs it on fp32 weights. One definition for the CPU backend's
// quant_params, quantize and gptq_block and for the readable GPTQ (gptq_reference.hpp); the CUDA versions
// (kernels/cuda/cuda_common.cuh) are tested against them.

#include <algorithm>
#include <cmath>

#include "base/numeric.hpp"
#include "kernels/backend.hpp"

namespace pipequant::kernels {

// A scale that rounds to 0 in fp16 becomes the smallest fp16 normal, so that w / scale stays finite.
inline constexpr float kMinScale = 6.103515625e-05f;  // 2^-14
// The largest finite fp16: a scale above it would be stored as infinity.
inline constexpr float kMaxScale = 65504.0f;

struct ScaleZero {
  float scale;
  float zero;
};

// Scale and zero for a row (or group) whose values span [lo, hi]: the range is widened to include 0, made
// symmetric for sym, [-1, 1] when empty; the scale is rounded to fp16 because the output stores it as fp16.
inline ScaleZero params_from_range(float lo, float hi, QuantGrid grid) {
  float xmin = std::min(lo, 0.0f);
  float xmax = std::max(hi, 0.0f);
  if (grid.sym) {
    xmax = std::max(std::fabs(xmin), xmax);
    if (xmin < 0.0f) xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  const float maxq = static_cast<float>(grid.maxq());
  float scale = round_to_fp16((xmax - xmin) / maxq);
  if (!(scale > 0.0f)) scale = kMinScale;  // also catches NaN from non-finite weights
  scale = std::min(scale, kMaxScale);
  float zero = grid.sym ? static_cast<float>((grid.maxq() + 1) / 2) : std::nearbyint(-xmin / scale);
  zero = std::clamp(zero, 0.0f, maxq);
  return {scale, zero};
}

// q = clamp(round(w / scale) + zero, 0, maxq), round half to even (std::nearbyint in the default mode).
inline float quantize_code(float w, float scale, float zero, float maxq) {
  return std::clamp(std::nearbyint(w / scale) + zero, 0.0f, maxq);
}

}  // namespace pipequant::kernels
