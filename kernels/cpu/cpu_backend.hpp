#pragma once
// The CPU backend: OpenBLAS/LAPACKE for dense algebra, OpenMP for the loops. It is the specification the CUDA
// backend follows float operation for float operation, so it favours plain loops over cleverness where speed does
// not matter; where it is tiled for speed (the GPTQ column loop, the Cholesky factorization) a readable
// double-precision version stands beside it in gptq_reference.hpp, and the quantization grid both use is
// quant_grid.hpp. Its member functions are defined in cpu_memory.cpp, cpu_forward.cpp and cpu_quant.cpp.

#include <atomic>

#include "kernels/backend.hpp"

namespace pipequant::kernels {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads, size_t budget_bytes = 0);
  std::string name() const override { return "cpu"; }

  void* allocate(size_t bytes) override;
  void deallocate(void* p) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void synchronize() override {}
  size_t peak_bytes() const override { return peak_.load(); }
  void reset_peak() override { peak_.store(live_.load()); }
  size_t live_bytes() const override { return live_.load(); }
  size_t budget_bytes() const override { return budget_; }
  bool host_memory() const override { return true; }

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
  void quant_params(const float* w, int64_t rows, int64_t cols, int64_t ld, QuantGrid grid, float* scale, float* zero,
                    int64_t stride) override;
  void quantize(const float* w, int64_t rows, int64_t cols, const float* scales, const float* zeros, int64_t groups,
                const int32_t* param_of, QuantGrid grid, uint8_t* q, float* deq) override;
  void gptq_block(const GptqBlockArgs& args) override;

 private:
  int threads_;
  size_t budget_;
  std::atomic<size_t> live_{0};
  std::atomic<size_t> peak_{0};
};

}  // namespace pipequant::kernels
