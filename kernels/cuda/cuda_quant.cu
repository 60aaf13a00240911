// CudaBackend: the reverse Cholesky factorization, the quantization grid and the fused GPTQ column loop.
// The CPU versions in kernels/cpu/cpu_quant.cpp and quant_grid.hpp are the specification (tests/backend_ops.cpp
// checks both against the readable kernels/cpu/gptq_reference.hpp); the same float operations run here in
// the same order, so codes, scales and zeros agree with the CPU bit for bit on the same inputs; in the GPTQ
// loop this holds where the CPU compiler fuses multiply-adds as assumed in gptq_block_kernel (an optimized
// x86-64-v3 build), otherwise a rare code differs.
#include <algorithm>
#include <vector>

#include "kernels/cuda/cuda_backend.hpp"
#include "kernels/device_policy.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/cuda_common.cuh"
#include "base/error.hpp"

namespace pipequant::kernels {

namespace {

inline constexpr int kElementwiseThreads = 256;

// --- reverse Cholesky helpers -------------------------------------------------------------------------------------

// J H J for the exchange matrix J reverses both axes, which in row-major storage is the flat array reversed.
// h [n, n]; swaps element p with element n*n - 1 - p for p < n*n / 2.
__global__ void reverse_flat_kernel(float* h, int64_t nn) {
  const int64_t half = nn / 2;
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < half; p += int64_t{gridDim.x} * blockDim.x) {
    const float a = h[p];
    h[p] = h[nn - 1 - p];
    h[nn - 1 - p] = a;
  }
}

void launch_reverse_flat(cudaStream_t stream, float* h, int64_t n) {
  PQ_ASSERT(h && n > 0, "reverse_flat: n = ", n);
  const int64_t nn = n * n;
  reverse_flat_kernel<<<grid_for(nn / 2, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(h, nn);
  CUDA_CHECK_LAUNCH();
}

// r [n, n]: zeroes the strict lower triangle and sets *flag = 1 when the upper triangle holds a non-finite
// value. Every writer stores the same constant, so the racing stores are benign and the result is fixed.
__global__ void finish_factor_kernel(float* r, int64_t n, int* flag) {
  const int64_t nn = n * n;
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < nn; p += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = p / n;
    const int64_t col = p - row * n;
    if (col < row) {
      r[p] = 0.0f;
    } else if (!isfinite(r[p])) {
      *flag = 1;
    }
  }
}

void launch_finish_factor(cudaStream_t stream, float* r, int64_t n, int* flag) {
  PQ_ASSERT(r && flag && n > 0, "finish_factor: n = ", n);
  finish_factor_kernel<<<grid_for(n * n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(r, n, flag);
  CUDA_CHECK_LAUNCH();
}

// --- quantization grid -------------------------------------------------------------------------------------------

inline constexpr int kParamsWarps = 8;  // rows per block of quant_params_kernel, one warp per row

// w [rows, cols] with leading dimension ld -> scale[r * stride], zero[r * stride]. min/max are exact in any
// order, so the warp reduction reproduces the CPU's sequential scan.
__global__ void quant_params_kernel(const float* w, int64_t rows, int64_t cols, int64_t ld, int maxq, bool sym,
                                    float* scale, float* zero, int64_t stride) {
  const int64_t row = blockIdx.x * int64_t{kParamsWarps} + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together
  const float* x = w + row * ld;
  float lo = 0.0f, hi = 0.0f;  // the reference widens the range to include 0 anyway
  for (int64_t c = lane; c < cols; c += kWarpSize) {
    lo = fminf(lo, x[c]);
    hi = fmaxf(hi, x[c]);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  if (lane == 0) grid_params(lo, hi, maxq, sym, scale + row * stride, zero + row * stride);
}

void launch_quant_params(cudaStream_t stream, const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid,
                         float* scale, float* zero, int64_t stride) {
  PQ_ASSERT(rows >= 0 && cols > 0 && ld >= cols && stride > 0, "quant_params: rows ", rows, " cols ", cols, " ld ",
            ld, " stride ", stride);
  PQ_ASSERT(grid.bits >= 1 && grid.bits <= 8, "quant_params: bits ", grid.bits);
  if (rows == 0) return;
  PQ_ASSERT(w && scale && zero, "quant_params: null pointer");
  const int64_t blocks = ceil_div(rows, kParamsWarps);
  PQ_ASSERT(blocks < (int64_t{1} << 31), "quant_params: too many rows ", rows);
  quant_params_kernel<<<static_cast<unsigned>(blocks), kParamsWarps * kWarpSize, 0, stream>>>(
      w, rows, cols, ld, grid.maxq(), grid.sym, scale, zero, stride);
  CUDA_CHECK_LAUNCH();
}

// w, deq [rows, cols]; scales, zeros [rows, groups]; param_of [cols]; q [rows, cols]. deq may be null.
__global__ void quantize_kernel(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros,
                                int64_t groups, const int32_t* param_of, float maxq, uint8_t* q, float* deq) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    const int64_t t = r * groups + param_of[c];
    const float s = scales[t];
    const float z = zeros[t];
    const float code = grid_quantize(w[i], s, z, maxq);
    q[i] = static_cast<uint8_t>(code);
    if (deq) deq[i] = s * (code - z);
  }
}

void launch_quantize(cudaStream_t stream, const float* w, int64_t rows, int64_t cols, const float* scales,
                     const float* zeros, int64_t groups, const int32_t* param_of, QuantGrid grid, uint8_t* q,
                     float* deq) {
  PQ_ASSERT(rows >= 0 && cols > 0 && groups > 0, "quantize: rows ", rows, " cols ", cols, " groups ", groups);
  PQ_ASSERT(grid.bits >= 1 && grid.bits <= 8, "quantize: bits ", grid.bits);
  if (rows == 0) return;
  PQ_ASSERT(w && scales && zeros && param_of && q, "quantize: null pointer");
  quantize_kernel<<<grid_for(rows * cols, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      w, rows, cols, scales, zeros, groups, param_of, static_cast<float>(grid.maxq()), q, deq);
  CUDA_CHECK_LAUNCH();
}

// --- the GPTQ column loop ----------------------------------------------------------------------------------------

// Columns of one block staged in shared memory (R tile and residuals); wider blocks read both from global
// memory instead, with the same arithmetic.
inline constexpr int kGptqTileColumns = 128;
// Columns whose running values one thread holds in registers at a time.
inline constexpr int kGptqChunk = 32;

struct GptqKernelArgs {
  int64_t rows, cols, begin, width;
  const float* r;          // R [cols, cols], upper triangular
  const float* w;          // original weights [rows, cols]
  const float* wc;         // running weights [rows, cols] (read only here: the caller applies the lazy update)
  float* res;              // out: residuals [rows, cols], this block's columns
  float* err2;             // in/out: per-row loss [rows]
  uint8_t* q;              // out: codes [rows, cols], this block's columns
  float* scales;           // scale table [rows, groups]
  float* zeros;            // zero table [rows, groups]
  int64_t groups;
  const int32_t* param_of;  // [cols]
  int64_t dynamic_group_size;
  const float* ut;  // dynamic groups starting in the block: ut[c * span + i] = U[begin + i, begin + c], U the
                    // inverse of R's diagonal tile over [begin, begin + span); null otherwise
  int64_t span;
  int maxq;
  bool sym;
};

// U = inverse of the upper triangular tile R[begin:begin+span, begin:begin+span], one thread per column c:
// R_tile u = e_c by back substitution in double (u in `work`, [span] doubles per column), stored as float in
// ut[c * span + i] for i <= c, exactly as the CPU backend computes it.
__global__ void tile_inverse_kernel(const float* r, int64_t cols, int64_t begin, int64_t span, double* work,
                                    float* ut) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= span) return;
  double* u = work + c * span;
  const float* rb = r + begin * cols + begin;  // R[begin + i, begin + t] = rb[i * cols + t]
  u[c] = 1.0 / static_cast<double>(rb[c * cols + c]);
  for (int64_t i = c - 1; i >= 0; --i) {
    double sum = 0.0;
    for (int64_t t = i + 1; t <= c; ++t) sum += static_cast<double>(rb[i * cols + t]) * u[t];
    u[i] = -sum / static_cast<double>(rb[i * cols + i]);
  }
  for (int64_t i = 0; i < span; ++i) ut[c * span + i] = i <= c ? static_cast<float>(u[i]) : 0.0f;
}

// One thread per row; every thread runs the same column sequence, so all branches below are uniform.
// For each column j of the block, in order:
//   x    = (wc[j] + sum_{begin <= i < j} res[i] R[i, j]) / R[j, j]
//   code = clamp(round(x / scale) + zero, 0, maxq), deq = scale * (code - zero)
//   res[j] = w[j] - deq, e = (x - deq) R[j, j], err2 += e^2
// with every multiply-add fused exactly where the CPU backend's optimized build fuses it.
// The running sums are accumulated exactly as the CPU does (start from wc[j], add res[i] R[i, j] with one
// fused multiply-add per i, i ascending), a chunk of kGptqChunk columns at a time in registers: a chunk first
// takes the contributions of all earlier chunks (i ascending), then its own columns in order.
// kTiled: the block's R tile [width, kGptqTileColumns] and the residuals [width, blockDim.x] (column-major per
// thread, conflict-free) sit in shared memory; otherwise R and res are read from global memory.
template <bool kTiled>
__global__ void gptq_block_kernel(GptqKernelArgs a) {
  extern __shared__ float smem[];
  const int width = static_cast<int>(a.width);
  const int64_t cols = a.cols;
  const int threads = blockDim.x;
  const int t = threadIdx.x;
  float* r_tile = smem;                                        // [width][kGptqTileColumns]
  float* res_tile = smem + int64_t{width} * kGptqTileColumns;  // [width][threads]
  if constexpr (kTiled) {
    // rows of R past the block's diagonal part are zero-padded up to kGptqTileColumns columns
    for (int e = t; e < width * kGptqTileColumns; e += threads) {
      const int i = e / kGptqTileColumns;
      const int j = e % kGptqTileColumns;
      r_tile[e] = (j >= i && j < width) ? a.r[(a.begin + i) * cols + a.begin + j] : 0.0f;
    }
    __syncthreads();
  }
  const int64_t row = blockIdx.x * int64_t{threads} + t;
  if (row >= a.rows) return;  // no barrier below this point

  // R[begin + i, begin + j] and this row's residual of block column i, wherever they live
  const auto r_at = [&](int i, int j) -> float {
    if constexpr (kTiled) return r_tile[i * kGptqTileColumns + j];
    return a.r[(a.begin + i) * cols + a.begin + j];
  };
  float* res_row = a.res + row * cols + a.begin;  // this row's residuals of the block [width]
  const auto res_at = [&](int i) -> float {
    if constexpr (kTiled) return res_tile[i * threads + t];
    return res_row[i];
  };

  const float* wc_row = a.wc + row * cols;
  const float* w_row = a.w + row * cols + a.begin;
  uint8_t* q_row = a.q + row * cols + a.begin;
  float* scale_row = a.scales + row * a.groups;
  float* zero_row = a.zeros + row * a.groups;
  const int64_t gsize = a.dynamic_group_size;
  const float maxq = static_cast<float>(a.maxq);
  float err2 = a.err2[row];

  for (int c0 = 0; c0 < width; c0 += kGptqChunk) {
    const int cw = min(kGptqChunk, width - c0);
    float cur[kGptqChunk];  // running values of the chunk's columns, times R[j, j]
#pragma unroll
    for (int k = 0; k < kGptqChunk; ++k) cur[k] = k < cw ? wc_row[a.begin + c0 + k] : 0.0f;
    for (int i = 0; i < c0; ++i) {
      const float ri = res_at(i);
#pragma unroll
      for (int k = 0; k < kGptqChunk; ++k)
        if (k < cw) cur[k] = fmaf(ri, r_at(i, c0 + k), cur[k]);
    }
#pragma unroll
    for (int jj = 0; jj < kGptqChunk; ++jj) {
      if (jj < cw) {
        const int jb = c0 + jj;          // column within the block
        const int64_t j = a.begin + jb;  // column of the matrix
        if (gsize > 0 && j % gsize == 0) {
          // A new group: parameters from the weights as sequential GPTQ reads them here (its W as of the
          // block start, also for columns past the block): W_c = w_c + sum_{begin <= i <= c} A_i U[i, c],
          // A_i = wc_i - w_i R[i, i]; the same operations in the same order as the CPU backend
          const int64_t c_end = min(j + gsize, cols);
          const float* w_full = a.w + row * cols;
          float lo = 0.0f, hi = 0.0f;
          for (int64_t c = j; c < c_end; ++c) {
            const float* u_col = a.ut + (c - a.begin) * a.span;
            float v = 0.0f;
            for (int64_t i = a.begin; i <= c; ++i) {
              const float ai = fmaf(-w_full[i], a.r[i * cols + i], wc_row[i]);
              v = fmaf(ai, u_col[i - a.begin], v);
            }
            const float x = w_full[c] + v;
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
          }
          const int64_t g = j / gsize;
          grid_params(lo, hi, a.maxq, a.sym, scale_row + g, zero_row + g);
        }
        const int32_t p = a.param_of[j];
        const float scale = scale_row[p];
        const float zero = zero_row[p];
        const float rjj = r_at(jb, jb);
        const float x = cur[jj] / rjj;
        const float code = grid_quantize(x, scale, zero, maxq);
        // deq = scale * (code - zero); x - deq and w - deq are single fused operations, as the CPU backend's
        // compiled loop evaluates them (FMA contraction at -O2 and above on x86-64-v3)
        const float steps = code - zero;
        const float e = fmaf(-scale, steps, x) * rjj;
        err2 = fmaf(e, e, err2);
        const float res = fmaf(-scale, steps, w_row[jb]);
        q_row[jb] = static_cast<uint8_t>(code);
        res_row[jb] = res;
        if constexpr (kTiled) res_tile[jb * threads + t] = res;
        // the later columns of this chunk; later chunks pick res up from the staged residuals
#pragma unroll
        for (int k = jj + 1; k < kGptqChunk; ++k)
          if (k < cw) cur[k] = fmaf(res, r_at(jb, c0 + k), cur[k]);
      }
    }
  }
  a.err2[row] = err2;
}

void launch_gptq_block(cudaStream_t stream, int sm_count, const GptqBlockArgs& args, const float* ut, int64_t span) {
  PQ_ASSERT(args.rows > 0 && args.cols > 0 && 0 <= args.begin && args.begin < args.end && args.end <= args.cols &&
                args.groups > 0,
            "gptq_block: rows ", args.rows, " cols ", args.cols, " block [", args.begin, ", ", args.end, ") groups ",
            args.groups);
  PQ_ASSERT(args.r && args.w && args.wc && args.res && args.err2 && args.q && args.scales && args.zeros &&
                args.param_of,
            "gptq_block: null pointer");
  PQ_ASSERT(args.dynamic_group_size >= 0, "gptq_block: dynamic_group_size ", args.dynamic_group_size);
  PQ_ASSERT(args.dynamic_group_size == 0 || (args.cols - 1) / args.dynamic_group_size < args.groups,
            "gptq_block: ", args.groups, " table entries for dynamic groups of ", args.dynamic_group_size, " over ",
            args.cols, " columns");
  PQ_ASSERT(args.grid.bits >= 1 && args.grid.bits <= 8, "gptq_block: bits ", args.grid.bits);
  const int64_t width = args.end - args.begin;
  PQ_ASSERT(width < (int64_t{1} << 30), "gptq_block: block of ", width, " columns");

  // Fewer threads per block when there are few rows, so that every SM gets work.
  int threads = 128;
  while (threads > kWarpSize && ceil_div(args.rows, threads) < 2 * int64_t{sm_count}) threads /= 2;
  const int64_t blocks = ceil_div(args.rows, threads);
  PQ_ASSERT(blocks < (int64_t{1} << 31), "gptq_block: too many rows ", args.rows);

  const GptqKernelArgs k{args.rows,   args.cols,   args.begin,         width,          args.r,
                         args.w,      args.wc,     args.res,           args.err2,      args.q,
                         args.scales, args.zeros,  args.groups,        args.param_of,  args.dynamic_group_size,
                         ut,          span,        args.grid.maxq(),   args.grid.sym};
  if (width <= kGptqTileColumns) {
    const size_t smem = sizeof(float) * static_cast<size_t>(width) * (kGptqTileColumns + threads);
    // at most 128 x (128 + 128) floats = 128 KiB: above the default 48 KiB, within sm_80 / sm_90 limits
    CUDA_CHECK(cudaFuncSetAttribute(gptq_block_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
    gptq_block_kernel<true><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(k);
  } else {
    gptq_block_kernel<false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(k);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

// --- CudaBackend members ---------------------------------------------------------------------------------------

size_t CudaBackend::factor_workspace_bytes(int64_t n) {
  PQ_ASSERT(n > 0, "factor_workspace_bytes: n = ", n);
  // the query reads the shape only; any device pointer stands for the matrix
  size_t device_bytes = 0, host_bytes = 0;
  CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(cusolver_, cusolver_params_, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F,
                                             cublas_workspace_, n, CUDA_R_32F, &device_bytes, &host_bytes));
  return device_bytes;
}

bool CudaBackend::reverse_cholesky(float* h, int64_t n) {
  PQ_ASSERT(h != nullptr && n > 0, "reverse_cholesky: n = ", n);
  launch_reverse_flat(stream_, h, n);
  // Row-major lower Cholesky of J H J = L' L'^T: the buffer read column-major is the same symmetric matrix,
  // and its column-major upper factor U = L'^T lies in memory exactly as the row-major L'.
  size_t device_bytes = 0, host_bytes = 0;
  CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(cusolver_, cusolver_params_, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F, h, n,
                                             CUDA_R_32F, &device_bytes, &host_bytes));
  {
    Buffer<uint8_t> device_work(*this, static_cast<int64_t>(std::max<size_t>(device_bytes, 1)));
    std::vector<uint8_t> host_work(std::max<size_t>(host_bytes, 1));
    CUSOLVER_CHECK(cusolverDnXpotrf(cusolver_, cusolver_params_, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_32F, h, n,
                                    CUDA_R_32F, device_work.data(), device_bytes, host_work.data(), host_bytes,
                                    flag_));
  }
  // info > 0: the leading minor of that order is not positive definite; < 0: a bug (cholesky_succeeded aborts)
  const bool factored = cholesky_succeeded(read_and_clear_flag(), n);
  // R = J L' J is upper triangular and R R^T = J L' L'^T J = H.
  launch_reverse_flat(stream_, h, n);
  if (!factored) return false;
  launch_finish_factor(stream_, h, n, flag_);
  return read_and_clear_flag() == 0;
}

void CudaBackend::quant_params(const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid, float* scale,
                               float* zero, int64_t stride) {
  launch_quant_params(stream_, w, rows, cols, ld, grid, scale, zero, stride);
}

void CudaBackend::quantize(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros,
                           int64_t groups, const int32_t* param_of, QuantGrid grid, uint8_t* q, float* deq) {
  launch_quantize(stream_, w, rows, cols, scales, zeros, groups, param_of, grid, q, deq);
}

void CudaBackend::gptq_block(const GptqBlockArgs& args) {
  // Columns [begin, span_end): the block and every dynamic group that starts in it (a group may reach past it)
  const int64_t gsize = args.dynamic_group_size;
  int64_t span_end = args.end;
  bool group_starts = false;
  if (gsize > 0 && args.end > args.begin) {
    const int64_t last_start = (args.end - 1) / gsize * gsize;
    group_starts = last_start >= args.begin;
    if (group_starts) span_end = std::max(span_end, std::min(args.cols, last_start + gsize));
  }
  if (!group_starts) {
    launch_gptq_block(stream_, sm_count_, args, nullptr, 0);
    return;
  }
  const int64_t span = span_end - args.begin;
  Buffer<double> work(*this, span * span);
  Buffer<float> ut(*this, span * span);
  constexpr int kThreads = 64;
  tile_inverse_kernel<<<static_cast<unsigned>(ceil_div(span, kThreads)), kThreads, 0, stream_>>>(
      args.r, args.cols, args.begin, span, work.data(), ut.data());
  CUDA_CHECK_LAUNCH();
  launch_gptq_block(stream_, sm_count_, args, ut.data(), span);
}

}  // namespace pipequant::kernels
