// CpuBackend: the Llama block forward, the Hessian accumulation and the loss. Every loop parallelizes over
// independent outputs (rows, heads) and never splits a reduction across threads, so results do not depend
// on the thread count.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_backend.hpp"
#include "kernels/error.hpp"

namespace pipequant::kernels {

void CpuBackend::rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    // HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), computed in fp32, then times the weight
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + static_cast<double>(eps)));
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void CpuBackend::rope(float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim, const float* inv_freq) {
  const int64_t half = head_dim / 2;
  // cos/sin of pos * inv_freq, computed once per position in double (the reference is float64)
  std::vector<float> cos_t(static_cast<size_t>(seq * half)), sin_t(static_cast<size_t>(seq * half));
  for (int64_t p = 0; p < seq; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * static_cast<double>(inv_freq[i]);
      cos_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
      sin_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
    }
  const int64_t rows = samples * seq;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r % seq;
    const float* c = cos_t.data() + p * half;
    const float* s = sin_t.data() + p * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * heads * head_dim + h * head_dim;
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
  PQ_ASSERT(heads % kv_heads == 0, "heads ", heads, " not a multiple of kv_heads ", kv_heads);
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  // one (sample, head) per task; scratch is one row of scores per thread: O(seq), never samples x seq^2
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(seq));
    std::vector<double> acc(static_cast<size_t>(head_dim));
#pragma omp for schedule(static) collapse(2)
    for (int64_t s = 0; s < samples; ++s)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t kvh = h / group;
        const float* qb = q + s * seq * q_stride + h * head_dim;
        const float* kb = k + s * seq * kv_stride + kvh * head_dim;
        const float* vb = v + s * seq * kv_stride + kvh * head_dim;
        float* ob = out + s * seq * q_stride + h * head_dim;
        for (int64_t t = 0; t < seq; ++t) {
          const float* qt = qb + t * q_stride;
          float mx = -INFINITY;
          for (int64_t j = 0; j <= t; ++j) {
            const float* kj = kb + j * kv_stride;
            float d = 0.0f;
            for (int64_t i = 0; i < head_dim; ++i) d += qt[i] * kj[i];
            scores[static_cast<size_t>(j)] = d * scale;
            mx = std::max(mx, scores[static_cast<size_t>(j)]);
          }
          double denom = 0.0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j <= t; ++j) {
            const double p = std::exp(static_cast<double>(scores[static_cast<size_t>(j)] - mx));
            denom += p;
            const float* vj = vb + j * kv_stride;
            for (int64_t i = 0; i < head_dim; ++i) acc[static_cast<size_t>(i)] += p * vj[i];
          }
          float* ot = ob + t * q_stride;
          for (int64_t i = 0; i < head_dim; ++i) ot[i] = static_cast<float>(acc[static_cast<size_t>(i)] / denom);
        }
      }
  }
}

void CpuBackend::swiglu(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void CpuBackend::add(float* y, const float* x, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void CpuBackend::add_bias(float* y, const float* bias, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * n + i] += bias[i];
}

double CpuBackend::nll_sum(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab) {
  std::vector<double> per_row(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * vocab;
    float mx = l[0];
    for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, l[i]);
    double se = 0.0;
    for (int64_t i = 0; i < vocab; ++i) se += std::exp(static_cast<double>(l[i]) - mx);
    per_row[static_cast<size_t>(r)] = std::log(se) + mx - static_cast<double>(l[targets[r]]);
  }
  double total = 0.0;  // summed in row order: independent of the thread count
  for (double v : per_row) total += v;
  return total;
}

void CpuBackend::hessian_accumulate(const float* x, int64_t rows, int64_t k, float* h) {
  if (rows == 0) return;
  // upper triangle of h += x^T x, then mirrored so the full symmetric matrix is valid
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(k), static_cast<blasint>(rows), 1.0f, x,
              static_cast<blasint>(k), 1.0f, h, static_cast<blasint>(k));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < i; ++j) h[i * k + j] = h[j * k + i];
}

}  // namespace pipequant::kernels
