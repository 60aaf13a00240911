// GPTQ, RTN and the relative output error, written against the backend interface (DESIGN.md section 4).
#include "src/quant.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <sstream>

#include "base/error.hpp"
#include "base/timing.hpp"

namespace pipequant {

namespace {

using kernels::Backend;
using kernels::Buffer;
using kernels::QuantGrid;
using kernels::Trans;

// Columns per panel of the two-level lazy update: after each block only the rest of its panel is updated
// (a GEMM with inner dimension block_size); after a whole panel the columns beyond it get one update with
// inner dimension panel width, which runs near the machine's GEMM peak. Same flop count as one update per
// block.
inline constexpr int64_t kPanelColumns = 1024;
// relative_output_error works on row chunks whose stacked [W; D] holds at most this many floats.
inline constexpr int64_t kErrorChunkFloats = int64_t{1} << 25;
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

// The panel width: a multiple of the block size and, with dynamic groups, of the group size, so that a
// group starting inside a panel ends inside it (its parameters read columns that must be up to date).
// Falls back to the whole matrix (one update per block) when no such width near kPanelColumns exists.
int64_t panel_width(int64_t block, int64_t dynamic_group, int64_t cols) {
  int64_t unit = block;
  if (dynamic_group > 0) unit = std::lcm(block, dynamic_group);
  if (unit >= cols) return cols;
  return std::max<int64_t>(1, kPanelColumns / unit) * unit;
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
  int64_t bad = -1;
#pragma omp parallel for schedule(static) reduction(max : bad)
  for (int64_t i = 0; i < rows * cols; ++i)
    if (!std::isfinite(w[i])) bad = std::max(bad, i);
  PQ_REQUIRE(bad < 0, "quantize: the weights hold a non-finite value (at row ", bad / std::max<int64_t>(cols, 1),
             ", column ", bad % std::max<int64_t>(cols, 1), "); check the checkpoint");
}

// Backend memory that gptq_quantize (and rtn_quantize with an error check) holds at its peak, bounding both of
// its phases: the solve (R [cols, cols], w, wc and res [rows, cols], the codes, the tables) and the error check
// (H and the stacked [W; D] chunk with its product, at most four [rows, cols] floats).
size_t solve_bytes(int64_t rows, int64_t cols, int64_t groups) {
  const auto r = static_cast<size_t>(rows), c = static_cast<size_t>(cols), g = static_cast<size_t>(groups);
  return sizeof(float) * (c * c + 4 * r * c + 2 * r * g + r + c) + r * c;
}

// The backend that runs a solve of this size: `backend` when it fits its budget (or there is no budget or no
// host fallback), its host fallback otherwise, with a line for the log.
Backend& solve_backend(Backend& backend, int64_t rows, int64_t cols, int64_t groups, const std::string& label,
                       std::vector<std::string>& log) {
  Backend* host = backend.host_fallback();
  const size_t need = solve_bytes(rows, cols, groups), room = backend.free_budget_bytes();
  if (host == nullptr || need <= room) return backend;
  std::ostringstream os;
  os << label << ": the solve needs " << need / 1e9 << " GB of " << backend.name() << " memory, " << room / 1e9
     << " GB of the budget are free: solved on the " << host->name();
  log.push_back(os.str());
  return *host;
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
  PQ_REQUIRE(!(config.act_order && config.static_groups && config.group_size == -1),
             "--static-groups with --act-order needs a --group-size (got -1, one group per row)");
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

double relative_output_error(Backend& backend, const float* w, const float* wq, int64_t rows, int64_t cols,
                             const float* h) {
  PQ_ASSERT(w && wq && h && rows > 0 && cols > 0, "relative_output_error: bad arguments");
  Buffer<float> hb(backend, cols * cols);
  upload(backend, hb, h, cols * cols);
  const int64_t chunk = std::clamp<int64_t>(kErrorChunkFloats / (2 * cols), 1, rows);
  std::vector<float> stacked(static_cast<size_t>(2 * chunk * cols));  // [W_chunk; D_chunk] [2 * chunk, cols]
  std::vector<float> product(stacked.size());                         // stacked @ H
  Buffer<float> sb(backend, 2 * chunk * cols);
  Buffer<float> pb(backend, 2 * chunk * cols);
  std::vector<double> num_rows(static_cast<size_t>(rows));
  std::vector<double> den_rows(static_cast<size_t>(rows));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0);
    std::copy(w + r0 * cols, w + (r0 + m) * cols, stacked.begin());
    for (int64_t i = 0; i < m * cols; ++i)
      stacked[static_cast<size_t>(m * cols + i)] = w[r0 * cols + i] - wq[r0 * cols + i];
    upload(backend, sb, stacked.data(), 2 * m * cols);
    backend.gemm(Trans::kNo, Trans::kNo, 2 * m, cols, cols, 1.0f, sb.data(), cols, hb.data(), cols, 0.0f, pb.data(),
                 cols);
    download(backend, product.data(), pb, 2 * m * cols);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; ++r) {
      double den = 0.0, num = 0.0;
      const float* wr = stacked.data() + r * cols;
      const float* dr = stacked.data() + (m + r) * cols;
      const float* pw = product.data() + r * cols;
      const float* pd = product.data() + (m + r) * cols;
      for (int64_t c = 0; c < cols; ++c) {
        den += static_cast<double>(wr[c]) * pw[c];
        num += static_cast<double>(dr[c]) * pd[c];
      }
      den_rows[static_cast<size_t>(r0 + r)] = den;
      num_rows[static_cast<size_t>(r0 + r)] = num;
    }
  }
  // the totals in row order, whatever the thread count
  double num = 0.0, den = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    num += num_rows[static_cast<size_t>(r)];
    den += den_rows[static_cast<size_t>(r)];
  }
  return den == 0.0 ? 0.0 : num / den;
}

QuantizedLinear rtn_quantize(Backend& primary, const float* w, int64_t rows, int64_t cols, const float* h,
                             const QuantConfig& config) {
  check_inputs(w, rows, cols, config);
  const QuantGrid grid{config.bits, config.sym};
  const int64_t groups = group_count(cols, config.group_size);
  std::vector<std::string> moved;  // RTN is the baseline: where it ran is not a fallback of the layer
  Backend& backend = solve_backend(primary, rows, cols, groups, "rtn", moved);
  QuantizedLinear out;
  out.rows = rows;
  out.cols = cols;
  out.groups = groups;
  out.bits = config.bits;
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

QuantizedLinear gptq_quantize(Backend& primary, const float* w, int64_t rows, int64_t cols, const float* h,
                              const QuantConfig& config, const std::string& name) {
  check_inputs(w, rows, cols, config);
  PQ_REQUIRE(h != nullptr, "gptq_quantize: ", name, ": no Hessian given");
  const QuantGrid grid{config.bits, config.sym};
  const int64_t gs = config.group_size;
  const int64_t groups = group_count(cols, gs);
  const int64_t kk = cols * cols;
  const std::string label = name.empty() ? std::string("linear") : name;
  // fallback (3): a solve that does not fit the device budget runs on the host backend
  std::vector<std::string> moved;
  Backend& backend = solve_backend(primary, rows, cols, groups, label, moved);
  if (&backend != &primary) {
    QuantizedLinear out = gptq_quantize(backend, w, rows, cols, h, config, name);
    out.log.insert(out.log.begin(), moved.begin(), moved.end());
    if (out.fallback == "none") out.fallback = "cpu";  // a damping or RTN fallback on the host says more
    return out;
  }

  // A non-finite Hessian cannot be fixed by damping: round to nearest right away.
  bool finite = true;
#pragma omp parallel for schedule(static) reduction(&& : finite)
  for (int64_t i = 0; i < kk; ++i) finite = finite && std::isfinite(h[i]);
  if (!finite) {
    QuantizedLinear out = rtn_quantize(backend, w, rows, cols, h, config);
    out.fallback = "rtn";
    out.damp_used = config.damp;
    out.log.push_back(label + ": Hessian has non-finite values, falling back to round-to-nearest");
    return out;
  }

  // Dead inputs (never active in the calibration data): H[i, i] = 1 and W[:, i] = 0, as the reference does.
  std::vector<float> diag(static_cast<size_t>(cols));  // diag(H) with the dead entries set to 1
  std::vector<char> dead(static_cast<size_t>(cols), 0);
  for (int64_t i = 0; i < cols; ++i) {
    diag[static_cast<size_t>(i)] = h[i * cols + i];
    if (diag[static_cast<size_t>(i)] == 0.0f) {
      dead[static_cast<size_t>(i)] = 1;
      diag[static_cast<size_t>(i)] = 1.0f;
    }
  }

  // Act-order: columns by decreasing diag(H); a stable sort keeps ties in input order (deterministic).
  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (config.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&diag](int64_t x, int64_t y) {
      return diag[static_cast<size_t>(x)] > diag[static_cast<size_t>(y)];
    });

  // Which table entry quantizes each processing position, and where the entries come from.
  const bool tables_up_front = gs <= 0 || config.static_groups;
  std::vector<int32_t> param_of(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    int64_t p = 0;
    if (gs > 0) p = config.static_groups ? perm[static_cast<size_t>(j)] / gs : j / gs;
    param_of[static_cast<size_t>(j)] = static_cast<int32_t>(p);
  }

  QuantizedLinear out;
  out.rows = rows;
  out.cols = cols;
  out.groups = groups;
  out.bits = config.bits;
  out.g_idx.resize(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    out.g_idx[static_cast<size_t>(perm[static_cast<size_t>(j)])] = param_of[static_cast<size_t>(j)];

  // Row r of W in processing order with dead columns zeroed, each column times col_scale[j] (or 1).
  std::vector<float> staging;
  const auto fill_w = [&](const float* col_scale) {
    return [&, col_scale](int64_t r0, int64_t r1, float* dst) {
#pragma omp parallel for schedule(static)
      for (int64_t r = r0; r < r1; ++r) {
        const float* src = w + r * cols;
        float* row = dst + (r - r0) * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t c = perm[static_cast<size_t>(j)];
          const float v = dead[static_cast<size_t>(c)] ? 0.0f : src[c];
          row[j] = col_scale ? v * col_scale[j] : v;
        }
      }
    };
  };

  Buffer<float> wb(backend, rows * cols);    // original weights, processing order, dead columns zeroed
  Buffer<float> wcb(backend, rows * cols);   // running weights (see GptqBlockArgs::wc)
  Buffer<float> sb(backend, rows * groups);  // scale table [rows, groups]
  Buffer<float> zb(backend, rows * groups);  // zero table [rows, groups]
  if (tables_up_front) {
    // Static groups come from the dead-zeroed weights in natural column order; the per-row parameters from
    // the weights as given, because the reference sets its quantizer up before it zeroes dead columns.
    if (gs > 0) {
      upload_rows(backend, wcb.data(), rows, cols, staging, [&](int64_t r0, int64_t r1, float* dst) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = 0; c < cols; ++c)
            dst[(r - r0) * cols + c] = dead[static_cast<size_t>(c)] ? 0.0f : w[r * cols + c];
      });
    } else {
      upload(backend, wcb, w, rows * cols);
    }
    natural_group_params(backend, wcb.data(), rows, cols, gs, grid, sb.data(), zb.data(), groups);
  }
  upload_rows(backend, wb.data(), rows, cols, staging, fill_w(nullptr));

  double diag_sum = 0.0;
  for (int64_t a = 0; a < cols; ++a) diag_sum += diag[static_cast<size_t>(perm[static_cast<size_t>(a)])];
  const double diag_mean = diag_sum / static_cast<double>(cols);

  const auto t_solve = std::chrono::steady_clock::now();
  Buffer<float> rb(backend, kk);  // H_damped, then R [cols, cols]
  double damp = config.damp;
  bool factored = false;
  for (int attempt = 0; attempt <= config.damp_retries; ++attempt) {
    // H in processing order, dead diagonal fixed, damped: built from h on every try (the factorization
    // overwrites it)
    const float add = static_cast<float>(damp * diag_mean);
    upload_rows(backend, rb.data(), cols, cols, staging, [&](int64_t a0, int64_t a1, float* dst) {
#pragma omp parallel for schedule(static)
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t pa = perm[static_cast<size_t>(a)];
        const float* src = h + pa * cols;
        float* row = dst + (a - a0) * cols;
        for (int64_t b = 0; b < cols; ++b) row[b] = src[perm[static_cast<size_t>(b)]];
        row[a] = diag[static_cast<size_t>(pa)] + add;
      }
    });
    if (backend.reverse_cholesky(rb.data(), cols)) {
      factored = true;
      break;
    }
    if (attempt < config.damp_retries) {
      out.log.push_back(label + ": Cholesky failed with damp " + format_damp(damp) + ", retrying with " +
                        format_damp(damp * 10.0));
      damp *= 10.0;
    } else {
      out.log.push_back(label + ": Cholesky failed with damp " + format_damp(damp) + " after " +
                        std::to_string(config.damp_retries) + " retries, falling back to round-to-nearest");
    }
  }
  if (!factored) {
    rb.reset();
    wb.reset();
    wcb.reset();
    QuantizedLinear rtn = rtn_quantize(backend, w, rows, cols, h, config);
    rtn.fallback = "rtn";
    rtn.damp_used = damp;
    rtn.log = std::move(out.log);
    return rtn;
  }
  out.damp_used = damp;
  out.fallback = damp != config.damp ? "damp" : "none";

  // wc[:, j] = w[:, j] * R[j, j]. The diagonal is fetched element by element: K tiny copies instead of the
  // whole K x K factor, which matters on a device backend.
  std::vector<float> rdiag(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    backend.download(&rdiag[static_cast<size_t>(j)], rb.data() + j * cols + j, sizeof(float));
  upload_rows(backend, wcb.data(), rows, cols, staging, fill_w(rdiag.data()));
  staging = std::vector<float>();

  Buffer<float> resb(backend, rows * cols);  // w - dequant(q), processing order
  Buffer<uint8_t> qb(backend, rows * cols);  // codes, processing order
  Buffer<float> err2b(backend, rows);
  Buffer<int32_t> pob(backend, cols);
  upload(backend, pob, param_of.data(), cols);
  {
    const std::vector<float> zero_rows(static_cast<size_t>(rows), 0.0f);
    upload(backend, err2b, zero_rows.data(), rows);
  }

  kernels::GptqBlockArgs args;
  args.rows = rows;
  args.cols = cols;
  args.r = rb.data();
  args.w = wb.data();
  args.wc = wcb.data();
  args.res = resb.data();
  args.err2 = err2b.data();
  args.q = qb.data();
  args.scales = sb.data();
  args.zeros = zb.data();
  args.groups = groups;
  args.param_of = pob.data();
  args.dynamic_group_size = tables_up_front ? 0 : gs;
  args.grid = grid;
  // Columns beyond the current panel lag behind the GptqBlockArgs::wc invariant until the panel is done;
  // gptq_block reads wc only in its block and in groups starting there, which panel_width keeps in the panel.
  const int64_t block = config.block_size;
  const int64_t panel = panel_width(block, args.dynamic_group_size, cols);
  for (int64_t p0 = 0; p0 < cols; p0 += panel) {
    const int64_t p1 = std::min(p0 + panel, cols);
    for (int64_t b0 = p0; b0 < p1; b0 += block) {
      const int64_t b1 = std::min(b0 + block, p1);
      args.begin = b0;
      args.end = b1;
      backend.gptq_block(args);
      // wc[:, b1:p1] += res[:, b0:b1] @ R[b0:b1, b1:p1]: the rest of this panel
      if (b1 < p1)
        backend.gemm(Trans::kNo, Trans::kNo, rows, p1 - b1, b1 - b0, 1.0f, resb.data() + b0, cols,
                     rb.data() + b0 * cols + b1, cols, 1.0f, wcb.data() + b1, cols);
    }
    // wc[:, p1:] += res[:, p0:p1] @ R[p0:p1, p1:]: everything after the panel
    if (p1 < cols)
      backend.gemm(Trans::kNo, Trans::kNo, rows, cols - p1, p1 - p0, 1.0f, resb.data() + p0, cols,
                   rb.data() + p0 * cols + p1, cols, 1.0f, wcb.data() + p1, cols);
  }
  std::vector<uint8_t> qp(static_cast<size_t>(rows * cols));
  download(backend, qp.data(), qb, rows * cols);
  std::vector<float> scales_rg(static_cast<size_t>(rows * groups)), zeros_rg(static_cast<size_t>(rows * groups));
  download(backend, scales_rg.data(), sb, rows * groups);
  download(backend, zeros_rg.data(), zb, rows * groups);
  out.solve_seconds = seconds_since(t_solve);
  rb.reset();
  wb.reset();
  wcb.reset();
  resb.reset();
  qb.reset();

  // back to natural column order
  out.q.resize(static_cast<size_t>(rows * cols));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      out.q[static_cast<size_t>(r * cols + perm[static_cast<size_t>(j)])] = qp[static_cast<size_t>(r * cols + j)];
  transpose_tables(scales_rg, zeros_rg, rows, groups, out);
  const std::vector<float> wq = out.dequantize();
  out.relative_error = relative_output_error(backend, w, wq.data(), rows, cols, h);
  return out;
}

}  // namespace pipequant
