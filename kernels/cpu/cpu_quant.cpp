// CpuBackend: factorization, quantization grid and the GPTQ column loop.
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/cpu_backend.hpp"
#include "kernels/cpu/quant_grid.hpp"

namespace pipequant::kernels {

namespace {

// Rows handled together by one pass of the GPTQ column loop: the arithmetic runs across these rows in
// lockstep, so every per-column step (divide, round, clamp, update) is a SIMD operation with no reduction.
inline constexpr int64_t kLanes = 16;

// The tiled Cholesky: panel width, and the edge of the square tiles of the panel solve and trailing update.
inline constexpr int64_t kCholeskyPanel = 256;
inline constexpr int64_t kCholeskyTile = 512;

// In place: a [n, n] row-major, symmetric positive definite (lower triangle read) -> L lower with a = L L^T;
// the strict upper triangle is left with junk. Right-looking, by panels of kCholeskyPanel columns: factor the
// diagonal block (LAPACK), solve the panel below it and update the trailing lower triangle, both in
// kCholeskyTile tiles spread over the OpenMP threads. Tile shapes never depend on the thread count.
// Returns LAPACK's info: 0, or the 1-based column where positive definiteness failed, or < 0 for a NaN.
// OpenBLAS runs each call on one thread (see CpuBackend's constructor).
lapack_int tiled_cholesky_lower(float* a, int64_t n) {
  std::vector<std::pair<int64_t, int64_t>> tile_pairs;  // (row tile, column tile), column <= row
  for (int64_t k0 = 0; k0 < n; k0 += kCholeskyPanel) {
    const int64_t kb = std::min(kCholeskyPanel, n - k0);
    const int64_t k1 = k0 + kb;
    float* a11 = a + k0 * n + k0;
    // row-major lower of a symmetric block = column-major upper of the same memory (no LAPACKE transposition)
    const lapack_int info =
        LAPACKE_spotrf(LAPACK_COL_MAJOR, 'U', static_cast<lapack_int>(kb), a11, static_cast<lapack_int>(n));
    if (info != 0) return info > 0 ? info + static_cast<lapack_int>(k0) : info;
    const int64_t m = n - k1;  // rows below the panel
    if (m == 0) break;
    const int64_t tiles = (m + kCholeskyTile - 1) / kCholeskyTile;
    // A21 [m, kb] <- A21 L11^-T
#pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = k1 + t * kCholeskyTile;
      const int64_t rm = std::min(kCholeskyTile, n - r0);
      cblas_strsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, static_cast<blasint>(rm),
                  static_cast<blasint>(kb), 1.0f, a11, static_cast<blasint>(n), a + r0 * n + k0,
                  static_cast<blasint>(n));
    }
    // A22 [m, m] lower -= A21 A21^T
    tile_pairs.clear();
    for (int64_t ti = 0; ti < tiles; ++ti)
      for (int64_t tj = 0; tj <= ti; ++tj) tile_pairs.emplace_back(ti, tj);
    const int64_t pairs = static_cast<int64_t>(tile_pairs.size());
#pragma omp parallel for schedule(dynamic)
    for (int64_t p = 0; p < pairs; ++p) {
      const auto [ti, tj] = tile_pairs[static_cast<size_t>(p)];
      const int64_t r0 = k1 + ti * kCholeskyTile;
      const int64_t c0 = k1 + tj * kCholeskyTile;
      const int64_t rm = std::min(kCholeskyTile, n - r0);
      const int64_t cm = std::min(kCholeskyTile, n - c0);
      const float* ai = a + r0 * n + k0;  // A21 rows of the tile [rm, kb]
      const float* aj = a + c0 * n + k0;  // A21 rows of the tile's columns [cm, kb]
      float* c = a + r0 * n + c0;
      if (ti == tj)
        cblas_ssyrk(CblasRowMajor, CblasLower, CblasNoTrans, static_cast<blasint>(rm), static_cast<blasint>(kb), -1.0f,
                    ai, static_cast<blasint>(n), 1.0f, c, static_cast<blasint>(n));
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rm), static_cast<blasint>(cm),
                    static_cast<blasint>(kb), -1.0f, ai, static_cast<blasint>(n), aj, static_cast<blasint>(n), 1.0f, c,
                    static_cast<blasint>(n));
    }
  }
  return 0;
}

}  // namespace

bool CpuBackend::reverse_cholesky(float* h, int64_t n) {
  PQ_ASSERT(h != nullptr && n > 0, "reverse_cholesky: n = ", n);
  const int64_t nn = n * n;
  // J H J (J the exchange matrix) reverses both axes, which in row-major storage is the flat array reversed.
  const auto reverse_all = [h, nn] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nn / 2; ++i) std::swap(h[i], h[nn - 1 - i]);
  };
  reverse_all();
  // Row-major lower Cholesky J H J = L' L'^T, tiled so that the result does not depend on the thread count.
  const lapack_int info = tiled_cholesky_lower(h, n);
  // R = J L' J is upper triangular and R R^T = J L' L'^T J = H.
  reverse_all();
  if (info != 0) return false;
  bool finite = true;
#pragma omp parallel for schedule(static) reduction(&& : finite)
  for (int64_t i = 0; i < n; ++i) {
    const float* row = h + i * n;
    for (int64_t j = i; j < n; ++j) finite = finite && std::isfinite(row[j]);
  }
  if (!finite) return false;  // the strict lower triangle is kept for a retry, as after a failed factorization
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) std::fill(h + i * n, h + i * n + i, 0.0f);  // J H J's leftovers
  return true;
}

void CpuBackend::quant_params(const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid, float* scale,
                              float* zero, int64_t stride) {
  PQ_ASSERT(rows >= 0 && cols > 0 && ld >= cols, "quant_params: rows ", rows, " cols ", cols, " ld ", ld);
#pragma omp parallel for schedule(static) if (rows * cols > (int64_t{1} << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = w + r * ld;
    float lo = 0.0f, hi = 0.0f;  // the reference widens the range to include 0 anyway
    for (int64_t c = 0; c < cols; ++c) {
      lo = std::min(lo, x[c]);
      hi = std::max(hi, x[c]);
    }
    const ScaleZero p = params_from_range(lo, hi, grid);
    scale[r * stride] = p.scale;
    zero[r * stride] = p.zero;
  }
}

void CpuBackend::quantize(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros,
                          int64_t groups, const int32_t* param_of, QuantGrid grid, uint8_t* q, float* deq) {
  PQ_ASSERT(rows >= 0 && cols > 0 && groups > 0, "quantize: rows ", rows, " cols ", cols, " groups ", groups);
  const float maxq = static_cast<float>(grid.maxq());
#pragma omp parallel for schedule(static) if (rows * cols > (int64_t{1} << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = scales + r * groups;  // this row's table entries [groups]
    const float* z = zeros + r * groups;
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t p = param_of[c];
      const float code = quantize_code(w[r * cols + c], s[p], z[p], maxq);
      q[r * cols + c] = static_cast<uint8_t>(code);
      if (deq) deq[r * cols + c] = s[p] * (code - z[p]);
    }
  }
}

namespace {

// Columns [begin, begin + span) that one gptq_block call reads: its block, and every dynamic group that starts in
// it (groups may reach past the block).
struct BlockSpan {
  int64_t begin = 0;
  int64_t width = 0;          // columns of the block
  int64_t span = 0;           // columns of the block and of the groups starting in it
  bool group_starts = false;  // a dynamic group starts in the block
};

BlockSpan block_span(const GptqBlockArgs& a) {
  BlockSpan s;
  s.begin = a.begin;
  s.width = a.end - a.begin;
  int64_t span_end = a.end;
  const int64_t gsize = a.dynamic_group_size;
  if (gsize > 0) {
    const int64_t last_start = (a.end - 1) / gsize * gsize;
    s.group_starts = last_start >= a.begin;
    if (s.group_starts) span_end = std::max(span_end, std::min(a.cols, last_start + gsize));
  }
  s.span = span_end - a.begin;
  return s;
}

// R[c, c] for c in [begin, begin + span).
std::vector<float> span_diagonal(const GptqBlockArgs& a, const BlockSpan& s) {
  std::vector<float> rdiag(static_cast<size_t>(s.span));
  for (int64_t c = s.begin; c < s.begin + s.span; ++c) rdiag[static_cast<size_t>(c - s.begin)] = a.r[c * a.cols + c];
  return rdiag;
}

// ut [span, span]: ut[c * span + i] = U[begin + i, begin + c] for i <= c, the inverse of R's diagonal tile
// stored by columns. Column c solves R_tile u = e_c by back substitution in double; columns are independent.
std::vector<float> diagonal_tile_inverse(const GptqBlockArgs& a, const BlockSpan& s, const std::vector<float>& rdiag) {
  const int64_t begin = s.begin, span = s.span;
  std::vector<float> ut(static_cast<size_t>(span * span), 0.0f);
#pragma omp parallel
  {
    std::vector<double> u(static_cast<size_t>(span));
#pragma omp for schedule(dynamic, 8)
    for (int64_t c = 0; c < span; ++c) {
      u[static_cast<size_t>(c)] = 1.0 / static_cast<double>(rdiag[static_cast<size_t>(c)]);
      for (int64_t i = c - 1; i >= 0; --i) {
        const float* r_row = a.r + (begin + i) * a.cols + begin;  // R[begin + i, begin:]
        double sum = 0.0;
        for (int64_t t = i + 1; t <= c; ++t) sum += static_cast<double>(r_row[t]) * u[static_cast<size_t>(t)];
        u[static_cast<size_t>(i)] = -sum / static_cast<double>(rdiag[static_cast<size_t>(i)]);
      }
      for (int64_t i = 0; i <= c; ++i)
        ut[static_cast<size_t>(c * span + i)] = static_cast<float>(u[static_cast<size_t>(i)]);
    }
  }
  return ut;
}

// One thread's kLanes rows of the block, transposed (column-major within the tile) so that each column step is a
// contiguous kLanes-wide vector. Lanes at and past `live` are zero padding: zeros quantize to finite values and
// are never stored.
struct LaneTile {
  LaneTile(int64_t width, int64_t group_span)
      : wt(static_cast<size_t>(width * kLanes)),
        ot(static_cast<size_t>(width * kLanes)),
        qt(static_cast<size_t>(width * kLanes)),
        at(static_cast<size_t>(group_span * kLanes)) {}
  std::vector<float> wt;  // running weights times R[j, j], [width][kLanes]
  std::vector<float> ot;  // original weights in, residuals out, [width][kLanes]
  std::vector<float> qt;  // codes, [width][kLanes]
  std::vector<float> at;  // A = wc - w diag(R) over the span, [span][kLanes] (only with dynamic groups)
  float err[kLanes];      // per-row loss
  float scale[kLanes];    // the table entry in use
  float zero[kLanes];
  int32_t loaded = -1;  // which table entry scale/zero hold
  int64_t r0 = 0;       // first row of the tile
  int64_t live = 0;     // rows of the tile that exist
};

// Rows [r0, r0 + kLanes) of the block's running and original weights, and their loss so far.
void load_tile(const GptqBlockArgs& a, const BlockSpan& s, int64_t r0, LaneTile& t) {
  t.r0 = r0;
  t.live = std::min(kLanes, a.rows - r0);
  if (t.live < kLanes) {
    std::fill(t.wt.begin(), t.wt.end(), 0.0f);
    std::fill(t.ot.begin(), t.ot.end(), 0.0f);
  }
  for (int64_t l = 0; l < t.live; ++l) {
    const float* wc_row = a.wc + (r0 + l) * a.cols + s.begin;
    const float* w_row = a.w + (r0 + l) * a.cols + s.begin;
    for (int64_t jj = 0; jj < s.width; ++jj) {
      t.wt[static_cast<size_t>(jj * kLanes + l)] = wc_row[jj];
      t.ot[static_cast<size_t>(jj * kLanes + l)] = w_row[jj];
    }
  }
  std::fill(t.err, t.err + kLanes, 0.0f);
  for (int64_t l = 0; l < t.live; ++l) t.err[l] = a.err2[r0 + l];
  t.loaded = -1;
}

// A new dynamic group at column j: its table entry from the weights as the reference has them at this point (see
// gptq_block): w_c + sum_{begin <= i <= c} A_i U[i, c] for the group's columns c, A = wc - w diag(R).
void start_group(const GptqBlockArgs& a, const BlockSpan& s, const std::vector<float>& rdiag,
                 const std::vector<float>& ut, int64_t j, LaneTile& t) {
  const int64_t cols = a.cols, begin = s.begin, r0 = t.r0, live = t.live;
  const int64_t g = j / a.dynamic_group_size;
  const int64_t c_end = std::min(j + a.dynamic_group_size, cols);
  for (int64_t l = 0; l < live; ++l) {
    const float* wc_row = a.wc + (r0 + l) * cols;
    const float* w_row = a.w + (r0 + l) * cols;
    for (int64_t i = begin; i < c_end; ++i)
      t.at[static_cast<size_t>((i - begin) * kLanes + l)] =
          wc_row[i] - w_row[i] * rdiag[static_cast<size_t>(i - begin)];
  }
  float lo[kLanes] = {};
  float hi[kLanes] = {};
  for (int64_t c = j; c < c_end; ++c) {
    const float* u_col = ut.data() + (c - begin) * s.span;  // U[begin:c+1, c]
    float v[kLanes] = {};
    for (int64_t i = 0; i <= c - begin; ++i) {
      const float uic = u_col[i];
      const float* ai = t.at.data() + i * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) v[l] += ai[l] * uic;
    }
    for (int64_t l = 0; l < live; ++l) {
      const float x = a.w[(r0 + l) * cols + c] + v[l];
      lo[l] = std::min(lo[l], x);
      hi[l] = std::max(hi[l], x);
    }
  }
  for (int64_t l = 0; l < live; ++l) {
    const ScaleZero p = params_from_range(lo[l], hi[l], a.grid);
    a.scales[(r0 + l) * a.groups + g] = p.scale;
    a.zeros[(r0 + l) * a.groups + g] = p.zero;
  }
  t.loaded = -1;
}

// Table entry p of the tile's rows into scale/zero (padding lanes: scale 1, zero 0).
void load_params(const GptqBlockArgs& a, int32_t p, LaneTile& t) {
  for (int64_t l = 0; l < kLanes; ++l) {
    t.scale[l] = l < t.live ? a.scales[(t.r0 + l) * a.groups + p] : 1.0f;
    t.zero[l] = l < t.live ? a.zeros[(t.r0 + l) * a.groups + p] : 0.0f;
  }
  t.loaded = p;
}

// Column jj of the block: quantize it, keep the code and the residual, add the loss, and carry the residual into
// the block's later columns: wt[:, j'] += res * R[j, j'] (row j of R is contiguous). One function, so that the
// compiler contracts the same multiply-adds as the CUDA kernel assumes (see gptq_block_kernel).
void quantize_column(const GptqBlockArgs& a, const BlockSpan& s, int64_t jj, float rjj, float maxq, LaneTile& t) {
  float* wj = t.wt.data() + jj * kLanes;  // running weight of column j times R[j, j], [kLanes]
  float* oj = t.ot.data() + jj * kLanes;  // original weight in, residual out, [kLanes]
  float* qj = t.qt.data() + jj * kLanes;
  float res[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    const float x = wj[l] / rjj;
    const float code = quantize_code(x, t.scale[l], t.zero[l], maxq);
    const float deq = t.scale[l] * (code - t.zero[l]);
    const float e = (x - deq) * rjj;
    t.err[l] += e * e;
    qj[l] = code;
    res[l] = oj[l] - deq;
    oj[l] = res[l];
  }
  const float* r_row = a.r + (s.begin + jj) * a.cols + s.begin;
  for (int64_t jn = jj + 1; jn < s.width; ++jn) {
    const float rv = r_row[jn];
    float* wn = t.wt.data() + jn * kLanes;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) wn[l] += res[l] * rv;
  }
}

// The tile's codes, residuals and loss back to the row-major outputs.
void store_tile(const GptqBlockArgs& a, const BlockSpan& s, const LaneTile& t) {
  for (int64_t l = 0; l < t.live; ++l) {
    uint8_t* q_row = a.q + (t.r0 + l) * a.cols + s.begin;
    float* res_row = a.res + (t.r0 + l) * a.cols + s.begin;
    for (int64_t jj = 0; jj < s.width; ++jj) {
      q_row[jj] = static_cast<uint8_t>(t.qt[static_cast<size_t>(jj * kLanes + l)]);
      res_row[jj] = t.ot[static_cast<size_t>(jj * kLanes + l)];
    }
    a.err2[t.r0 + l] = t.err[l];
  }
}

}  // namespace

// The column loop in the reverse-Cholesky form (H = R R^T, R = U^-1 with U the reference's upper Cholesky
// factor of H^-1). With res_i = w_i - q_i the error the reference propagates is E = (W - Q) R, and the
// current value of column j is w_cur_j = (wc_j + sum_{begin <= i < j} res_i R[i, j]) / R[j, j].
//
// Dynamic group parameters read the weights the reference reads: its W after the lazy updates of earlier
// blocks only, W_c = w_c - sum_{i < begin} E_i U[i, c]. Because R U = I, that sum folds into the block:
// W_c = w_c + sum_{begin <= i <= c} A_i U[i, c], with A_i = wc_i - w_i R[i, i] (the lazy part of wc), so only
// the inverse of R's diagonal tile over the block and the groups that start in it is needed. (wc_c / R[c, c]
// is that value only for c = begin.)
//
// Rows are independent; kLanes rows at a time are copied transposed into small tiles (LaneTile) and the in-block
// update of the later columns reads row j of R, which is contiguous. Every row runs the same instruction
// sequence in whatever tile it lands, so the result does not depend on the thread count. The readable version
// of this loop is reference::gptq_columns (gptq_reference.hpp).
void CpuBackend::gptq_block(const GptqBlockArgs& a) {
  PQ_ASSERT(a.rows > 0 && a.cols > 0 && 0 <= a.begin && a.begin < a.end && a.end <= a.cols && a.groups > 0,
            "gptq_block: rows ", a.rows, " cols ", a.cols, " block [", a.begin, ", ", a.end, ") groups ", a.groups);
  PQ_ASSERT(a.r && a.w && a.wc && a.res && a.err2 && a.q && a.scales && a.zeros && a.param_of,
            "gptq_block: null pointer");
  PQ_ASSERT(a.dynamic_group_size >= 0, "gptq_block: dynamic_group_size ", a.dynamic_group_size);
  const BlockSpan s = block_span(a);
  const std::vector<float> rdiag = span_diagonal(a, s);
  const std::vector<float> ut = s.group_starts ? diagonal_tile_inverse(a, s, rdiag) : std::vector<float>();
  const float maxq = static_cast<float>(a.grid.maxq());
  const int64_t tiles = (a.rows + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    LaneTile t(s.width, s.group_starts ? s.span : 0);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      load_tile(a, s, tile * kLanes, t);
      for (int64_t jj = 0; jj < s.width; ++jj) {
        const int64_t j = s.begin + jj;
        if (a.dynamic_group_size > 0 && j % a.dynamic_group_size == 0) start_group(a, s, rdiag, ut, j, t);
        if (a.param_of[j] != t.loaded) load_params(a, a.param_of[j], t);
        quantize_column(a, s, jj, rdiag[static_cast<size_t>(jj)], maxq, t);
      }
      store_tile(a, s, t);
    }
  }
}

}  // namespace pipequant::kernels
