#pragma once
// Quantization algorithms written against the backend interface: GPTQ (docs/design.md section 4), RTN, the
// relative output error, and conversion between the unpacked result and the packed GPTQ layout.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/bitstream.hpp"
#include "io/shard.hpp"
#include "kernels/backend.hpp"

namespace pipequant {

enum class Method { kGptq, kRtn, kAwq };

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
  double error2 = 0.0;           // tr(D H D^T) over its rows, D = W - W~, H undamped: the GPTQ solve's own
                                 // accounting (gptq_solve); 0 where a solve did not account (RTN)
  double solve_seconds = 0.0;    // time inside the quantizer proper: the column loop, plus the factorization when
                                 // gptq_quantize made it for this linear alone (a shared GptqFactor has its own)
  std::vector<std::string> log;  // one line per fallback step taken
  // W~ [rows, cols] = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n])
  std::vector<float> dequantize() const;
  // Every field as bytes and back (one rank's result sent to the others of its stage group).
  std::vector<uint8_t> to_bytes() const;
  static QuantizedLinear from_bytes(const std::vector<uint8_t>& bytes);
};

// Where each input column goes in a GPTQ solve; a function of diag(H) and the QuantConfig.
struct GptqColumnPlan {
  std::vector<float> diag;        // [cols] diag(H) with the dead entries set to 1
  std::vector<char> dead;         // [cols]: 1 for an input never active in the calibration data (H[i, i] = 0)
  std::vector<int64_t> perm;      // [cols] processing position -> input column (act-order: decreasing diag(H))
  std::vector<int32_t> param_of;  // [cols] processing position -> scale/zero table entry
  bool tables_up_front = false;   // per-row or static-group tables, computed from W before the column loop
};

// Everything GPTQ derives from one Hessian alone, computed once for the linears that share it (a linear group:
// {q,k,v}, {o}, {gate,up}, {down}): the column plan, the damped factor with its retries, the fallback, and the
// backend it lives on. What depends on W (the tables of per-row and static groups, W's dead columns zeroed) is
// done per linear by gptq_solve. Move-only: R is backend memory, freed with the factor.
struct GptqFactor {
  QuantConfig config;                   // the settings it was made with; the solves use them
  int64_t cols = 0;                     // K: H is [cols, cols]
  int64_t max_rows = 0;                 // the most rows a solve with it may have (its placement counted on them)
  kernels::Backend* backend = nullptr;  // where R lives and the solves run: the given backend or its host fallback
  GptqColumnPlan plan;                  // empty when H is not finite
  kernels::Buffer<float> r;             // R [cols, cols] upper triangular, H_damped = R R^T in processing order
                                        // (Backend::reverse_cholesky), on a device backend; empty when fallback is
                                        // kRtn or R is in r_host
  std::vector<float> r_host;            // R on a host backend: made in the Hessian's own memory
  float damp_add = 0.0f;                // what the damping added to diag(H): damp_used * mean(diag(H))
  std::vector<float> r_diag;            // [cols] R[j, j]
  double damp_used = 0.0;               // the relative damping that worked (kRtn: the last one tried)
  Fallback fallback = Fallback::kNone;  // kDamp, kRtn; else kCpu when placed on the host fallback; else kNone
  std::vector<std::string> log;         // the fallback steps taken, each without a linear's name ("Cholesky ...");
                                        // every solve logs them as "<its name>: <line>"
  double seconds = 0.0;                 // damping, upload and factorization, all tries

  const float* r_data() const { return r_host.empty() ? r.data() : r_host.data(); }
  bool has_r() const { return r_data() != nullptr; }
};

// The most backend memory a GPTQ solve of [rows, cols] takes on `backend` (R, the working matrices and tables,
// the factorization's workspace, the column loop's scratch, and the error check after it): factor_hessian places
// the factor on the backend only when this fits its free budget.
size_t gptq_solve_bytes(kernels::Backend& backend, int64_t rows, int64_t cols, const QuantConfig& config);

// The factor of h [cols, cols] (undamped), taken over: for solves of at most max_rows rows each, run one after
// another while the factor is held. It is placed on `backend` when R and the largest solve fit the backend's free
// budget, on its host fallback otherwise (fallback 3). On a host backend R is made in h's own memory (no copy: H of
// a 405B down_proj is 11.3 GB); a retry rebuilds the damped H from the triangle the factorization leaves. A
// non-finite H or a Cholesky that fails after config.damp_retries retries gives fallback kRtn and no R. Throws
// UserError for a bad config or shape.
GptqFactor factor_hessian(kernels::Backend& backend, std::vector<float> h, int64_t cols, int64_t max_rows,
                          const QuantConfig& config);
// GPTQ of W [rows, factor.cols] with a factor: the codes bit-identical to gptq_quantize on the same inputs, and
// error2 from the solve's own accounting (the loss sum e^2 of the column loop is tr(D H_damped D^T) exactly; the
// damping and the dead inputs' unit diagonal are taken off again). relative_error is left to the caller, who knows
// tr(W H W^T) (baseline_terms). With fallback kRtn the result is RTN's, error2 0. `log` holds the factor's lines,
// each labelled `name`.
QuantizedLinear gptq_solve(const GptqFactor& factor, const float* w, int64_t rows, const std::string& name = "");

// The error computations work on row chunks whose stacked [W; D] (and its product) holds at most this many floats.
inline constexpr int64_t kErrorChunkFloats = int64_t{1} << 25;

// The parts of a linear's relative errors that do not depend on the solve: weight2 = tr(W H W^T) and
// rtn_error2 = tr(D H D^T) for round to nearest's D. Additive over rows and over calibration tokens.
struct BaselineTerms {
  double weight2 = 0.0;
  double rtn_error2 = 0.0;
  BaselineTerms& operator+=(const BaselineTerms& o) {
    weight2 += o.weight2;
    rtn_error2 += o.rtn_error2;
    return *this;
  }
};
// tr(D H D^T), D = W - Wq, for w and wq [rows, cols] on the host and H [cols, cols] in backend memory: 2 rows cols^2
// flops, each row's sum in fp64, added in row order.
double output_error2(kernels::Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                     const float* h_backend);
// Fills rows [r0, r1) of a weight matrix in fp32 into dst [r1 - r0, cols]: a linear expanded a chunk at a time.
using FillRows = std::function<void(int64_t r0, int64_t r1, float* dst)>;
// From H [cols, cols] (backend memory: upload it once for all the calls on a device) for `rows` rows of W given by
// w_rows: 4 rows cols^2 flops.
BaselineTerms baseline_terms(kernels::Backend& backend, const FillRows& w_rows, int64_t rows, int64_t cols,
                             const float* h, const QuantConfig& config);
// From calibration inputs x [m, cols] (backend memory) of an H that holds scale * x^T x: 4 m rows cols flops, the
// cheaper way while the tokens are fewer than the inputs. Each chunk of rows is quantized once for all m tokens.
BaselineTerms baseline_terms_from_inputs(kernels::Backend& backend, const float* x, int64_t m, const FillRows& w_rows,
                                         int64_t rows, int64_t cols, double scale, const QuantConfig& config);

// h: the Hessian [cols, cols] = (2/n) sum x x^T over calibration tokens (undamped; not modified).
// Handles dead columns, act-order, static groups, ragged last group, and the damping fallback chain
// (damp x10 retries, then RTN), each step logged in `log`. `name` labels log lines.
// factor_hessian and gptq_solve for one linear, on a copy of h; R is freed before the error check (measured
// directly, as relative_output_error), so the placement needs no more than the solve of this one linear.
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
// The bit-stream packing those use lives with the formats (io/bitstream.hpp).
using io::pack_columns;
using io::pack_columns_of_rows;
using io::pack_rows;
using io::unpack_columns;
using io::unpack_rows;

}  // namespace pipequant
