#pragma once
// AWQ, activation-aware weight quantization (docs/design.md section 4; the AWQ paper and llm-awq's auto_scale and
// auto_clip). For a linear group with inputs x [tokens, K] and Hessian H = (2/n) x^T x:
//   1. magnitudes m[k] = RMS of x[:, k] over the calibration tokens (channel_magnitudes);
//   2. scale search: for alpha in 0, 1/20, ..., 1, s = m^alpha (at least 1e-4) divided by sqrt(max(s) min(s)); the
//      group's linears are rounded as Q(W diag(s)) diag(s)^-1 and the alpha whose summed output error
//      tr(D H D^T), D = W - Q(W diag(s)) diag(s)^-1, is least wins (alpha 0 is plain round to nearest, so the choice
//      never loses to RTN on the search's measure);
//   3. the scales are folded into what feeds the group: x / s comes from the preceding RMSNorm (q/k/v, gate/up) or
//      from the preceding linear's rows (v -> o where v's outputs are o's inputs, up -> down): the caller does it;
//   4. clip search (all linears but q and k, whose errors the attention scores amplify unevenly): per row and group,
//      the weights of W diag(s) are clamped to ratio x their largest magnitude for ratios 1, 0.95, ..., 0.55, and
//      the ratio with the least error of that group's partial output, d H_gg d^T, is kept;
//   5. round to nearest with the chosen grid: the codes are those of W diag(s).
// Everything here is a function of H, the magnitudes and W alone (no sums over ranks), so every rank of a stage
// group that runs it gets the same bits.

#include <cstdint>
#include <vector>

#include "kernels/backend.hpp"
#include "src/quant.hpp"

namespace pipequant {

inline constexpr int kAwqScaleGrid = 20;   // alpha = i / 20, i = 0..20
inline constexpr int kAwqClipSteps = 10;   // ratio = 1 - i / 20, i = 0..9
inline constexpr float kAwqMinScale = 1e-4f;
// The scale search measures at most this many weights of a group (256 MB in fp32): all rows of the linears while
// they fit, else evenly spaced rows (every linear alike). Each grid point costs 4 rows K^2 flops on them: for a
// 405B down_proj (K = 53248) 1260 of its 16384 rows, 21 x 14 TFLOP.
inline constexpr int64_t kAwqSearchFloats = int64_t{1} << 26;

// The magnitude of each input channel: its RMS over the calibration tokens, sqrt(H[k, k] / 2) from
// H [cols, cols] = (2/n) x^T x. (llm-awq takes mean |x|; the RMS comes from H, whose bits are the same for any
// micro-batch and layout, while the activations themselves may differ in their last bit between GEMM shapes.)
std::vector<float> channel_magnitudes(const std::vector<float>& h, int64_t cols);

// s for exponent alpha: m^alpha, at least kAwqMinScale, normalized to sqrt(max(s) min(s)) = 1 (llm-awq).
std::vector<float> awq_scales(const std::vector<float>& magnitudes, double alpha);

// A linear of the group being searched: its rows [0, rows) in fp32 on request.
struct AwqLinear {
  FillRows rows_f32;
  int64_t rows = 0;
};

struct AwqScaleChoice {
  int grid = 0;  // alpha = grid / kAwqScaleGrid
  double alpha = 0.0;
  std::vector<float> scales;  // [K]
  double error2 = 0.0;        // the group's summed tr(D H D^T) at alpha
  double rtn_error2 = 0.0;    // ... at alpha 0 (round to nearest)
};
// The grid search of step 2 over the group's linears (the rows kAwqSearchFloats allows). h_backend: H [cols, cols]
// in backend memory. error2 and rtn_error2 are over those rows, each linear's scaled by its rows / measured rows.
AwqScaleChoice search_awq_scales(kernels::Backend& backend, const std::vector<AwqLinear>& linears, int64_t cols,
                                 const std::vector<float>& magnitudes, const float* h_backend,
                                 const QuantConfig& config, int64_t max_floats = kAwqSearchFloats);

struct AwqQuantized {
  QuantizedLinear q;       // of W diag(s): rows x cols, its codes, scales and zeros
  double error2 = 0.0;     // tr(D H D^T), D = W - Q diag(s)^-1
  double clip_sum = 0.0;   // the chosen ratios summed over (row, group): their mean says how much was clipped
  int64_t clip_count = 0;  // (row, group) pairs
};
// Steps 4 and 5 for w [rows, cols] (host, unscaled) and scales s [cols]; H [cols, cols] on the host (h_host) and in
// backend memory (h_backend; the same pointer on a host backend).
AwqQuantized awq_quantize(kernels::Backend& backend, const float* w, int64_t rows, int64_t cols,
                          const std::vector<float>& scales, const float* h_host, const float* h_backend, bool clip,
                          const QuantConfig& config);

// Divides row n of a quantized linear by s[n] (its scale factors, re-rounded to fp16): what folding an AWQ scale
// into the preceding linear does to it. Codes and zeros stay.
void divide_rows(QuantizedLinear& q, const std::vector<float>& s);

}  // namespace pipequant
