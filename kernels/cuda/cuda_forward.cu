// CudaBackend: the Llama block forward, the loss and the Hessian accumulation. The CPU versions in
// kernels/cpu/cpu_forward.cpp are the specification.
#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_backend.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/cuda_common.cuh"
#include "base/error.hpp"

namespace pipequant::kernels {

namespace {

inline constexpr int kElementwiseThreads = 256;
inline constexpr int kRowThreads = 256;  // one block per row: rms_norm, nll

// --- rms_norm ----------------------------------------------------------------------------------------------------

// x, y [rows, dim] (y may alias x: every element is read and written by the same thread); weight [dim].
// As the CPU backend: the sum of squares in double, 1 / sqrt(mean + eps) in double rounded to float, then
// weight * (x * inv); only the order of the double additions differs.
__global__ void rms_norm_kernel(const float* x, const float* weight, float* y, int64_t dim, float eps) {
  __shared__ double scratch[kWarpSize];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* yr = y + row * dim;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(xr[i]) * xr[i];
  sum = block_reduce(sum, scratch, SumOp<double>{});
  const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dim) + static_cast<double>(eps)));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = weight[i] * (xr[i] * inv);
}

void launch_rms_norm(cudaStream_t stream, const float* x, const float* weight, float* y, int64_t rows, int64_t dim,
                     float eps) {
  PQ_ASSERT(rows >= 0 && dim > 0, "rms_norm: rows ", rows, " dim ", dim);
  if (rows == 0) return;
  PQ_ASSERT(x && weight && y, "rms_norm: null pointer");
  PQ_ASSERT(rows < (int64_t{1} << 31), "rms_norm: too many rows ", rows);
  rms_norm_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(x, weight, y, dim, eps);
  CUDA_CHECK_LAUNCH();
}

// --- rope --------------------------------------------------------------------------------------------------------

// x [rows, heads * head_dim] in place; inv_freq [head_dim / 2]. One thread per (row, i < head_dim / 2): the
// angle pos * inv_freq[i] and its cos/sin in double, rounded to float, then applied to every head of the row
// (HF rotate_half: x1 = x[i], x2 = x[i + half]; x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin).
__global__ void rope_kernel(float* x, int64_t rows, int64_t seq, int64_t heads, int64_t head_dim,
                            const float* inv_freq) {
  const int64_t half = head_dim / 2;
  const int64_t total = rows * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = idx / half;
    const int64_t i = idx - row * half;
    const double angle = static_cast<double>(row % seq) * static_cast<double>(inv_freq[i]);
    double sin_d, cos_d;
    sincos(angle, &sin_d, &cos_d);
    const float c = static_cast<float>(cos_d);
    const float s = static_cast<float>(sin_d);
    float* xr = x + row * heads * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = xr + h * head_dim;
      const float x1 = xh[i];
      const float x2 = xh[i + half];
      xh[i] = x1 * c - x2 * s;
      xh[i + half] = x2 * c + x1 * s;
    }
  }
}

void launch_rope(cudaStream_t stream, float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim,
                 const float* inv_freq) {
  PQ_ASSERT(samples >= 0 && seq > 0 && heads > 0 && head_dim > 0 && head_dim % 2 == 0, "rope: samples ", samples,
            " seq ", seq, " heads ", heads, " head_dim ", head_dim);
  if (samples == 0) return;
  PQ_ASSERT(x && inv_freq, "rope: null pointer");
  const int64_t rows = samples * seq;
  rope_kernel<<<grid_for(rows * (head_dim / 2), kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      x, rows, seq, heads, head_dim, inv_freq);
  CUDA_CHECK_LAUNCH();
}

// --- attention ---------------------------------------------------------------------------------------------------

// Flash-attention style, fp32: one block per (64-query tile, head, sample); keys and values stream through
// shared memory 32 at a time with an online softmax, so scratch is independent of the sequence length.
// Warp w owns query rows [8w, 8w + 8) of the tile; for a key tile, lane l scores key l against each of its rows,
// and holds dims l, l + 32, ... of each row's output accumulator.
inline constexpr int kAttnQueries = 64;
inline constexpr int kAttnKeys = kWarpSize;
inline constexpr int kAttnWarps = 8;
inline constexpr int kAttnRows = kAttnQueries / kAttnWarps;  // query rows per warp

template <int kDimsPerLane>
constexpr size_t attention_smem_bytes() {
  constexpr int dims = kDimsPerLane * kWarpSize;
  return sizeof(float) * (size_t{kAttnQueries} * dims + size_t{kAttnKeys} * (dims + 1) + size_t{kAttnKeys} * dims);
}

// q, out [samples * seq, heads * head_dim]; k, v [samples * seq, kv_heads * head_dim]; head_dim <= 32 *
// kDimsPerLane. Shared: q_s [64][dims], k_s [32][dims + 1] (padded: lanes read different rows), v_s [32][dims].
template <int kDimsPerLane>
__global__ void __launch_bounds__(kAttnWarps* kWarpSize)
    attention_kernel(const float* q, const float* k, const float* v, float* out, int64_t seq, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, float softmax_scale) {
  constexpr int dims = kDimsPerLane * kWarpSize;
  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_s = q_s + kAttnQueries * dims;
  float* v_s = k_s + kAttnKeys * (dims + 1);

  const int64_t q0 = int64_t{blockIdx.x} * kAttnQueries;
  const int64_t h = blockIdx.y;
  const int64_t sample = blockIdx.z;
  const int64_t kvh = h / (heads / kv_heads);
  const int64_t q_stride = heads * head_dim;    // between rows of q and out
  const int64_t kv_stride = kv_heads * head_dim;  // between rows of k and v
  const int hd = static_cast<int>(head_dim);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int threads = blockDim.x;

  // the query tile, zero-padded past the sequence end and past head_dim
  for (int e = threadIdx.x; e < kAttnQueries * dims; e += threads) {
    const int r = e / dims;
    const int d = e % dims;
    const int64_t pos = q0 + r;
    q_s[e] = (pos < seq && d < hd) ? q[(sample * seq + pos) * q_stride + h * head_dim + d] : 0.0f;
  }

  float m[kAttnRows], l[kAttnRows], acc[kAttnRows][kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kAttnRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) acc[r][t] = 0.0f;
  }
  const int64_t first_row = q0 + int64_t{warp} * kAttnRows;  // this warp's first query position
  const int64_t key_end = min(seq, q0 + kAttnQueries);        // causal: no key past the tile's last query

  for (int64_t k0 = 0; k0 < key_end; k0 += kAttnKeys) {
    __syncthreads();  // the previous tile is no longer read (and, at the start, q_s is written)
    for (int e = threadIdx.x; e < kAttnKeys * dims; e += threads) {
      const int r = e / dims;
      const int d = e % dims;
      const int64_t pos = k0 + r;
      const bool in = pos < seq && d < hd;
      const int64_t src = (sample * seq + pos) * kv_stride + kvh * head_dim + d;
      k_s[r * (dims + 1) + d] = in ? k[src] : 0.0f;
      v_s[r * dims + d] = in ? v[src] : 0.0f;
    }
    __syncthreads();
    if (k0 > first_row + kAttnRows - 1) continue;  // every key of this tile is in the future for this warp

    // scores of key k0 + lane against the warp's rows
    float s[kAttnRows];
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r) s[r] = 0.0f;
    const float* k_row = k_s + lane * (dims + 1);
    for (int d = 0; d < hd; ++d) {
      const float kd = k_row[d];
#pragma unroll
      for (int r = 0; r < kAttnRows; ++r) s[r] = fmaf(q_s[(warp * kAttnRows + r) * dims + d], kd, s[r]);
    }
    const int64_t key = k0 + lane;
    float p[kAttnRows], alpha[kAttnRows];
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r) {
      const bool visible = key <= first_row + r && key < seq;
      const float score = visible ? s[r] * softmax_scale : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(score));  // finite: key 0 is visible to every row in tile 0
      p[r] = visible ? expf(score - m_new) : 0.0f;
      alpha[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
      l[r] = l[r] * alpha[r] + warp_sum(p[r]);
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) acc[r][t] *= alpha[r];
    }
    for (int j = 0; j < kAttnKeys; ++j) {
      float vj[kDimsPerLane];
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) vj[t] = v_s[j * dims + lane + t * kWarpSize];
#pragma unroll
      for (int r = 0; r < kAttnRows; ++r) {
        const float pj = __shfl_sync(kFullMask, p[r], j);
#pragma unroll
        for (int t = 0; t < kDimsPerLane; ++t) acc[r][t] = fmaf(pj, vj[t], acc[r][t]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kAttnRows; ++r) {
    const int64_t pos = first_row + r;
    if (pos >= seq) continue;
    float* o = out + (sample * seq + pos) * q_stride + h * head_dim;
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) {
      const int d = lane + t * kWarpSize;
      if (d < hd) o[d] = acc[r][t] / l[r];
    }
  }
}

template <int kDimsPerLane>
void launch_attention_with(cudaStream_t stream, const float* q, const float* k, const float* v, float* out,
                           int64_t samples, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           float softmax_scale) {
  constexpr size_t smem = attention_smem_bytes<kDimsPerLane>();
  if constexpr (smem > 48 * 1024) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_kernel<kDimsPerLane>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(seq, kAttnQueries)), static_cast<unsigned>(heads),
                  static_cast<unsigned>(samples));
  attention_kernel<kDimsPerLane><<<grid, kAttnWarps * kWarpSize, smem, stream>>>(q, k, v, out, seq, heads, kv_heads,
                                                                                 head_dim, softmax_scale);
}

void launch_attention(cudaStream_t stream, const float* q, const float* k, const float* v, float* out, int64_t samples,
                      int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  PQ_ASSERT(samples >= 0 && seq > 0 && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0,
            "attention: samples ", samples, " seq ", seq, " heads ", heads, " kv_heads ", kv_heads, " head_dim ",
            head_dim);
  PQ_ASSERT(head_dim <= 8 * kWarpSize, "attention: head_dim ", head_dim, " above the supported 256");
  PQ_ASSERT(samples < 65536 && heads < 65536 && ceil_div(seq, kAttnQueries) < (int64_t{1} << 31),
            "attention: grid too large: samples ", samples, " heads ", heads, " seq ", seq);
  if (samples == 0) return;
  PQ_ASSERT(q && k && v && out, "attention: null pointer");
  const float softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (head_dim <= 2 * kWarpSize) {
    launch_attention_with<2>(stream, q, k, v, out, samples, seq, heads, kv_heads, head_dim, softmax_scale);
  } else if (head_dim <= 4 * kWarpSize) {
    launch_attention_with<4>(stream, q, k, v, out, samples, seq, heads, kv_heads, head_dim, softmax_scale);
  } else {
    launch_attention_with<8>(stream, q, k, v, out, samples, seq, heads, kv_heads, head_dim, softmax_scale);
  }
  CUDA_CHECK_LAUNCH();
}

// --- elementwise -------------------------------------------------------------------------------------------------

// gate, up, out [n]; out may alias gate.
__global__ void swiglu_kernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

void launch_swiglu(cudaStream_t stream, const float* gate, const float* up, float* out, int64_t n) {
  PQ_ASSERT(n >= 0, "swiglu: n ", n);
  if (n == 0) return;
  PQ_ASSERT(gate && up && out, "swiglu: null pointer");
  swiglu_kernel<<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(gate, up, out, n);
  CUDA_CHECK_LAUNCH();
}

// y [n] += x [n]
__global__ void add_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    y[i] += x[i];
}

void launch_add(cudaStream_t stream, float* y, const float* x, int64_t n) {
  PQ_ASSERT(n >= 0, "add: n ", n);
  if (n == 0) return;
  PQ_ASSERT(y && x, "add: null pointer");
  add_kernel<<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(y, x, n);
  CUDA_CHECK_LAUNCH();
}

// y [rows, n] += bias [n]
__global__ void add_bias_kernel(float* y, const float* bias, int64_t total, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x)
    y[i] += bias[i % n];
}

void launch_add_bias(cudaStream_t stream, float* y, const float* bias, int64_t rows, int64_t n) {
  PQ_ASSERT(rows >= 0 && n > 0, "add_bias: rows ", rows, " n ", n);
  if (rows == 0) return;
  PQ_ASSERT(y && bias, "add_bias: null pointer");
  add_bias_kernel<<<grid_for(rows * n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(y, bias, rows * n, n);
  CUDA_CHECK_LAUNCH();
}

// --- loss --------------------------------------------------------------------------------------------------------

// logits [rows, vocab], targets [rows] -> nll [rows] = logsumexp(row) - row[target]. As the CPU backend: the
// row max in fp32, exp(x - max) and its sum in double. A target outside [0, vocab) sets *flag = 1 (every
// writer stores the same constant).
__global__ void nll_rows_kernel(const float* logits, const int32_t* targets, int64_t vocab, double* nll, int* flag) {
  __shared__ float scratch_f[kWarpSize];
  __shared__ double scratch_d[kWarpSize];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
  mx = block_reduce(mx, scratch_f, MaxOp{});
  const double mxd = mx;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) part += exp(static_cast<double>(x[i]) - mxd);
  const double sum = block_reduce(part, scratch_d, SumOp<double>{});
  if (threadIdx.x == 0) {
    const int32_t target = targets[row];
    if (target < 0 || target >= vocab) {
      *flag = 1;
      nll[row] = 0.0;
    } else {
      nll[row] = log(sum) + mxd - static_cast<double>(x[target]);
    }
  }
}

void launch_nll_rows(cudaStream_t stream, const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     double* nll, int* flag) {
  PQ_ASSERT(rows > 0 && vocab > 0, "nll_sum: rows ", rows, " vocab ", vocab);
  PQ_ASSERT(rows < (int64_t{1} << 31), "nll_sum: too many rows ", rows);
  PQ_ASSERT(logits && targets && nll && flag, "nll_sum: null pointer");
  nll_rows_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(logits, targets, vocab, nll, flag);
  CUDA_CHECK_LAUNCH();
}

// --- Hessian -----------------------------------------------------------------------------------------------------

inline constexpr int kMirrorTile = 32;

// h [n, n]: the row-major lower triangle (cuBLAS's column-major upper) is valid; copy it onto the strict upper
// triangle, h[a, b] = h[b, a] for a < b, through a shared tile so that reads and writes are both coalesced.
// Block (bx, by) writes tile row by, tile column bx; blocks below the diagonal return at once.
__global__ void mirror_lower_to_upper_kernel(float* h, int64_t n) {
  __shared__ float tile[kMirrorTile][kMirrorTile + 1];
  const int64_t a0 = int64_t{blockIdx.y} * kMirrorTile;  // destination rows
  const int64_t b0 = int64_t{blockIdx.x} * kMirrorTile;  // destination columns
  if (b0 < a0) return;
  const int tx = threadIdx.x;
  for (int ty = threadIdx.y; ty < kMirrorTile; ty += blockDim.y) {
    const int64_t src_row = b0 + ty;  // source h[b0 + ty, a0 + tx]
    const int64_t src_col = a0 + tx;
    if (src_row < n && src_col < n) tile[ty][tx] = h[src_row * n + src_col];
  }
  __syncthreads();
  for (int ty = threadIdx.y; ty < kMirrorTile; ty += blockDim.y) {
    const int64_t a = a0 + ty;
    const int64_t b = b0 + tx;
    if (a < n && b < n && a < b) h[a * n + b] = tile[tx][ty];
  }
}

void launch_mirror_lower_to_upper(cudaStream_t stream, float* h, int64_t n) {
  PQ_ASSERT(h && n > 0, "mirror: n ", n);
  const int64_t tiles = ceil_div(n, kMirrorTile);
  PQ_ASSERT(tiles < 65536, "mirror: n ", n, " too large");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  mirror_lower_to_upper_kernel<<<grid, dim3(kMirrorTile, 8), 0, stream>>>(h, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// --- CudaBackend members ---------------------------------------------------------------------------------------

void CudaBackend::rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  launch_rms_norm(stream_, x, weight, y, rows, dim, eps);
}

void CudaBackend::rope(float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim,
                       const float* inv_freq) {
  launch_rope(stream_, x, samples, seq, heads, head_dim, inv_freq);
}

void CudaBackend::attention(const float* q, const float* k, const float* v, float* out, int64_t samples, int64_t seq,
                            int64_t heads, int64_t kv_heads, int64_t head_dim) {
  launch_attention(stream_, q, k, v, out, samples, seq, heads, kv_heads, head_dim);
}

void CudaBackend::swiglu(const float* gate, const float* up, float* out, int64_t n) {
  launch_swiglu(stream_, gate, up, out, n);
}

void CudaBackend::add(float* y, const float* x, int64_t n) { launch_add(stream_, y, x, n); }

void CudaBackend::add_bias(float* y, const float* bias, int64_t rows, int64_t n) {
  launch_add_bias(stream_, y, bias, rows, n);
}

// Per-row values on the device, summed here in row order in double: the same total run to run.
double CudaBackend::nll_sum(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab) {
  PQ_ASSERT(rows >= 0, "nll_sum: rows ", rows);
  if (rows == 0) return 0.0;
  Buffer<double> per_row(*this, rows);
  launch_nll_rows(stream_, logits, targets, rows, vocab, per_row.data(), flag_);
  std::vector<double> host(static_cast<size_t>(rows));
  download(host.data(), per_row.data(), sizeof(double) * host.size());
  PQ_ASSERT(read_and_clear_flag() == 0, "nll_sum: a target is outside [0, ", vocab, ")");
  double total = 0.0;
  for (const double v : host) total += v;
  return total;
}

// h += x^T x. x [rows, k] row-major is column-major x^T [k, rows], so SYRK with no transpose gives x^T x; it
// updates cuBLAS's upper triangle (the row-major lower one), then the mirror restores the full matrix.
void CudaBackend::hessian_accumulate(const float* x, int64_t rows, int64_t k, float* h) {
  PQ_ASSERT(rows >= 0 && k > 0, "hessian_accumulate: rows ", rows, " k ", k);
  if (rows == 0) return;
  PQ_ASSERT(x && h, "hessian_accumulate: null pointer");
  const float one = 1.0f;
  CUBLAS_CHECK(cublasSsyrk_64(cublas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, k, rows, &one, x, k, &one, h, k));
  launch_mirror_lower_to_upper(stream_, h, k);
}

}  // namespace pipequant::kernels
