#pragma once
// Quantization algorithms written against the backend interface: GPTQ (docs/design.md section 4), RTN, the
// relative output error, and conversion between the unpacked result and the packed GPTQ layout.

#include <cstdint>
#include <string>
#include <vector>

#include "io/shard.hpp"
#include "kernels/backend.hpp"

namespace pipequant {

enum class Method { kGptq, kRtn };

struct QuantConfig {
  Method method = Method::kGptq;
  int bits = 4;              // 2, 3, 4 or 8
  int64_t group_size = 128;  // > 0, or -1 for one group per row
  bool sym = false;
  bool act_order = false;
  bool static_groups = false;
  double damp = 0.01;        // relative to mean(diag(H))
  int damp_retries = 4;      // fallback (1): damp x10 per retry, at most this many times
  int64_t block_size = 128;  // GPTQ lazy-update block
};

// Throws UserError when a field is out of range (bits, group_size, damp, ...).
void validate(const QuantConfig& config);

// The fallback a layer took (docs/design.md section 4), in the order they are tried: (1) more damping, (2) round to
// nearest; (3) the solve ran on the host backend because the device budget could not hold it.
enum class Fallback { kNone, kDamp, kRtn, kCpu };
// "none", "damp", "rtn", "cpu": the words written to the HDF5 output, the metrics and the report.
const char* name(Fallback fallback);
// The inverse of name(); throws UserError naming `where` for any other word.
Fallback fallback_from_name(const std::string& word, const std::string& where);

// The result of quantizing one linear W [rows = out_features, cols = in_features], in natural column order.
struct QuantizedLinear {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t groups = 0;
  int bits = 4;
  std::vector<uint8_t> q;      // codes [rows, cols]
  std::vector<float> scales;   // [groups, rows], fp16-representable
  std::vector<float> zeros;    // [groups, rows], integers
  std::vector<int32_t> g_idx;  // [cols]: group of each input channel
  double damp_used = 0.0;      // relative damping finally used
  Fallback fallback = Fallback::kNone;
  double relative_error = 0.0;   // ||(W - Q) X||^2 / ||W X||^2, from the undamped Hessian
  double solve_seconds = 0.0;    // time inside the quantizer proper (factorization + column loop)
  std::vector<std::string> log;  // one line per fallback step taken
  // W~ [rows, cols] = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n])
  std::vector<float> dequantize() const;
};

// h: the Hessian [cols, cols] = (2/n) sum x x^T over calibration tokens (undamped; not modified).
// Handles dead columns, act-order, static groups, ragged last group, and the damping fallback chain
// (damp x10 retries, then RTN), each step logged in `log`. `name` labels log lines.
QuantizedLinear gptq_quantize(kernels::Backend& backend, const float* w, int64_t rows, int64_t cols, const float* h,
                              const QuantConfig& config, const std::string& name = "");
// Round to nearest with the same grid and groups; h (may be null) is only used for relative_error.
QuantizedLinear rtn_quantize(kernels::Backend& backend, const float* w, int64_t rows, int64_t cols, const float* h,
                             const QuantConfig& config);
// ||(W - Wq) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), D = W - Wq; 0 when the denominator is 0.
double relative_output_error(kernels::Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                             const float* h);

// The packed layout of io::PackedLinear (docs/design.md section 5).
io::PackedLinear pack(const QuantizedLinear& ql, const std::string& module, const QuantConfig& config);
QuantizedLinear unpack(const io::PackedLinear& packed);
// Bit-stream packing of b-bit codes into int32 words, lowest bits first; codes may straddle words.
// Along K: codes [k][n] -> words [ceil(K*bits/32)][n]. Along N: codes [g][n] -> words [g][ceil(N*bits/32)].
std::vector<int32_t> pack_columns(const uint8_t* codes_kn, int64_t k, int64_t n, int bits);
std::vector<uint8_t> unpack_columns(const int32_t* words, int64_t k, int64_t n, int bits);
std::vector<int32_t> pack_rows(const uint8_t* codes_gn, int64_t g, int64_t n, int bits);
std::vector<uint8_t> unpack_rows(const int32_t* words, int64_t g, int64_t n, int bits);

}  // namespace pipequant
