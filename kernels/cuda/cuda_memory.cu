// CudaBackend: construction, the device allocator with its budget, host transfers and the generic GEMM.
#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_backend.hpp"
#include "kernels/cuda/cuda_check.hpp"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/device_policy.hpp"
#include "base/error.hpp"

namespace pipequant::kernels {

namespace {

// True when the NVIDIA driver library can be loaded: the runtime reports a missing driver and one too old for it
// with the same error, and only the second is a fault on a GPU node.
bool driver_library_present() {
  void* handle = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (handle == nullptr) return false;
  dlclose(handle);
  return true;
}

DeviceCountQuery query_device_count() {
  DeviceCountQuery q;
  const cudaError_t status = cudaGetDeviceCount(&q.count);
  cudaGetLastError();  // not sticky: the caller decides what the status means
  if (status == cudaSuccess) {
    q.result = DeviceCountQuery::Result::kDevices;
  } else if (status == cudaErrorNoDevice) {
    q.result = DeviceCountQuery::Result::kNoDevice;
  } else if (status == cudaErrorInsufficientDriver && !driver_library_present()) {
    q.result = DeviceCountQuery::Result::kNoDriver;
  } else {
    q.result = DeviceCountQuery::Result::kFailed;
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    cudaGetLastError();
    q.error = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status) + "; the driver supports CUDA " +
              std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) + ", this build's runtime is " +
              std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  }
  return q;
}

}  // namespace

int cuda_device_count() {
  static const DeviceCountQuery query = query_device_count();  // the runtime answers once per process
  return usable_device_count(query);
}

std::unique_ptr<Backend> make_cuda_backend(int device, size_t budget_bytes, int sharing) {
  return std::make_unique<CudaBackend>(device, budget_bytes, sharing);
}

CudaBackend::CudaBackend(int device, size_t budget_bytes, int sharing) : device_(device) {
  const int count = cuda_device_count();
  PQ_REQUIRE(count > 0, "--backend cuda: no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES and "
                        "the driver)");
  PQ_REQUIRE(device >= 0 && device < count, "--backend cuda: device ", device, " does not exist (", count,
             " visible to this process)");
  // The first calls create the context: a device that is busy, prohibited or broken fails here, which is the
  // user's to fix (another job, compute mode), so it is a UserError rather than an abort.
  cudaError_t status = cudaSetDevice(device);
  size_t free_bytes = 0, total_bytes = 0;
  if (status == cudaSuccess) status = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();
    fail("--backend cuda: device ", device, " cannot be used: ", cudaGetErrorString(status));
  }
  budget_ = device_budget(budget_bytes, free_bytes, total_bytes, sharing, device);
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));

  // Freed blocks stay in the stream-ordered pool up to the budget, so the per-block allocate/free cycle of the
  // pipeline does not go back to the driver every time.
  cudaMemPool_t pool = nullptr;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = budget_;
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));

  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&cublas_));
  CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // Plain fp32 (no TF32 tensor cores): results are comparable with the CPU backend.
  CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  CUBLAS_CHECK(cublasSetAtomicsMode(cublas_, CUBLAS_ATOMICS_NOT_ALLOWED));
  CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
  cublas_workspace_ = allocate(kCublasWorkspaceBytes);
  CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes));
  CUSOLVER_CHECK(cusolverDnCreate(&cusolver_));
  CUSOLVER_CHECK(cusolverDnSetStream(cusolver_, stream_));
  CUSOLVER_CHECK(cusolverDnSetDeterministicMode(cusolver_, CUSOLVER_DETERMINISTIC_RESULTS));
  CUSOLVER_CHECK(cusolverDnCreateParams(&cusolver_params_));

  for (int i = 0; i < 2; ++i) {
    CUDA_CHECK(cudaMallocHost(&staging_[i], kStagingBytes));
    CUDA_CHECK(cudaEventCreateWithFlags(&staging_done_[i], cudaEventDisableTiming));
  }
  flag_ = static_cast<int*>(allocate(sizeof(int)));
  CUDA_CHECK(cudaMemsetAsync(flag_, 0, sizeof(int), stream_));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_flag_), sizeof(int)));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  reset_peak();
}

CudaBackend::~CudaBackend() {
  CUDA_CHECK(cudaSetDevice(device_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  deallocate(flag_);
  deallocate(cublas_workspace_);
  deallocate(half_scratch_);
  {
    // Buffers outliving the backend would be a bug in the caller; release them rather than leak the device.
    std::lock_guard<std::mutex> lock(memory_mutex_);
    for (const auto& [p, bytes] : sizes_) CUDA_CHECK(cudaFreeAsync(p, stream_));
    sizes_.clear();
    live_ = 0;
  }
  CUSOLVER_CHECK(cusolverDnDestroyParams(cusolver_params_));
  CUSOLVER_CHECK(cusolverDnDestroy(cusolver_));
  CUBLAS_CHECK(cublasDestroy(cublas_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  CUDA_CHECK(cudaStreamDestroy(stream_));
  for (int i = 0; i < 2; ++i) {
    CUDA_CHECK(cudaEventDestroy(staging_done_[i]));
    CUDA_CHECK(cudaFreeHost(staging_[i]));
  }
  CUDA_CHECK(cudaFreeHost(host_flag_));
}

// --- memory ---------------------------------------------------------------------------------------------------

void* CudaBackend::allocate(size_t bytes) {
  std::lock_guard<std::mutex> lock(memory_mutex_);
  if (bytes > budget_ - live_) {  // live_ <= budget_ always, so this cannot wrap
    fail("CUDA device ", device_, ": allocating ", bytes, " bytes would exceed the device memory budget of ", budget_,
         " bytes (", live_, " bytes live, peak ", peak_,
         "); raise the GPU memory budget or lower the micro-batch size (--micro-batch)");
  }
  void* p = nullptr;
  // Stream-ordered: the memory is usable by work on stream_ at once, and deallocate returns it in order.
  const cudaError_t status = cudaMallocAsync(&p, std::max<size_t>(bytes, 1), stream_);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    fail("CUDA device ", device_, ": out of device memory allocating ", bytes, " bytes (", live_,
         " bytes live in this process's backend, budget ", budget_,
         " bytes); another process may be using the GPU, or the budget is above what is free");
  }
  CUDA_CHECK(status);
  sizes_.emplace(p, bytes);
  live_ += bytes;
  peak_ = std::max(peak_, live_);
  return p;
}

void CudaBackend::deallocate(void* p) {
  if (!p) return;
  std::lock_guard<std::mutex> lock(memory_mutex_);
  const auto it = sizes_.find(p);
  PQ_ASSERT(it != sizes_.end(), "CudaBackend::deallocate: ", p, " was not allocated by this backend");
  CUDA_CHECK(cudaFreeAsync(p, stream_));
  live_ -= it->second;
  sizes_.erase(it);
}

size_t CudaBackend::live_bytes() const {
  std::lock_guard<std::mutex> lock(memory_mutex_);
  return live_;
}

size_t CudaBackend::peak_bytes() const {
  std::lock_guard<std::mutex> lock(memory_mutex_);
  return peak_;
}

void CudaBackend::reset_peak() {
  std::lock_guard<std::mutex> lock(memory_mutex_);
  peak_ = live_;
}

namespace {
bool is_pinned(const void* host) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, host) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.type == cudaMemoryTypeHost;
}
}  // namespace

// Pageable host memory goes through the two pinned staging buffers: the host copy of chunk i+1 overlaps the
// DMA of chunk i. Pinned host memory is copied directly.
void CudaBackend::upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return;
  PQ_ASSERT(dst && host_src, "upload: null pointer");
  if (is_pinned(host_src)) {
    CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    synchronize();
    return;
  }
  const char* src = static_cast<const char*>(host_src);
  char* out = static_cast<char*>(dst);
  int buffer = 0;
  for (size_t offset = 0; offset < bytes; offset += kStagingBytes, buffer ^= 1) {
    const size_t chunk = std::min(kStagingBytes, bytes - offset);
    CUDA_CHECK(cudaEventSynchronize(staging_done_[buffer]));  // its previous DMA has finished reading it
    std::memcpy(staging_[buffer], src + offset, chunk);
    CUDA_CHECK(cudaMemcpyAsync(out + offset, staging_[buffer], chunk, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaEventRecord(staging_done_[buffer], stream_));
  }
  synchronize();
}

void CudaBackend::download(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  PQ_ASSERT(host_dst && src, "download: null pointer");
  if (is_pinned(host_dst)) {
    CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    synchronize();
    return;
  }
  const char* in = static_cast<const char*>(src);
  char* out = static_cast<char*>(host_dst);
  const size_t chunks = (bytes + kStagingBytes - 1) / kStagingBytes;
  const auto issue = [&](size_t i) {
    const size_t offset = i * kStagingBytes;
    const size_t chunk = std::min(kStagingBytes, bytes - offset);
    CUDA_CHECK(cudaMemcpyAsync(staging_[i % 2], in + offset, chunk, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaEventRecord(staging_done_[i % 2], stream_));
  };
  issue(0);
  for (size_t i = 0; i < chunks; ++i) {
    // staging buffer (i + 1) % 2 held chunk i - 1, already copied out in the previous iteration
    if (i + 1 < chunks) issue(i + 1);
    CUDA_CHECK(cudaEventSynchronize(staging_done_[i % 2]));
    const size_t offset = i * kStagingBytes;
    std::memcpy(out + offset, staging_[i % 2], std::min(kStagingBytes, bytes - offset));
  }
}

void CudaBackend::download_strided(void* host_dst, const void* src, size_t elem_bytes, int64_t count,
                                   size_t src_stride_bytes) {
  if (count <= 0 || elem_bytes == 0) return;
  PQ_ASSERT(host_dst && src && src_stride_bytes >= elem_bytes, "download_strided: bad arguments");
  // one 2D copy: `count` rows of elem_bytes, src_stride_bytes apart on the device, packed on the host
  CUDA_CHECK(cudaMemcpy2DAsync(host_dst, elem_bytes, src, src_stride_bytes, elem_bytes, static_cast<size_t>(count),
                               cudaMemcpyDeviceToHost, stream_));
  synchronize();
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

int CudaBackend::read_and_clear_flag() {
  CUDA_CHECK(cudaMemcpyAsync(host_flag_, flag_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaMemsetAsync(flag_, 0, sizeof(int), stream_));
  synchronize();
  return *host_flag_;
}

// --- dense linear algebra ---------------------------------------------------------------------------------------

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the row-major buffers read as column-major
// are already the transposes, so cuBLAS gets B first with the same op flags and m, n swapped.
void CudaBackend::gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                       const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  PQ_ASSERT(m >= 0 && n >= 0 && k >= 0, "gemm: m ", m, " n ", n, " k ", k);
  if (m == 0 || n == 0) return;
  PQ_ASSERT(lda >= (ta == Trans::kNo ? k : m) && ldb >= (tb == Trans::kNo ? n : k) && ldc >= n,
            "gemm: leading dimensions lda ", lda, " ldb ", ldb, " ldc ", ldc, " for m ", m, " n ", n, " k ", k);
  PQ_ASSERT(c && (k == 0 || (a && b)), "gemm: null pointer");
  const cublasOperation_t op_a = ta == Trans::kYes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = tb == Trans::kYes ? CUBLAS_OP_T : CUBLAS_OP_N;
  // cuBLAS wants leading dimensions >= 1 even when k = 0 makes them irrelevant
  CUBLAS_CHECK(cublasSgemm_64(cublas_, op_b, op_a, n, m, k, &alpha, b, std::max<int64_t>(ldb, 1), a,
                              std::max<int64_t>(lda, 1), &beta, c, ldc));
}

namespace {

// x [n] fp32 -> the bits of the 16-bit format, round to nearest even (as base/numeric.hpp does on the host).
__global__ void round_to_half_kernel(const float* x, uint16_t* out, int64_t n, bool bf16) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x[i])) : __half_as_ushort(__float2half_rn(x[i]));
}

}  // namespace

// x is rounded into a scratch buffer, then one cublasGemmEx with 16-bit A and B, fp32 C and fp32 compute (tensor
// cores; deterministic with atomics disallowed). The same row-major to column-major swap as gemm.
void CudaBackend::linear_half(const float* x, const uint16_t* w, HalfFormat format, float* y, int64_t m, int64_t n,
                              int64_t k) {
  PQ_ASSERT(m >= 0 && n >= 0 && k > 0, "linear_half: m ", m, " n ", n, " k ", k);
  if (m == 0 || n == 0) return;
  PQ_ASSERT(x && w && y, "linear_half: null pointer");
  const size_t bytes = sizeof(uint16_t) * static_cast<size_t>(m * k);
  if (bytes > half_scratch_bytes_) {
    deallocate(half_scratch_);
    half_scratch_ = nullptr;
    half_scratch_bytes_ = 0;
    half_scratch_ = allocate(bytes);
    half_scratch_bytes_ = bytes;
  }
  auto* xh = static_cast<uint16_t*>(half_scratch_);
  const bool bf16 = format == HalfFormat::kBF16;
  constexpr int kThreads = 256;
  round_to_half_kernel<<<grid_for(m * k, kThreads), kThreads, 0, stream_>>>(x, xh, m * k, bf16);
  CUDA_CHECK_LAUNCH();
  const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.0f, beta = 0.0f;
  CUBLAS_CHECK(cublasGemmEx_64(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, type, k, xh, type, k, &beta, y,
                               CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace pipequant::kernels
