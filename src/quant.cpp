// GPTQ, RTN and the relative output error, written against the backend interface (docs/design.md section 4).
#include "src/quant.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "base/timing.hpp"

namespace pipequant {

namespace {

using kernels::Backend;
using kernels::Buffer;
using kernels::QuantGrid;
using kernels::Trans;

// Host staging for uploads built row by row (16 MB).
inline constexpr int64_t kStagingFloats = int64_t{1} << 22;

template <typename T>
void upload(Backend& backend, Buffer<T>& dst, const T* src, int64_t count) {
  backend.upload(dst.data(), src, sizeof(T) * static_cast<size_t>(count));
}

template <typename T>
void download(Backend& backend, T* dst, const Buffer<T>& src, int64_t count) {
  backend.download(dst, src.data(), sizeof(T) * static_cast<size_t>(count));
}

int64_t group_count(int64_t cols, int64_t group_size) {
  return group_size > 0 ? (cols + group_size - 1) / group_size : 1;
}

std::string format_damp(double damp) {
  std::ostringstream os;
  os << damp;
  return os.str();
}

// Scale/zero tables [rows, groups] for the natural column groups of w [rows, cols] (on the backend).
void natural_group_params(Backend& backend, const float* w, int64_t rows, int64_t cols, int64_t group_size,
                          QuantGrid grid, float* scales, float* zeros, int64_t groups) {
  if (group_size <= 0) {
    backend.quant_params(w, rows, cols, cols, grid, scales, zeros, groups);
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * group_size;
    const int64_t width = std::min(group_size, cols - c0);
    backend.quant_params(w + c0, rows, width, cols, grid, scales + g, zeros + g, groups);
  }
}

// Fills dst [rows, cols] (backend memory) row by row through a host staging buffer of about
// kStagingFloats: fill_rows(r0, r1, out) writes rows [r0, r1) into out [r1 - r0, cols]. Permuted, damped
// or scaled copies of W and H are built this way without a full host copy (K x K is 11 GB at K = 53248).
template <typename FillRows>
void upload_rows(Backend& backend, float* dst, int64_t rows, int64_t cols, std::vector<float>& staging,
                 FillRows&& fill_rows) {
  const int64_t chunk = std::clamp<int64_t>(kStagingFloats / cols, 1, rows);
  staging.resize(static_cast<size_t>(chunk * cols));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    fill_rows(r0, r1, staging.data());
    backend.upload(dst + r0 * cols, staging.data(), sizeof(float) * static_cast<size_t>((r1 - r0) * cols));
  }
}

// Tables [rows, groups] -> QuantizedLinear layout [groups, rows].
void transpose_tables(const std::vector<float>& scales_rg, const std::vector<float>& zeros_rg, int64_t rows,
                      int64_t groups, QuantizedLinear& out) {
  out.scales.resize(static_cast<size_t>(groups * rows));
  out.zeros.resize(static_cast<size_t>(groups * rows));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      out.scales[static_cast<size_t>(g * rows + r)] = scales_rg[static_cast<size_t>(r * groups + g)];
      out.zeros[static_cast<size_t>(g * rows + r)] = zeros_rg[static_cast<size_t>(r * groups + g)];
    }
}

void check_inputs(const float* w, int64_t rows, int64_t cols, const QuantConfig& config) {
  validate(config);
  PQ_REQUIRE(rows > 0 && cols > 0, "quantize: the weight shape must be positive, got [", rows, ", ", cols, "]");
  PQ_REQUIRE(w != nullptr, "quantize: no weights given");
  // a NaN or infinite weight has no grid point; it would turn into an arbitrary code
  const int64_t bad = first_non_finite(w, rows * cols);
  PQ_REQUIRE(bad == rows * cols, "quantize: the weights hold a non-finite value (at row ",
             bad / std::max<int64_t>(cols, 1), ", column ", bad % std::max<int64_t>(cols, 1),
             "); check the checkpoint");
}

// Backend memory that gptq_quantize (and rtn_quantize with an error check) holds at its peak, bounding both of
// its phases: the solve (R [cols, cols], w, wc and res [rows, cols], the codes, the tables) and the error check
// (H and the stacked [W; D] chunk with its product, at most four [rows, cols] floats).
size_t solve_bytes(int64_t rows, int64_t cols, int64_t groups) {
  const auto r = static_cast<size_t>(rows), c = static_cast<size_t>(cols), g = static_cast<size_t>(groups);
  return sizeof(float) * (c * c + 4 * r * c + 2 * r * g + r + c) + r * c;
}

// Backend scratch of one GPTQ column block with dynamic groups (Backend::gptq_block): the inverse of a span of at
// most block_size + group_size columns, in double and in float.
size_t gptq_block_scratch_bytes(int64_t cols, const QuantConfig& config) {
  if (config.group_size <= 0 || config.static_groups) return 0;
  const auto span = static_cast<size_t>(std::min(cols, config.block_size + config.group_size));
  return (sizeof(double) + sizeof(float)) * span * span;
}

// The backend that runs work needing `need` bytes: `backend` when it fits its free budget (or there is no budget
// or no host fallback), its host fallback otherwise, with a line (without a linear's name) for the log.
Backend& solve_backend(Backend& backend, size_t need, std::vector<std::string>& log) {
  Backend* host = backend.host_fallback();
  const size_t room = backend.free_budget_bytes();
  if (host == nullptr || need <= room) return backend;
  std::ostringstream os;
  os << "the solve needs " << need / 1e9 << " GB of " << backend.name() << " memory, " << room / 1e9
     << " GB of the budget are free: solved on the " << host->name();
  log.push_back(os.str());
  return *host;
}

// A factor's log lines as one linear reports them: "<label>: <line>".
std::vector<std::string> labelled(const std::vector<std::string>& lines, const std::string& label) {
  std::vector<std::string> out;
  out.reserve(lines.size());
  for (const auto& line : lines) out.push_back(label + ": " + line);
  return out;
}

using ColumnPlan = GptqColumnPlan;

// Dead inputs: H[i, i] = 1 and W[:, i] = 0, as the reference does. Act-order: columns by decreasing diag(H); a
// stable sort keeps ties in input order (deterministic). Static groups keep the natural group of each column.
ColumnPlan plan_columns(const float* h, int64_t cols, const QuantConfig& config) {
  ColumnPlan plan;
  plan.diag.resize(static_cast<size_t>(cols));
  plan.dead.assign(static_cast<size_t>(cols), 0);
  for (int64_t i = 0; i < cols; ++i) {
    plan.diag[static_cast<size_t>(i)] = h[i * cols + i];
    if (plan.diag[static_cast<size_t>(i)] == 0.0f) {
      plan.dead[static_cast<size_t>(i)] = 1;
      plan.diag[static_cast<size_t>(i)] = 1.0f;
    }
  }
  plan.perm.resize(static_cast<size_t>(cols));
  std::iota(plan.perm.begin(), plan.perm.end(), int64_t{0});
  if (config.act_order)
    std::stable_sort(plan.perm.begin(), plan.perm.end(), [&plan](int64_t x, int64_t y) {
      return plan.diag[static_cast<size_t>(x)] > plan.diag[static_cast<size_t>(y)];
    });
  const int64_t gs = config.group_size;
  plan.tables_up_front = gs <= 0 || config.static_groups;
  plan.param_of.resize(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    int64_t p = 0;
    if (gs > 0) p = config.static_groups ? plan.perm[static_cast<size_t>(j)] / gs : j / gs;
    plan.param_of[static_cast<size_t>(j)] = static_cast<int32_t>(p);
  }
  return plan;
}

// mean(diag(H)) with the dead entries at 1, summed in processing order.
double diag_mean(const ColumnPlan& plan) {
  double sum = 0.0;
  for (const int64_t c : plan.perm) sum += plan.diag[static_cast<size_t>(c)];
  return sum / static_cast<double>(plan.perm.size());
}

bool all_finite(const float* v, int64_t count) { return first_non_finite(v, count) == count; }

// A result with its shape and nothing quantized yet.
QuantizedLinear empty_result(int64_t rows, int64_t cols, int64_t groups, int bits) {
  QuantizedLinear out;
  out.rows = rows;
  out.cols = cols;
  out.groups = groups;
  out.bits = bits;
  return out;
}

// Rows [r0, r1) of W in processing order with dead columns zeroed, each column times col_scale[j] (or 1), for
// upload_rows.
auto rows_in_processing_order(const float* w, int64_t cols, const ColumnPlan& plan, const float* col_scale) {
  return [w, cols, &plan, col_scale](int64_t r0, int64_t r1, float* dst) {
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = w + r * cols;
      float* row = dst + (r - r0) * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t c = plan.perm[static_cast<size_t>(j)];
        const float v = plan.dead[static_cast<size_t>(c)] ? 0.0f : src[c];
        row[j] = col_scale ? v * col_scale[j] : v;
      }
    }
  };
}

// Backend memory of one linear's GPTQ solve (R is the factor's). The weights and tables live through the whole
// solve, the rest during the column loop.
struct GptqBuffers {
  GptqBuffers(Backend& backend, int64_t rows, int64_t cols, int64_t groups)
      : w(backend, rows * cols),
        wc(backend, rows * cols),
        scales(backend, rows * groups),
        zeros(backend, rows * groups) {}

  Buffer<float> w;           // original weights, processing order, dead columns zeroed
  Buffer<float> wc;          // running weights (see GptqBlockArgs::wc)
  Buffer<float> scales;      // scale table [rows, groups]
  Buffer<float> zeros;       // zero table [rows, groups]
  Buffer<float> res;         // w - dequant(q), processing order
  Buffer<uint8_t> q;         // codes, processing order
  Buffer<float> err2;        // per-row loss [rows]
  Buffer<int32_t> param_of;  // [cols]
};

// The per-row or static-group tables, before the column loop (wc serves as scratch). Static groups come from the
// dead-zeroed weights in natural column order; the per-row parameters from the weights as given, because the
// reference sets its quantizer up before it zeroes dead columns.
void tables_up_front(Backend& backend, const float* w, int64_t rows, int64_t cols, const QuantConfig& config,
                     const ColumnPlan& plan, GptqBuffers& buf, std::vector<float>& staging) {
  const int64_t gs = config.group_size;
  if (gs > 0) {
    upload_rows(backend, buf.wc.data(), rows, cols, staging, [&](int64_t r0, int64_t r1, float* dst) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < cols; ++c)
          dst[(r - r0) * cols + c] = plan.dead[static_cast<size_t>(c)] ? 0.0f : w[r * cols + c];
    });
  } else {
    upload(backend, buf.wc, w, rows * cols);
  }
  natural_group_params(backend, buf.wc.data(), rows, cols, gs, QuantGrid{config.bits, config.sym}, buf.scales.data(),
                       buf.zeros.data(), group_count(cols, gs));
}

struct Damping {
  double damp = 0.0;  // the relative damping that worked, or the last one tried
  bool factored = false;
};

// One try of fallback (1) failed: a line for the log, and the damping of the next try.
void damping_failed(const QuantConfig& config, int attempt, Damping& d, std::vector<std::string>& log) {
  if (attempt < config.damp_retries) {
    log.push_back("Cholesky failed with damp " + format_damp(d.damp) + ", retrying with " + format_damp(d.damp * 10.0));
    d.damp *= 10.0;
  } else {
    log.push_back("Cholesky failed with damp " + format_damp(d.damp) + " after " + std::to_string(config.damp_retries) +
                  " retries, falling back to round-to-nearest");
  }
}

// Fallback (1) on a device backend: factors H (processing order, dead diagonal fixed, damped) into r = R, raising
// the damping x10 after each failure, at most config.damp_retries times; every failure gets a line (without a
// name) in `log`. R is built from h (host) on every try: the factorization overwrites it.
Damping factor_with_damping(Backend& backend, const float* h, int64_t cols, const QuantConfig& config,
                            const ColumnPlan& plan, Buffer<float>& r, float& damp_add, std::vector<std::string>& log) {
  const double mean = diag_mean(plan);
  r = Buffer<float>(backend, cols * cols);
  std::vector<float> staging;
  Damping d{config.damp, false};
  for (int attempt = 0; attempt <= config.damp_retries; ++attempt) {
    damp_add = static_cast<float>(d.damp * mean);
    upload_rows(backend, r.data(), cols, cols, staging, [&](int64_t a0, int64_t a1, float* dst) {
#pragma omp parallel for schedule(static)
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t pa = plan.perm[static_cast<size_t>(a)];
        const float* src = h + pa * cols;
        float* row = dst + (a - a0) * cols;
        for (int64_t b = 0; b < cols; ++b) row[b] = src[plan.perm[static_cast<size_t>(b)]];
        row[a] = plan.diag[static_cast<size_t>(pa)] + damp_add;
      }
    });
    if (backend.reverse_cholesky(r.data(), cols)) {
      d.factored = true;
      return d;
    }
    damping_failed(config, attempt, d, log);
  }
  return d;
}

// a [n, n] <- P a P^T in place: a[i][j] = a[perm[i]][perm[j]] (rows by following the permutation's cycles with one
// row of scratch, then the columns of each row).
void permute_symmetric(float* a, int64_t n, const std::vector<int64_t>& perm) {
  std::vector<char> moved(static_cast<size_t>(n), 0);
  std::vector<float> row(static_cast<size_t>(n));
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(n);
  for (int64_t i = 0; i < n; ++i) {
    if (moved[static_cast<size_t>(i)] || perm[static_cast<size_t>(i)] == i) continue;
    std::memcpy(row.data(), a + i * n, row_bytes);
    int64_t j = i;
    for (int64_t k = perm[static_cast<size_t>(j)]; k != i; j = k, k = perm[static_cast<size_t>(k)]) {
      std::memcpy(a + j * n, a + k * n, row_bytes);
      moved[static_cast<size_t>(j)] = 1;
    }
    std::memcpy(a + j * n, row.data(), row_bytes);
    moved[static_cast<size_t>(j)] = 1;
  }
#pragma omp parallel
  {
    std::vector<float> tmp(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      float* dst = a + r * n;
      std::copy(dst, dst + n, tmp.begin());
      for (int64_t c = 0; c < n; ++c) dst[c] = tmp[static_cast<size_t>(perm[static_cast<size_t>(c)])];
    }
  }
}

// The strict upper triangle of a [n, n] from its strict lower one, in tiles.
void mirror_lower_to_upper(float* a, int64_t n) {
  constexpr int64_t kTile = 64;
#pragma omp parallel for schedule(dynamic)
  for (int64_t i0 = 0; i0 < n; i0 += kTile)
    for (int64_t j0 = i0; j0 < n; j0 += kTile)
      for (int64_t i = i0; i < std::min(n, i0 + kTile); ++i)
        for (int64_t j = std::max(j0, i + 1); j < std::min(n, j0 + kTile); ++j) a[i * n + j] = a[j * n + i];
}

// Fallback (1) on a host backend, in h's own memory: h is permuted to processing order once; each try sets the
// damped diagonal and factors; after a failure the strict lower triangle, which the factorization leaves as it
// was, gives the upper one back.
Damping factor_in_place(Backend& backend, std::vector<float>& h, int64_t cols, const QuantConfig& config,
                        const ColumnPlan& plan, float& damp_add, std::vector<std::string>& log) {
  const double mean = diag_mean(plan);
  if (config.act_order) permute_symmetric(h.data(), cols, plan.perm);
  Damping d{config.damp, false};
  for (int attempt = 0; attempt <= config.damp_retries; ++attempt) {
    damp_add = static_cast<float>(d.damp * mean);
    if (attempt > 0) mirror_lower_to_upper(h.data(), cols);
    for (int64_t a = 0; a < cols; ++a)
      h[static_cast<size_t>(a * cols + a)] =
          plan.diag[static_cast<size_t>(plan.perm[static_cast<size_t>(a)])] + damp_add;
    if (backend.reverse_cholesky(h.data(), cols)) {
      d.factored = true;
      return d;
    }
    damping_failed(config, attempt, d, log);
  }
  return d;
}

// diag(R), one strided transfer (not the whole K x K factor, nor K tiny copies).
std::vector<float> factor_diagonal(Backend& backend, const float* r, int64_t cols) {
  std::vector<float> rdiag(static_cast<size_t>(cols));
  backend.download_strided(rdiag.data(), r, sizeof(float), cols, sizeof(float) * static_cast<size_t>(cols + 1));
  return rdiag;
}

// wc[:, j] = w[:, j] * R[j, j], the running weights before the first block.
void start_running_weights(Backend& backend, const float* w, int64_t rows, const GptqFactor& factor, GptqBuffers& buf,
                           std::vector<float>& staging) {
  upload_rows(backend, buf.wc.data(), rows, factor.cols, staging,
              rows_in_processing_order(w, factor.cols, factor.plan, factor.r_diag.data()));
}

// The column loop over all columns (Backend::gptq_columns): codes, residuals and tables in processing order.
void solve_columns(Backend& backend, int64_t rows, int64_t cols, int64_t groups, const QuantConfig& config,
                   const ColumnPlan& plan, const float* r, GptqBuffers& buf) {
  buf.res = Buffer<float>(backend, rows * cols);
  buf.q = Buffer<uint8_t>(backend, rows * cols);
  buf.err2 = Buffer<float>(backend, rows);
  buf.param_of = Buffer<int32_t>(backend, cols);
  upload(backend, buf.param_of, plan.param_of.data(), cols);
  const std::vector<float> zero_rows(static_cast<size_t>(rows), 0.0f);
  upload(backend, buf.err2, zero_rows.data(), rows);

  kernels::GptqBlockArgs args;
  args.rows = rows;
  args.cols = cols;
  args.r = r;
  args.w = buf.w.data();
  args.wc = buf.wc.data();
  args.res = buf.res.data();
  args.err2 = buf.err2.data();
  args.q = buf.q.data();
  args.scales = buf.scales.data();
  args.zeros = buf.zeros.data();
  args.groups = groups;
  args.param_of = buf.param_of.data();
  args.dynamic_group_size = plan.tables_up_front ? 0 : config.group_size;
  args.grid = QuantGrid{config.bits, config.sym};
  backend.gptq_columns(args, config.block_size);
}

// The codes back in natural column order, the tables in the [groups, rows] layout.
void collect_result(Backend& backend, const ColumnPlan& plan, const GptqBuffers& buf, QuantizedLinear& out) {
  const int64_t rows = out.rows, cols = out.cols, groups = out.groups;
  std::vector<uint8_t> qp(static_cast<size_t>(rows * cols));
  download(backend, qp.data(), buf.q, rows * cols);
  std::vector<float> scales_rg(static_cast<size_t>(rows * groups)), zeros_rg(static_cast<size_t>(rows * groups));
  download(backend, scales_rg.data(), buf.scales, rows * groups);
  download(backend, zeros_rg.data(), buf.zeros, rows * groups);
  out.q.resize(static_cast<size_t>(rows * cols));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      out.q[static_cast<size_t>(r * cols + plan.perm[static_cast<size_t>(j)])] = qp[static_cast<size_t>(r * cols + j)];
  transpose_tables(scales_rg, zeros_rg, rows, groups, out);
}

// Fallback (2): round to nearest for the whole layer, with the damping last tried and the log so far.
QuantizedLinear rtn_fallback(Backend& backend, const float* w, int64_t rows, int64_t cols, const float* h,
                             const QuantConfig& config, double damp, std::vector<std::string> log) {
  QuantizedLinear out = rtn_quantize(backend, w, rows, cols, h, config);
  out.fallback = Fallback::kRtn;
  out.damp_used = damp;
  out.log = std::move(log);
  return out;
}

// tr(D H D^T) with the undamped H, from the column loop's loss: its per-row sums of e^2 add up to tr(D H_mod D^T),
// where H_mod is H in processing order with the dead inputs' diagonal set to 1 and damp_add added to the whole
// diagonal, and D is the dead-zeroed weights minus the quantized ones. Taking those two terms off costs rows x cols.
double accounted_error2(Backend& backend, const float* w, const GptqFactor& factor, const GptqBuffers& buf,
                        const QuantizedLinear& out) {
  const int64_t rows = out.rows, cols = out.cols;
  std::vector<float> err2(static_cast<size_t>(rows));
  download(backend, err2.data(), buf.err2, rows);
  const std::vector<char>& dead = factor.plan.dead;
  std::vector<double> per_row(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    double d2 = 0.0, dead2 = 0.0;
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t t = static_cast<int64_t>(out.g_idx[static_cast<size_t>(k)]) * rows + r;
      const float code = static_cast<float>(out.q[static_cast<size_t>(r * cols + k)]);
      const float deq = out.scales[static_cast<size_t>(t)] * (code - out.zeros[static_cast<size_t>(t)]);
      const double d = static_cast<double>(dead[static_cast<size_t>(k)] ? 0.0f : w[r * cols + k]) - deq;
      d2 += d * d;
      if (dead[static_cast<size_t>(k)]) dead2 += d * d;
    }
    per_row[static_cast<size_t>(r)] = err2[static_cast<size_t>(r)] - static_cast<double>(factor.damp_add) * d2 - dead2;
  }
  double total = 0.0;
  for (const double v : per_row) total += v;  // in row order, whatever the thread count
  return std::max(total, 0.0);
}

// The column loop of one linear with a factor that holds R: codes, tables, g_idx, damping, fallback and log;
// relative_error is left for the caller (R may be freed first). The solve's buffers are freed on return.
QuantizedLinear solve_with_factor(const GptqFactor& factor, const float* w, int64_t rows, const std::string& label) {
  Backend& backend = *factor.backend;
  const QuantConfig& config = factor.config;
  const ColumnPlan& plan = factor.plan;
  const int64_t cols = factor.cols;
  QuantizedLinear out = empty_result(rows, cols, group_count(cols, config.group_size), config.bits);
  out.g_idx.resize(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    out.g_idx[static_cast<size_t>(plan.perm[static_cast<size_t>(j)])] = plan.param_of[static_cast<size_t>(j)];
  out.damp_used = factor.damp_used;
  out.fallback = factor.fallback;
  out.log = labelled(factor.log, label);

  GptqBuffers buf(backend, rows, cols, out.groups);
  std::vector<float> staging;
  if (plan.tables_up_front) tables_up_front(backend, w, rows, cols, config, plan, buf, staging);
  upload_rows(backend, buf.w.data(), rows, cols, staging, rows_in_processing_order(w, cols, plan, nullptr));

  const auto t_solve = std::chrono::steady_clock::now();
  start_running_weights(backend, w, rows, factor, buf, staging);
  staging = std::vector<float>();
  solve_columns(backend, rows, cols, out.groups, config, plan, factor.r_data(), buf);
  collect_result(backend, plan, buf, out);
  out.error2 = accounted_error2(backend, w, factor, buf, out);
  out.solve_seconds = seconds_since(t_solve);
  return out;
}

// ||(W - Q) X||^2 / ||W X||^2 of a solved linear, on the backend that solved it.
void measure_error(Backend& backend, const float* w, const float* h, QuantizedLinear& out) {
  const std::vector<float> wq = out.dequantize();
  out.relative_error = relative_output_error(backend, w, wq.data(), out.rows, out.cols, h);
}

// The factor of h (taken over) for solves of at most max_rows rows: on a host backend made in h's memory, on a
// device backend uploaded from it.
GptqFactor make_factor(Backend& primary, std::vector<float> h, int64_t cols, int64_t max_rows,
                       const QuantConfig& config) {
  validate(config);
  PQ_REQUIRE(cols > 0 && max_rows > 0, "factor_hessian: the Hessian width and the rows must be positive, got ", cols,
             " and ", max_rows);
  PQ_REQUIRE(static_cast<int64_t>(h.size()) == cols * cols, "factor_hessian: the Hessian holds ", h.size(),
             " values, expected ", cols, " x ", cols);
  GptqFactor f;
  f.config = config;
  f.cols = cols;
  f.max_rows = max_rows;
  f.damp_used = config.damp;
  // fallback (3): a solve that does not fit the device budget runs on the host backend
  f.backend = &solve_backend(primary, gptq_solve_bytes(primary, max_rows, cols, config), f.log);
  if (f.backend != &primary) f.fallback = Fallback::kCpu;  // a damping or RTN fallback says more
  // A non-finite Hessian cannot be fixed by damping: round to nearest right away.
  if (!all_finite(h.data(), cols * cols)) {
    f.fallback = Fallback::kRtn;
    f.log.push_back("Hessian has non-finite values, falling back to round-to-nearest");
    return f;
  }
  f.plan = plan_columns(h.data(), cols, config);
  const auto t0 = std::chrono::steady_clock::now();
  // a host backend with a budget stands in for a device in tests: R goes through its allocator there
  const bool in_place = f.backend->host_memory() && f.backend->budget_bytes() == 0;
  const Damping d = in_place ? factor_in_place(*f.backend, h, cols, config, f.plan, f.damp_add, f.log)
                             : factor_with_damping(*f.backend, h.data(), cols, config, f.plan, f.r, f.damp_add, f.log);
  f.damp_used = d.damp;
  if (!d.factored) {
    f.r.reset();
    f.fallback = Fallback::kRtn;
    f.seconds = seconds_since(t0);
    return f;
  }
  if (in_place) f.r_host = std::move(h);
  f.r_diag = factor_diagonal(*f.backend, f.r_data(), cols);
  f.seconds = seconds_since(t0);
  if (d.damp != config.damp) f.fallback = Fallback::kDamp;
  return f;
}

}  // namespace

void validate(const QuantConfig& config) {
  PQ_REQUIRE(config.bits == 2 || config.bits == 3 || config.bits == 4 || config.bits == 8,
             "--bits must be 2, 3, 4 or 8, got ", config.bits);
  PQ_REQUIRE(config.group_size == -1 || config.group_size > 0,
             "--group-size must be a positive number of input channels or -1 (one group per row), got ",
             config.group_size);
  PQ_REQUIRE(config.damp > 0.0 && config.damp <= 1.0, "--damp must be in (0, 1] (relative to mean(diag(H))), got ",
             config.damp);
  PQ_REQUIRE(config.damp_retries >= 0, "--damp-retries must be >= 0, got ", config.damp_retries);
  PQ_REQUIRE(config.block_size > 0, "--block-size must be positive, got ", config.block_size);
  PQ_REQUIRE(config.method != Method::kAwq || (!config.act_order && !config.static_groups),
             "--method awq quantizes the input channels in their natural order: --act-order and --static-groups are "
             "GPTQ's");
  PQ_REQUIRE(!(config.act_order && config.static_groups && config.group_size == -1),
             "--static-groups with --act-order needs a --group-size (got -1, one group per row)");
}

const char* name(Fallback fallback) {
  switch (fallback) {
    case Fallback::kNone:
      return "none";
    case Fallback::kDamp:
      return "damp";
    case Fallback::kRtn:
      return "rtn";
    case Fallback::kCpu:
      return "cpu";
  }
  PQ_ASSERT(false, "name: Fallback value ", static_cast<int>(fallback));
  return "";
}

Fallback fallback_from_name(const std::string& word, const std::string& where) {
  for (const Fallback f : {Fallback::kNone, Fallback::kDamp, Fallback::kRtn, Fallback::kCpu})
    if (word == name(f)) return f;
  fail(where, ": fallback '", word, "' is not one of none, damp, rtn, cpu");
}

std::vector<float> QuantizedLinear::dequantize() const {
  PQ_ASSERT(static_cast<int64_t>(q.size()) == rows * cols && static_cast<int64_t>(g_idx.size()) == cols &&
                static_cast<int64_t>(scales.size()) == groups * rows &&
                static_cast<int64_t>(zeros.size()) == groups * rows,
            "QuantizedLinear::dequantize: inconsistent sizes");
  std::vector<float> w(static_cast<size_t>(rows * cols));
#pragma omp parallel for schedule(static) if (rows * cols > (int64_t{1} << 16))
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t t = static_cast<int64_t>(g_idx[static_cast<size_t>(k)]) * rows + n;  // table index [groups, rows]
      const float code = static_cast<float>(q[static_cast<size_t>(n * cols + k)]);
      w[static_cast<size_t>(n * cols + k)] = scales[static_cast<size_t>(t)] * (code - zeros[static_cast<size_t>(t)]);
    }
  return w;
}

namespace {

// tr(W H W^T) and tr(D H D^T), D = W - Wq, over the rows of w and wq [rows, cols] (host), H in backend memory.
BaselineTerms quadratic_sums(Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                             const float* hb, bool weight_too = true) {
  const int64_t parts = weight_too ? 2 : 1;  // [W_chunk; D_chunk], or D_chunk alone
  const int64_t chunk = std::clamp<int64_t>(kErrorChunkFloats / (2 * cols), 1, rows);
  std::vector<float> stacked(static_cast<size_t>(parts * chunk * cols));  // [parts * chunk, cols]
  std::vector<float> product(stacked.size());                             // stacked @ H
  Buffer<float> sb(backend, parts * chunk * cols);
  Buffer<float> pb(backend, parts * chunk * cols);
  std::vector<double> num_rows(static_cast<size_t>(rows));
  std::vector<double> den_rows(static_cast<size_t>(rows), 0.0);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    const int64_t d0 = (parts - 1) * m * cols;  // where D_chunk starts
    if (weight_too) std::copy(w + r0 * cols, w + (r0 + m) * cols, stacked.begin());
    for (int64_t i = 0; i < m * cols; ++i) stacked[static_cast<size_t>(d0 + i)] = w[r0 * cols + i] - wq[r0 * cols + i];
    upload(backend, sb, stacked.data(), parts * m * cols);
    backend.gemm(Trans::kNo, Trans::kNo, parts * m, cols, cols, 1.0f, sb.data(), cols, hb, cols, 0.0f, pb.data(), cols);
    download(backend, product.data(), pb, parts * m * cols);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; ++r) {
      double den = 0.0, num = 0.0;
      const float* dr = stacked.data() + d0 + r * cols;
      const float* pd = product.data() + d0 + r * cols;
      for (int64_t c = 0; c < cols; ++c) num += static_cast<double>(dr[c]) * pd[c];
      if (weight_too) {
        const float* wr = stacked.data() + r * cols;
        const float* pw = product.data() + r * cols;
        for (int64_t c = 0; c < cols; ++c) den += static_cast<double>(wr[c]) * pw[c];
      }
      den_rows[static_cast<size_t>(r0 + r)] = den;
      num_rows[static_cast<size_t>(r0 + r)] = num;
    }
  }
  // the totals in row order, whatever the thread count
  BaselineTerms t;
  for (int64_t r = 0; r < rows; ++r) {
    t.weight2 += den_rows[static_cast<size_t>(r)];
    t.rtn_error2 += num_rows[static_cast<size_t>(r)];
  }
  return t;
}

// Rows [0, rows) of W (from w_rows) and their round-to-nearest dequantized values, in chunks of at most `chunk`
// rows into buffers made once: visit(r0, m, w_chunk, wq_chunk).
template <typename Visit>
void for_each_rtn_chunk(Backend& backend, const FillRows& w_rows, int64_t rows, int64_t cols, int64_t chunk,
                        const QuantConfig& config, Visit&& visit) {
  std::vector<float> w(static_cast<size_t>(std::min(chunk, rows) * cols));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    w_rows(r0, r0 + m, w.data());
    const std::vector<float> wq = rtn_quantize(backend, w.data(), m, cols, nullptr, config).dequantize();
    visit(r0, m, w.data(), wq.data());
  }
}

}  // namespace

double output_error2(Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                     const float* h_backend) {
  PQ_ASSERT(w && wq && h_backend && rows > 0 && cols > 0, "output_error2: bad arguments");
  return quadratic_sums(backend, w, wq, rows, cols, h_backend, false).rtn_error2;
}

double relative_output_error(Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                             const float* h) {
  PQ_ASSERT(w && wq && h && rows > 0 && cols > 0, "relative_output_error: bad arguments");
  Buffer<float> copy;
  const BaselineTerms t =
      quadratic_sums(backend, w, wq, rows, cols, kernels::host_floats_on_backend(backend, h, cols * cols, copy));
  return t.weight2 == 0.0 ? 0.0 : t.rtn_error2 / t.weight2;
}

BaselineTerms baseline_terms(Backend& backend, const FillRows& w_rows, int64_t rows, int64_t cols, const float* h,
                             const QuantConfig& config) {
  PQ_ASSERT(h && rows > 0 && cols > 0, "baseline_terms: bad arguments");
  BaselineTerms total;
  const int64_t chunk = std::clamp<int64_t>(kErrorChunkFloats / (2 * cols), 1, rows);
  for_each_rtn_chunk(backend, w_rows, rows, cols, chunk, config,
                     [&](int64_t, int64_t m, const float* wc, const float* wq) {
                       total += quadratic_sums(backend, wc, wq, m, cols, h);
                     });
  return total;
}

BaselineTerms baseline_terms_from_inputs(Backend& backend, const float* x, int64_t m, const FillRows& w_rows,
                                         int64_t rows, int64_t cols, double scale, const QuantConfig& config) {
  PQ_ASSERT(x && m > 0 && rows > 0 && cols > 0, "baseline_terms_from_inputs: bad arguments");
  // [W_chunk; D_chunk] and its product with x, each at most kErrorChunkFloats
  const int64_t chunk = std::clamp<int64_t>(kErrorChunkFloats / (2 * std::max(cols, m)), 1, rows);
  std::vector<float> stacked(static_cast<size_t>(2 * chunk * cols)), y(static_cast<size_t>(2 * chunk * m));
  Buffer<float> sb(backend, 2 * chunk * cols), yb(backend, 2 * chunk * m);
  std::vector<double> w2(static_cast<size_t>(m)), d2(static_cast<size_t>(m));
  BaselineTerms total;
  for_each_rtn_chunk(
      backend, w_rows, rows, cols, chunk, config, [&](int64_t, int64_t t, const float* wc, const float* wq) {
        std::copy(wc, wc + t * cols, stacked.begin());
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < t * cols; ++i) stacked[static_cast<size_t>(t * cols + i)] = wc[i] - wq[i];
        upload(backend, sb, stacked.data(), 2 * t * cols);
        // y [m, 2t] = x [m, cols] stacked^T: the outputs of W and of D for every token
        backend.gemm(Trans::kNo, Trans::kYes, m, 2 * t, cols, 1.0f, x, cols, sb.data(), cols, 0.0f, yb.data(), 2 * t);
        download(backend, y.data(), yb, 2 * t * m);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
          const float* yi = y.data() + i * 2 * t;
          double a = 0.0, b = 0.0;
          for (int64_t j = 0; j < t; ++j) a += static_cast<double>(yi[j]) * yi[j];
          for (int64_t j = t; j < 2 * t; ++j) b += static_cast<double>(yi[j]) * yi[j];
          w2[static_cast<size_t>(i)] = a;
          d2[static_cast<size_t>(i)] = b;
        }
        for (int64_t i = 0; i < m; ++i) {  // in token order, whatever the thread count
          total.weight2 += scale * w2[static_cast<size_t>(i)];
          total.rtn_error2 += scale * d2[static_cast<size_t>(i)];
        }
      });
  return total;
}

QuantizedLinear rtn_quantize(Backend& primary, const float* w, int64_t rows, int64_t cols, const float* h,
                             const QuantConfig& config) {
  check_inputs(w, rows, cols, config);
  const QuantGrid grid{config.bits, config.sym};
  const int64_t groups = group_count(cols, config.group_size);
  std::vector<std::string> moved;  // RTN is the baseline: where it ran is not a fallback of the layer
  Backend& backend = solve_backend(primary, solve_bytes(rows, cols, groups), moved);
  QuantizedLinear out = empty_result(rows, cols, groups, config.bits);
  out.g_idx.resize(static_cast<size_t>(cols));
  for (int64_t k = 0; k < cols; ++k)
    out.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(config.group_size > 0 ? k / config.group_size : 0);

  const auto t0 = std::chrono::steady_clock::now();
  Buffer<float> wb(backend, rows * cols);
  Buffer<float> sb(backend, rows * groups);
  Buffer<float> zb(backend, rows * groups);
  Buffer<int32_t> pb(backend, cols);
  Buffer<uint8_t> qb(backend, rows * cols);
  upload(backend, wb, w, rows * cols);
  upload(backend, pb, out.g_idx.data(), cols);
  natural_group_params(backend, wb.data(), rows, cols, config.group_size, grid, sb.data(), zb.data(), groups);
  backend.quantize(wb.data(), rows, cols, sb.data(), zb.data(), groups, pb.data(), grid, qb.data(), nullptr);
  out.q.resize(static_cast<size_t>(rows * cols));
  std::vector<float> scales_rg(static_cast<size_t>(rows * groups)), zeros_rg(static_cast<size_t>(rows * groups));
  download(backend, out.q.data(), qb, rows * cols);
  download(backend, scales_rg.data(), sb, rows * groups);
  download(backend, zeros_rg.data(), zb, rows * groups);
  out.solve_seconds = seconds_since(t0);
  transpose_tables(scales_rg, zeros_rg, rows, groups, out);
  if (h) {
    wb.reset();
    qb.reset();
    const std::vector<float> wq = out.dequantize();
    out.relative_error = relative_output_error(backend, w, wq.data(), rows, cols, h);
  }
  return out;
}

GptqFactor factor_hessian(Backend& backend, std::vector<float> h, int64_t cols, int64_t max_rows,
                          const QuantConfig& config) {
  return make_factor(backend, std::move(h), cols, max_rows, config);
}

size_t gptq_solve_bytes(Backend& backend, int64_t rows, int64_t cols, const QuantConfig& config) {
  return solve_bytes(rows, cols, group_count(cols, config.group_size)) + backend.factor_workspace_bytes(cols) +
         gptq_block_scratch_bytes(cols, config);
}

QuantizedLinear gptq_solve(const GptqFactor& factor, const float* w, int64_t rows, const std::string& name) {
  const std::string label = name.empty() ? std::string("linear") : name;
  PQ_REQUIRE(factor.backend != nullptr, "gptq_solve: ", label, ": the factor is empty (moved from?)");
  check_inputs(w, rows, factor.cols, factor.config);
  PQ_REQUIRE(rows <= factor.max_rows, "gptq_solve: ", label, ": ", rows,
             " rows, but the factor was placed for at most ", factor.max_rows, " (factor_hessian's max_rows)");
  Backend& backend = *factor.backend;
  if (factor.fallback == Fallback::kRtn)  // fallback (2)
    return rtn_fallback(backend, w, rows, factor.cols, nullptr, factor.config, factor.damp_used,
                        labelled(factor.log, label));
  return solve_with_factor(factor, w, rows, label);
}

QuantizedLinear gptq_quantize(Backend& primary, const float* w, int64_t rows, int64_t cols, const float* h,
                              const QuantConfig& config, const std::string& name) {
  check_inputs(w, rows, cols, config);
  PQ_REQUIRE(h != nullptr, "gptq_quantize: ", name, ": no Hessian given");
  GptqFactor factor = make_factor(primary, std::vector<float>(h, h + cols * cols), cols, rows, config);
  const std::string label = name.empty() ? std::string("linear") : name;
  if (factor.fallback == Fallback::kRtn)
    return rtn_fallback(*factor.backend, w, rows, cols, h, config, factor.damp_used, labelled(factor.log, label));
  QuantizedLinear out = solve_with_factor(factor, w, rows, label);
  out.solve_seconds += factor.seconds;
  Backend& backend = *factor.backend;
  factor = GptqFactor();  // one linear alone: R goes before the error check, as the placement counted
  measure_error(backend, w, h, out);
  return out;
}

namespace {

// Plain values and vectors of them appended to, and read back from, a byte string in one order.
class ByteWriter {
 public:
  template <typename T>
  void value(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  template <typename T>
  void values(const std::vector<T>& v) {
    value(static_cast<uint64_t>(v.size()));
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(T));
  }
  void text(const std::string& s) { values(std::vector<char>(s.begin(), s.end())); }
  std::vector<uint8_t> bytes;
};

class ByteReader {
 public:
  explicit ByteReader(const std::vector<uint8_t>& bytes) : bytes_(bytes) {}
  template <typename T>
  void value(T& v) {
    take(&v, sizeof(T));
  }
  template <typename T>
  void values(std::vector<T>& v) {
    uint64_t n = 0;
    value(n);
    PQ_ASSERT(n <= (bytes_.size() - at_) / sizeof(T), "QuantizedLinear::from_bytes: ", n, " values past the end");
    v.resize(n);
    take(v.data(), n * sizeof(T));
  }
  void text(std::string& s) {
    std::vector<char> c;
    values(c);
    s.assign(c.begin(), c.end());
  }

 private:
  void take(void* dst, size_t n) {
    PQ_ASSERT(n <= bytes_.size() - at_, "QuantizedLinear::from_bytes: ", n, " bytes past the end");
    if (n > 0) std::memcpy(dst, bytes_.data() + at_, n);
    at_ += n;
  }
  const std::vector<uint8_t>& bytes_;
  size_t at_ = 0;
};

}  // namespace

std::vector<uint8_t> QuantizedLinear::to_bytes() const {
  ByteWriter w;
  for (const int64_t v : {rows, cols, groups}) w.value(v);
  w.value(bits);
  w.values(q);
  w.values(scales);
  w.values(zeros);
  w.values(g_idx);
  for (const double v : {damp_used, relative_error, error2, solve_seconds}) w.value(v);
  w.value(static_cast<int32_t>(fallback));
  w.value(static_cast<uint64_t>(log.size()));
  for (const auto& line : log) w.text(line);
  return std::move(w.bytes);
}

QuantizedLinear QuantizedLinear::from_bytes(const std::vector<uint8_t>& bytes) {
  ByteReader r(bytes);
  QuantizedLinear ql;
  for (int64_t* v : {&ql.rows, &ql.cols, &ql.groups}) r.value(*v);
  r.value(ql.bits);
  r.values(ql.q);
  r.values(ql.scales);
  r.values(ql.zeros);
  r.values(ql.g_idx);
  for (double* v : {&ql.damp_used, &ql.relative_error, &ql.error2, &ql.solve_seconds}) r.value(*v);
  int32_t fallback = 0;
  r.value(fallback);
  ql.fallback = static_cast<Fallback>(fallback);
  uint64_t lines = 0;
  r.value(lines);
  ql.log.resize(lines);
  for (auto& line : ql.log) r.text(line);
  return ql;
}

}  // namespace pipequant
