// CpuBackend: construction, memory and the generic GEMM.
#include <cblas.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "kernels/cpu/cpu_backend.hpp"
#include "base/error.hpp"
#include "base/numeric.hpp"

namespace pipequant::kernels {

namespace {
inline constexpr size_t kAlignment = 64;
// Large buffers (Hessians, weights, activations) are aligned to 2 MiB and marked for transparent huge pages:
// the GPTQ solve and the GEMMs stream through them, and 4 KiB pages cost TLB misses (30-40% of the solve on
// a VM whose kernel only backs madvise'd regions with huge pages).
inline constexpr size_t kHugePage = size_t{2} << 20;
inline constexpr size_t kHugeThreshold = size_t{8} << 20;
// Each allocation carries its size in a 64-byte header so that deallocate can keep the live count.
struct AllocHeader {
  size_t bytes;
};
}  // namespace

CpuBackend::CpuBackend(int threads, size_t budget_bytes)
    : threads_(threads > 0 ? threads : omp_get_num_procs()), budget_(budget_bytes) {
  omp_set_num_threads(threads_);
  openblas_set_num_threads(threads_);
}

void* CpuBackend::allocate(size_t bytes) {
  if (budget_ > 0 && bytes > budget_ - std::min(budget_, live_.load())) {
    fail("cpu backend: allocating ", bytes, " bytes would exceed its memory budget of ", budget_, " bytes (",
         live_.load(), " bytes live)");
  }
  const size_t total = bytes + kAlignment;
  const size_t align = total >= kHugeThreshold ? kHugePage : kAlignment;
  const size_t rounded = (total + align - 1) / align * align;
  void* base = std::aligned_alloc(align, rounded);
  if (!base) throw UserError(detail::concat("out of host memory allocating ", bytes, " bytes"));
  if (align == kHugePage) ::madvise(base, rounded, MADV_HUGEPAGE);  // advisory: a kernel without THP ignores it
  static_cast<AllocHeader*>(base)->bytes = bytes;
  const size_t live = live_.fetch_add(bytes) + bytes;
  size_t peak = peak_.load();
  while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
  }
  return static_cast<char*>(base) + kAlignment;
}

void CpuBackend::deallocate(void* p) {
  if (!p) return;
  void* base = static_cast<char*>(p) - kAlignment;
  live_.fetch_sub(static_cast<AllocHeader*>(base)->bytes);
  std::free(base);
}

void CpuBackend::upload(void* dst, const void* host_src, size_t bytes) { std::memcpy(dst, host_src, bytes); }
void CpuBackend::download(void* host_dst, const void* src, size_t bytes) { std::memcpy(host_dst, src, bytes); }

void CpuBackend::gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, ta == Trans::kYes ? CblasTrans : CblasNoTrans,
              tb == Trans::kYes ? CblasTrans : CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}

// The specification of the 16-bit GEMM: x rounded to the format and w widened, both exactly representable in
// fp32, then the fp32 GEMM.
void CpuBackend::linear_half(const float* x, const uint16_t* w, HalfFormat format, float* y, int64_t m, int64_t n,
                             int64_t k) {
  if (m == 0 || n == 0) return;
  const bool bf16 = format == HalfFormat::kBF16;
  std::vector<float> xr(static_cast<size_t>(m * k)), wf(static_cast<size_t>(n * k));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m * k; ++i)
    xr[static_cast<size_t>(i)] = bf16 ? bf16_to_float(float_to_bf16(x[i])) : fp16_to_float(float_to_fp16(x[i]));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n * k; ++i) wf[static_cast<size_t>(i)] = bf16 ? bf16_to_float(w[i]) : fp16_to_float(w[i]);
  gemm(Trans::kNo, Trans::kYes, m, n, k, 1.0f, xr.data(), k, wf.data(), k, 0.0f, y, n);
}

std::unique_ptr<Backend> make_cpu_backend(int threads, size_t budget_bytes) {
  return std::make_unique<CpuBackend>(threads, budget_bytes);
}

}  // namespace pipequant::kernels
