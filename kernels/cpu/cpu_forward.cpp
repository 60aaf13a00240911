// CpuBackend: the Llama block forward, the Hessian accumulation and the loss. Every loop parallelizes over
// independent outputs (rows, heads, query blocks) and never splits a reduction across threads, so results do
// not depend on the thread count.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "kernels/cpu/cpu_backend.hpp"

namespace pipequant::kernels {

namespace {

// Query rows whose scores are computed by one GEMM in attention: the scratch is kQueryBlock * seq floats per
// thread (1 MiB at seq 4096), and 64 rows are enough for the GEMM to run near peak.
inline constexpr int64_t kQueryBlock = 64;
// Tile edge of hessian_accumulate: a 256 x 256 x rows GEMM runs near peak on one core, and the grid has enough
// tiles (k / 256)^2 / 2 to keep all threads busy for the widths that matter (k >= 2048).
inline constexpr int64_t kHessianTile = 256;

// OpenBLAS takes 32-bit sizes; a size beyond that is a caller bug, not a user error.
blasint to_blas(int64_t v) {
  PQ_ASSERT(v >= 0 && v <= static_cast<int64_t>(std::numeric_limits<blasint>::max()), "BLAS size ", v, " out of range");
  return static_cast<blasint>(v);
}

// Independent accumulators in the softmax loops: one running max or sum is a chain of dependent instructions that
// bounds the loop at its latency; 8 lanes in a fixed order keep the result fixed and let the loop pipeline.
inline constexpr int64_t kLanes = 8;

// max of row[0, n), n >= 1
float row_max(const float* row, int64_t n) {
  float lane[kLanes];
  std::fill(lane, lane + kLanes, row[0]);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], row[j + l]);
  for (; j < n; ++j) lane[0] = std::max(lane[0], row[j]);
  return *std::max_element(lane, lane + kLanes);
}

// row[j] = exp(row[j] - mx) for j < n, in place; returns their sum, accumulated in double
double exp_shift_sum(float* row, int64_t n, float mx) {
  double lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      row[j + l] = std::exp(row[j + l] - mx);
      lane[l] += row[j + l];
    }
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - mx);
    lane[0] += row[j];
  }
  double sum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

}  // namespace

void CpuBackend::rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  PQ_ASSERT(dim > 0, "rms_norm: dim ", dim);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;  // [dim]
    float* yr = y + r * dim;        // [dim], may alias xr: element i is read before it is written
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    // HF LlamaRMSNorm: (x * rsqrt(mean(x^2) + eps)) in fp32, then times the weight
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + static_cast<double>(eps)));
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void CpuBackend::rope(float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim, const float* inv_freq) {
  PQ_ASSERT(head_dim % 2 == 0, "rope: head_dim ", head_dim, " is odd");
  const int64_t half = head_dim / 2;
  // cos/sin tables [seq, half], computed in double and rounded once (the reference is float64)
  std::vector<float> cos_t(static_cast<size_t>(seq * half)), sin_t(static_cast<size_t>(seq * half));
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t p = 0; p < seq; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * static_cast<double>(inv_freq[i]);
      cos_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
      sin_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
    }
  const int64_t rows = samples * seq;
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r % seq;
    const float* c = cos_t.data() + p * half;
    const float* s = sin_t.data() + p * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * head_dim;  // one head's vector [head_dim]
      // rotate_half: pairs (i, i + half), not interleaved (i, i + 1)
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

void CpuBackend::attention(const float* q, const float* k, const float* v, float* out, int64_t samples, int64_t seq,
                           int64_t heads, int64_t kv_heads, int64_t head_dim) {
  PQ_ASSERT(kv_heads > 0 && heads % kv_heads == 0, "attention: heads ", heads, " not a multiple of kv_heads ",
            kv_heads);
  if (samples == 0 || seq == 0 || heads == 0) return;
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * head_dim;      // row stride of q and out
  const int64_t kv_stride = kv_heads * head_dim;  // row stride of k and v
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t blocks = (seq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = samples * heads * blocks;
  // Scratch of the whole call: one [kQueryBlock, seq] score tile per thread, never samples * seq^2.
#pragma omp parallel num_threads(threads_)
  {
    std::vector<float> tile(static_cast<size_t>(std::min(kQueryBlock, seq) * seq));
    std::vector<double> denom(static_cast<size_t>(kQueryBlock));
    // One task = (sample, head, block of query rows). Tasks write disjoint outputs and each is computed the same
    // way whichever thread runs it, so dynamic scheduling (blocks differ in cost) keeps the result fixed.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t s = task / (heads * blocks);
      const int64_t h = (task / blocks) % heads;
      const int64_t b = blocks - 1 - task % blocks;  // the expensive late blocks first
      const int64_t t0 = b * kQueryBlock;
      const int64_t nq = std::min(kQueryBlock, seq - t0);  // query rows t0 .. t0 + nq - 1
      const int64_t nk = t0 + nq;                          // keys 0 .. nk - 1 are visible to some row
      const int64_t kvh = h / group;
      const float* qb = q + (s * seq + t0) * q_stride + h * head_dim;  // [nq, head_dim], ld q_stride
      const float* kb = k + s * seq * kv_stride + kvh * head_dim;      // [nk, head_dim], ld kv_stride
      const float* vb = v + s * seq * kv_stride + kvh * head_dim;      // [nk, head_dim], ld kv_stride
      float* ob = out + (s * seq + t0) * q_stride + h * head_dim;      // [nq, head_dim], ld q_stride
      float* sc = tile.data();                                         // scores [nq, nk], ld nk

      // scores = scale * Q K^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_blas(nq), to_blas(nk), to_blas(head_dim), scale, qb,
                  to_blas(q_stride), kb, to_blas(kv_stride), 0.0f, sc, to_blas(nk));
      // causal softmax numerators in place: exp(score - row max) for keys j <= t, exact 0 for the future
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t t = t0 + i;
        float* row = sc + i * nk;
        const float mx = row_max(row, t + 1);
        denom[static_cast<size_t>(i)] = exp_shift_sum(row, t + 1, mx);  // >= 1: the max term is exp(0)
        std::fill(row + t + 1, row + nk, 0.0f);
      }
      // out = P V, then divided by the softmax denominators
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_blas(nq), to_blas(head_dim), to_blas(nk), 1.0f, sc,
                  to_blas(nk), vb, to_blas(kv_stride), 0.0f, ob, to_blas(q_stride));
      for (int64_t i = 0; i < nq; ++i) {
        float* orow = ob + i * q_stride;
        const double d = denom[static_cast<size_t>(i)];
        for (int64_t e = 0; e < head_dim; ++e) orow[e] = static_cast<float>(orow[e] / d);
      }
    }
  }
}

void CpuBackend::swiglu(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];  // read before out[i] is written: out may alias gate
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void CpuBackend::add(float* y, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void CpuBackend::add_bias(float* y, const float* bias, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * n;  // [n]
    for (int64_t i = 0; i < n; ++i) yr[i] += bias[i];
  }
}

double CpuBackend::nll_sum(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab) {
  PQ_ASSERT(vocab > 0, "nll_sum: vocab ", vocab);
  std::vector<double> per_row(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * vocab;  // [vocab]
    const int64_t target = targets[r];
    PQ_ASSERT(target >= 0 && target < vocab, "nll_sum: target ", target, " outside [0, ", vocab, ")");
    double mx = l[0];
    for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, static_cast<double>(l[i]));
    double se = 0.0;
    for (int64_t i = 0; i < vocab; ++i) se += std::exp(static_cast<double>(l[i]) - mx);
    per_row[static_cast<size_t>(r)] = std::log(se) + mx - static_cast<double>(l[target]);
  }
  double total = 0.0;  // summed serially in row order: independent of the thread count
  for (const double v : per_row) total += v;
  return total;
}

void CpuBackend::hessian_accumulate(const float* x, int64_t rows, int64_t k, float* h) {
  if (rows == 0 || k == 0) return;
  // h[k, k] += x^T x with x [rows, k], split into a fixed grid of kHessianTile-wide tiles of the upper triangle,
  // each one single-threaded BLAS call. A threaded ssyrk partitions by the thread count and its bits change with
  // it; a fixed grid keeps every element's summation order the same for any number of threads.
  const int64_t tiles = (k + kHessianTile - 1) / kHessianTile;
  std::vector<std::pair<int64_t, int64_t>> upper;  // (tile row, tile column), row <= column
  upper.reserve(static_cast<size_t>(tiles * (tiles + 1) / 2));
  for (int64_t bj = 0; bj < tiles; ++bj)
    for (int64_t bi = 0; bi <= bj; ++bi) upper.emplace_back(bi, bj);
  const blasint ld = to_blas(k);
  const blasint n_rows = to_blas(rows);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
  for (size_t t = 0; t < upper.size(); ++t) {
    const int64_t i0 = upper[t].first * kHessianTile, i1 = std::min(k, i0 + kHessianTile);
    const int64_t j0 = upper[t].second * kHessianTile, j1 = std::min(k, j0 + kHessianTile);
    float* tile = h + i0 * k + j0;  // [i1 - i0, j1 - j0], ld k
    if (i0 == j0) {
      // diagonal tile: upper triangle by syrk, then mirrored inside the tile (what the caller left in the lower
      // triangle does not matter)
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, to_blas(j1 - j0), n_rows, 1.0f, x + j0, ld, 1.0f, tile, ld);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < i; ++j) h[i * k + j] = h[j * k + i];
    } else {
      // off-diagonal tile x[:, i0:i1]^T x[:, j0:j1], then its transpose into the lower tile (j, i), which no
      // other task writes
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_blas(i1 - i0), to_blas(j1 - j0), n_rows, 1.0f, x + i0, ld,
                  x + j0, ld, 1.0f, tile, ld);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) h[j * k + i] = h[i * k + j];
    }
  }
}

}  // namespace pipequant::kernels
