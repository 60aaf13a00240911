#pragma once
// The CUDA backend: cuBLAS for GEMM and the Hessian, cuSOLVER for the Cholesky factorization, own kernels for
// the Llama block forward, the quantization grid and the fused GPTQ column loop. Every operation runs on one
// non-default stream owned by the backend; cuBLAS and cuSOLVER are bound to it. Results match the CPU backend
// (kernels/cpu, the specification) exactly where the inputs make that possible and within a stated tolerance
// otherwise; run to run they are bit-identical on the same GPU (no atomics, fixed reduction orders,
// deterministic library modes).
//
// Member functions are defined in cuda_memory.cu (construction, memory, GEMM), cuda_forward.cu (block forward,
// loss, Hessian) and cuda_quant.cu (factorization, quantization, GPTQ).

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/backend.hpp"

namespace pipequant::kernels {

// Pinned host staging for upload/download: two buffers so that the host copy of one chunk overlaps the DMA of
// the other.
inline constexpr size_t kStagingBytes = size_t{16} << 20;
// cuBLAS workspace, allocated through the backend's allocator so that it counts against the budget.
inline constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

class CudaBackend final : public Backend {
 public:
  // Binds `device` to the calling thread. budget_bytes: this rank's (kernels/device_policy.hpp device_budget);
  // 0 = an equal share among the `sharing` ranks of the node on this device, less a margin.
  CudaBackend(int device, size_t budget_bytes, int sharing = 1);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }

  void* allocate(size_t bytes) override;
  void deallocate(void* p) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void download_strided(void* host_dst, const void* src, size_t elem_bytes, int64_t count,
                        size_t src_stride_bytes) override;
  void synchronize() override;
  size_t peak_bytes() const override;
  void reset_peak() override;
  size_t live_bytes() const override;
  size_t budget_bytes() const override { return budget_; }

  void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override;
  void linear_half(const float* x, const uint16_t* w, HalfFormat format, float* y, int64_t m, int64_t n,
                   int64_t k) override;

  void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) override;
  void rope(float* x, int64_t samples, int64_t seq, int64_t heads, int64_t head_dim, const float* inv_freq) override;
  void attention(const float* q, const float* k, const float* v, float* out, int64_t samples, int64_t seq,
                 int64_t heads, int64_t kv_heads, int64_t head_dim) override;
  void swiglu(const float* gate, const float* up, float* out, int64_t n) override;
  void add(float* y, const float* x, int64_t n) override;
  void add_bias(float* y, const float* bias, int64_t rows, int64_t n) override;
  double nll_sum(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab) override;

  void hessian_accumulate(const float* x, int64_t rows, int64_t k, float* h) override;
  bool reverse_cholesky(float* h, int64_t n) override;
  size_t factor_workspace_bytes(int64_t n) override;
  void quant_params(const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid, float* scale, float* zero,
                    int64_t stride) override;
  void quantize(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros, int64_t groups,
                const int32_t* param_of, QuantGrid grid, uint8_t* q, float* deq) override;
  void gptq_block(const GptqBlockArgs& args) override;

  int device() const { return device_; }

 private:
  // Reads the backend's device flag (set by checking kernels) after the stream has drained, and clears it.
  int read_and_clear_flag();

  int device_ = 0;
  int sm_count_ = 1;  // streaming multiprocessors, for launch shapes
  size_t budget_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  cusolverDnParams_t cusolver_params_ = nullptr;

  mutable std::mutex memory_mutex_;
  std::unordered_map<void*, size_t> sizes_;  // live allocations -> requested bytes
  size_t live_ = 0;
  size_t peak_ = 0;

  void* staging_[2] = {nullptr, nullptr};  // pinned host [kStagingBytes] each
  cudaEvent_t staging_done_[2] = {nullptr, nullptr};
  void* cublas_workspace_ = nullptr;  // device [kCublasWorkspaceBytes]
  void* half_scratch_ = nullptr;      // device: x rounded to 16 bits for linear_half, grown on demand
  size_t half_scratch_bytes_ = 0;
  int* flag_ = nullptr;       // device [1]: status word of checking kernels (info of potrf, bad values)
  int* host_flag_ = nullptr;  // pinned host [1]
};

}  // namespace pipequant::kernels
