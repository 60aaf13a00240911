// CpuBackend: construction, memory and the generic GEMM.
#include <cblas.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "kernels/cpu/cpu_backend.hpp"

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

// gemm's output tiles. Their target edge: a 512 x 512 tile runs near the single-core GEMM peak (it packs 1/256 as
// many elements as it does multiply-adds). A product of fewer than kGemmMinTiles such tiles is cut finer, down to
// kGemmMinEdge (a 256 x 256 tile loses ~3% to a 512 x 512 one, a 128 x 128 tile ~10%), so that more threads share
// it: the linears of one 2048-token sample, or the 128-token samples of a small model.
inline constexpr int64_t kGemmTile = 512;
inline constexpr int64_t kGemmMinEdge = 256;
inline constexpr int64_t kGemmMinTiles = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tiles of a [m, n] output: a function of m and n alone, never of the thread count.
struct GemmGrid {
  int64_t tm = 0, tn = 0;  // tile edges: nearly equal pieces, a multiple of 16 (whole vector widths)
  int64_t row_tiles = 0, col_tiles = 0;
};

GemmGrid gemm_grid(int64_t m, int64_t n) {
  int64_t pm = ceil_div(m, kGemmTile), pn = ceil_div(n, kGemmTile);  // pieces along m and n
  while (pm * pn < kGemmMinTiles) {
    const int64_t em = ceil_div(m, pm), en = ceil_div(n, pn);
    if (std::max(em, en) < 2 * kGemmMinEdge) break;
    if (en >= em)
      pn *= 2;
    else
      pm *= 2;
  }
  GemmGrid g;
  g.tm = ceil_div(ceil_div(m, pm), 16) * 16;
  g.tn = ceil_div(ceil_div(n, pn), 16) * 16;
  g.row_tiles = ceil_div(m, g.tm);
  g.col_tiles = ceil_div(n, g.tn);
  return g;
}
}  // namespace

// OpenBLAS runs every call on one thread: its threading partitions a call by the thread count, and the last bits of
// a GEMM follow the partition. The backend spreads the work over OpenMP threads itself, in pieces whose shapes
// depend on the problem alone (gemm's tiles, hessian_accumulate's, the tiled Cholesky's).
CpuBackend::CpuBackend(int threads, size_t budget_bytes)
    : threads_(threads > 0 ? threads : omp_get_num_procs()), budget_(budget_bytes) {
  omp_set_num_threads(threads_);
  openblas_set_num_threads(1);
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
  // C in a fixed grid of tiles, each one single-threaded BLAS call over the whole of k: every element of C is
  // computed by the same call, in the same order, whichever thread runs it and however many there are.
  const GemmGrid g = gemm_grid(m, n);
  const int64_t tiles = g.row_tiles * g.col_tiles;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i0 = t / g.col_tiles * g.tm, j0 = t % g.col_tiles * g.tn;
    const int64_t mt = std::min(g.tm, m - i0), nt = std::min(g.tn, n - j0);
    const float* at = ta == Trans::kYes ? a + i0 : a + i0 * lda;  // rows i0.. of op(A) [mt, k]
    const float* bt = tb == Trans::kYes ? b + j0 * ldb : b + j0;  // columns j0.. of op(B) [k, nt]
    cblas_sgemm(CblasRowMajor, ta == Trans::kYes ? CblasTrans : CblasNoTrans,
                tb == Trans::kYes ? CblasTrans : CblasNoTrans, static_cast<blasint>(mt), static_cast<blasint>(nt),
                static_cast<blasint>(k), alpha, at, static_cast<blasint>(lda), bt, static_cast<blasint>(ldb), beta,
                c + i0 * ldc + j0, static_cast<blasint>(ldc));
  }
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
