#pragma once
// The backend interface: every piece of arithmetic the program does on weights and activations.
// Two implementations: kernels/cpu (OpenBLAS + LAPACKE + OpenMP, with the readable GPTQ and Cholesky beside it in
// kernels/cpu/gptq_reference.hpp) and kernels/cuda; tests/backend_ops.cpp checks both against the readable versions.
// All matrices are row-major fp32 unless said otherwise; pointers are backend memory (host memory for cpu).
// Launch-style entry points check their preconditions with PQ_ASSERT; shapes are validated at the boundary
// (src/), not here.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <utility>

#include "base/error.hpp"

namespace pipequant::kernels {

enum class Trans { kNo, kYes };

// The 16-bit float formats the block forward can run its GEMMs in (the dtype of bf16 and fp16 checkpoints).
enum class HalfFormat { kBF16, kF16 };

// Quantization grid: 2^bits levels, q in [0, 2^bits - 1], w = scale * (q - zero).
struct QuantGrid {
  int bits = 4;
  bool sym = false;
  int maxq() const { return (1 << bits) - 1; }
};

// One call of the GPTQ column loop over the columns [begin, end) of one 128-wide block, all rows at once.
// Columns are in processing order (act-order already applied by the caller). H = R R^T, R upper triangular.
struct GptqBlockArgs {
  int64_t rows = 0;          // out_features
  int64_t cols = 0;          // in_features; every [rows, cols] matrix below has leading dimension cols
  int64_t begin = 0;         // first column of the block
  int64_t end = 0;           // one past the last column of the block
  const float* r = nullptr;  // R [cols, cols], upper triangular, H_damped = R R^T
  const float* w = nullptr;  // original weights [rows, cols] (dead columns zeroed)
  float* wc = nullptr;   // running weights [rows, cols]: wc[:, j] = w[:, j] * R[j, j] + sum_{i<begin} res[:, i] R[i, j]
  float* res = nullptr;  // out: w - dequant(q) for this block's columns [rows, cols]
  float* err2 = nullptr;    // in/out: per-row sum of e^2, e = res-propagated error times R[j, j] ([rows]); its total
                            // equals tr(D H_damped D^T), the GPTQ loss
  uint8_t* q = nullptr;     // out: codes [rows, cols]
  float* scales = nullptr;  // scale table [rows, groups] (fp16-representable values)
  float* zeros = nullptr;   // zero table [rows, groups] (integers stored as float)
  int64_t groups = 0;       // columns of the scale/zero tables
  const int32_t* param_of = nullptr;  // [cols]: which table entry quantizes the column at position j
  int64_t dynamic_group_size = 0;     // > 0: at positions j with j % size == 0 compute table entry j / size
                                      //      from the min/max over the group's columns c of the weights as
                                      //      sequential GPTQ has them when it reaches j:
                                      //      W_c = w_c + sum_{begin <= i <= c} A_i U[i, c], A_i = wc_i - w_i R[i, i],
                                      //      U = R^-1 on the diagonal tile (a group may reach past `end`);
                                      //      0: the tables are given
  QuantGrid grid;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // --- memory -------------------------------------------------------------------------------------------
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  // `count` elements of elem_bytes each, src_stride_bytes apart in backend memory (a matrix's diagonal, a column),
  // into host_dst one after another: one transfer on a device backend.
  virtual void download_strided(void* host_dst, const void* src, size_t elem_bytes, int64_t count,
                                size_t src_stride_bytes) {
    for (int64_t i = 0; i < count; ++i)
      download(static_cast<char*>(host_dst) + static_cast<size_t>(i) * elem_bytes,
               static_cast<const char*>(src) + static_cast<size_t>(i) * src_stride_bytes, elem_bytes);
  }
  virtual void synchronize() = 0;
  virtual size_t peak_bytes() const = 0;  // high-water mark of allocate() since reset_peak()
  virtual void reset_peak() = 0;
  virtual size_t live_bytes() const = 0;    // allocated now
  virtual size_t budget_bytes() const = 0;  // what allocate() may hold at once; 0: no budget
  // Whether backend memory is host memory (host pointers may be passed where backend pointers are expected).
  virtual bool host_memory() const { return false; }
  // What the budget leaves for more allocations now (SIZE_MAX without a budget).
  size_t free_budget_bytes() const {
    const size_t budget = budget_bytes(), live = live_bytes();
    return budget == 0 ? SIZE_MAX : budget - (live < budget ? live : budget);
  }

  // Where work that does not fit this backend's budget goes (docs/design.md section 4, fallback 3: a Hessian too
  // large for the device is factored and solved on the CPU); null when there is no such backend.
  Backend* host_fallback() const { return host_fallback_.get(); }
  void set_host_fallback(std::unique_ptr<Backend> host) { host_fallback_ = std::move(host); }

  // --- dense linear algebra -----------------------------------------------------------------------------
  // C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, row-major with leading dimensions.
  virtual void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) = 0;
  // y[m,n] = x[m,k] * w[n,k]^T: a linear layer with weights [out, in].
  void linear(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k) {
    gemm(Trans::kNo, Trans::kYes, m, n, k, 1.0f, x, k, w, k, 0.0f, y, n);
  }

  // y[m, n] = x[m, k] * w[n, k]^T with w in 16-bit storage (the bits of `format`) and x rounded to the same
  // format (to nearest even), the products summed in fp32 and y written in fp32: the tensor-core GEMM of a
  // bf16/fp16 model. Every product of two 16-bit values is exact in fp32; only the summation order is free.
  virtual void linear_half(const float* x, const uint16_t* w, HalfFormat format, float* y, int64_t m, int64_t n,
                           int64_t k) = 0;

  // --- the Llama block forward ---------------------------------------------------------------------------
  // y[rows, dim] = x / sqrt(mean(x^2) + eps) * weight[dim]; accumulation in fp32 or wider. y may alias x.
  virtual void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) = 0;
  // In place, HF rotate_half RoPE on x [samples * seq, heads * head_dim]; the position of row t is t % seq;
  // inv_freq [head_dim / 2].
  virtual void rope(float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim, const float* inv_freq) = 0;
  // Causal grouped-query attention, softmax scale 1/sqrt(head_dim).
  // q, out [samples * seq, heads * head_dim]; k, v [samples * seq, kv_heads * head_dim];
  // query head h reads kv head h / (heads / kv_heads).
  virtual void attention(const float* q, const float* k, const float* v, float* out, int64_t samples, int64_t seq,
                         int64_t heads, int64_t kv_heads, int64_t head_dim) = 0;
  // out[n] = silu(gate) * up; out may alias gate.
  virtual void swiglu(const float* gate, const float* up, float* out, int64_t n) = 0;
  // y[n] += x[n]
  virtual void add(float* y, const float* x, int64_t n) = 0;
  // y[rows, n] += bias[n]
  virtual void add_bias(float* y, const float* bias, int64_t rows, int64_t n) = 0;
  // Sum over rows of -log softmax(logits[row])[target[row]], in double; logits [rows, vocab].
  virtual double nll_sum(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab) = 0;

  // --- quantization ------------------------------------------------------------------------------------
  // h[k, k] += x^T x for x [rows, k] (the full symmetric matrix is written). Deterministic: fixed order.
  virtual void hessian_accumulate(const float* x, int64_t rows, int64_t k, float* h) = 0;
  // In place: h [n, n] SPD -> R upper triangular with h = R R^T (lower triangle zeroed).
  // Returns false when the factorization fails or produces a non-finite value; on a host-memory backend the strict
  // lower triangle then still holds the input's (a retry rebuilds the input from it).
  virtual bool reverse_cholesky(float* h, int64_t n) = 0;
  // Backend memory reverse_cholesky(h, n) takes beside h while it runs (a library's workspace); 0 by default.
  virtual size_t factor_workspace_bytes(int64_t /*n*/) { return 0; }
  // Per row of w[rows, cols] (leading dimension ld), min/max -> scale (fp16-representable) and zero, as the
  // GPTQ reference quantizer does (range widened to include 0; all-zero rows get [-1, 1]).
  // scale/zero written at scale[r * stride], zero[r * stride].
  virtual void quant_params(const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid, float* scale,
                            float* zero, int64_t stride) = 0;
  // q[r, c] = clamp(round(w / scale) + zero, 0, maxq) with the table entry param_of[c] of row r
  // (tables [rows, groups]); deq (optional) = scale * (q - zero).
  virtual void quantize(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros,
                        int64_t groups, const int32_t* param_of, QuantGrid grid, uint8_t* q, float* deq) = 0;
  // The GPTQ column loop of one block (see GptqBlockArgs).
  virtual void gptq_block(const GptqBlockArgs& args) = 0;
  // The GPTQ column loop over all columns: gptq_block on blocks of `block` columns, each followed by the lazy
  // update of the later columns (gemm) that GptqBlockArgs::wc assumes. args.begin and args.end are set per block.
  void gptq_columns(GptqBlockArgs args, int64_t block);

 private:
  std::unique_ptr<Backend> host_fallback_;
};

// Columns per panel of the two-level lazy update of gptq_columns: after each block only the rest of its panel is
// updated (a GEMM with inner dimension block); after a whole panel the columns beyond it get one update with inner
// dimension the panel width, which runs near the machine's GEMM peak. Same flop count as one update per block.
inline constexpr int64_t kGptqPanelColumns = 1024;

// The panel width: a multiple of the block size and, with dynamic groups, of the group size, so that a group
// starting inside a panel ends inside it (its parameters read columns that must be up to date). The whole matrix
// (one update per block) when no such width near kGptqPanelColumns exists.
inline int64_t gptq_panel_width(int64_t block, int64_t dynamic_group, int64_t cols) {
  int64_t unit = block;
  if (dynamic_group > 0) unit = std::lcm(block, dynamic_group);
  if (unit >= cols) return cols;
  return std::max<int64_t>(1, kGptqPanelColumns / unit) * unit;
}

// Columns beyond the current panel lag behind the GptqBlockArgs::wc invariant until the panel is done;
// gptq_block reads wc only in its block and in groups starting there, which gptq_panel_width keeps in the panel.
inline void Backend::gptq_columns(GptqBlockArgs args, int64_t block) {
  PQ_ASSERT(block > 0 && args.cols > 0, "gptq_columns: block ", block, " cols ", args.cols);
  const int64_t cols = args.cols;
  // wc[:, c0:c1] += res[:, i0:i1] R[i0:i1, c0:c1]: the residuals of columns [i0, i1) reach columns [c0, c1)
  const auto lazy_update = [&](int64_t i0, int64_t i1, int64_t c0, int64_t c1) {
    gemm(Trans::kNo, Trans::kNo, args.rows, c1 - c0, i1 - i0, 1.0f, args.res + i0, cols, args.r + i0 * cols + c0, cols,
         1.0f, args.wc + c0, cols);
  };
  const int64_t panel = gptq_panel_width(block, args.dynamic_group_size, cols);
  for (int64_t p0 = 0; p0 < cols; p0 += panel) {
    const int64_t p1 = std::min(p0 + panel, cols);
    for (int64_t b0 = p0; b0 < p1; b0 += block) {
      args.begin = b0;
      args.end = std::min(b0 + block, p1);
      gptq_block(args);
      if (args.end < p1) lazy_update(b0, args.end, args.end, p1);  // the rest of this panel
    }
    if (p1 < cols) lazy_update(p0, p1, p1, cols);  // everything after the panel
  }
}

// Typed RAII buffer in backend memory.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, int64_t count)
      : backend_(&backend),
        data_(static_cast<T*>(backend.allocate(sizeof(T) * static_cast<size_t>(count)))),
        count_(count) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      backend_ = o.backend_;
      data_ = o.data_;
      count_ = o.count_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  ~Buffer() { reset(); }
  void reset() {
    if (data_) backend_->deallocate(data_);
    data_ = nullptr;
    count_ = 0;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return count_; }

 private:
  Backend* backend_ = nullptr;
  T* data_ = nullptr;
  int64_t count_ = 0;
};

// `count` host floats as backend memory: themselves on a backend whose memory is the host's, else a copy uploaded
// into `copy` (which holds it for as long as it is used).
inline const float* host_floats_on_backend(Backend& backend, const float* host, int64_t count, Buffer<float>& copy) {
  if (backend.host_memory()) return host;
  copy = Buffer<float>(backend, count);
  backend.upload(copy.data(), host, sizeof(float) * static_cast<size_t>(count));
  return copy.data();
}

// The CPU backend; threads <= 0 means all cores. budget_bytes > 0 bounds what it allocates at once (an
// allocation past it is a UserError), as a device backend's memory budget does; 0: no bound.
std::unique_ptr<Backend> make_cpu_backend(int threads = 0, size_t budget_bytes = 0);

}  // namespace pipequant::kernels

namespace pipequant::kernels {

// CUDA devices visible to this process; 0 when the build has no CUDA backend, or the node no driver or no device.
// Throws UserError when a driver is installed but fails (too old for the runtime, broken): never a quiet 0.
int cuda_device_count();
// The CUDA backend on `device` with a memory budget in bytes for this rank, `sharing` ranks of the node using the
// same device (0 = an equal share of it; kernels/device_policy.hpp). Throws UserError when the build has no CUDA
// backend or the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device, size_t budget_bytes, int sharing = 1);

}  // namespace pipequant::kernels
