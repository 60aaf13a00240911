#pragma once
// Status checks for the CUDA runtime, cuBLAS and cuSOLVER. One template serves the three libraries: on
// failure it prints the failing statement, file:line, rank, host and device, then aborts the whole MPI job
// (a bare exit on one rank would leave the others hanging in a collective).
//
//   CUDA_CHECK(cudaMemcpyAsync(...));
//   CUBLAS_CHECK(cublasSgemm_64(...));
//   CUSOLVER_CHECK(cusolverDnXpotrf(...));

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

namespace pipequant::kernels::detail {

// Prints "[host rN] <library> error <code> (<text>): <statement> failed at file:line on device D" and
// calls MPI_Abort (std::abort when MPI is not running). Defined in cuda_check.cu.
[[noreturn]] void cuda_library_failed(const char* library, int code, const char* text, const char* statement,
                                      const char* file, int line);

const char* cusolver_status_string(cusolverStatus_t status);

// What each library calls success and how it names its errors.
template <typename Status>
struct StatusTraits;

template <>
struct StatusTraits<cudaError_t> {
  static constexpr const char* kLibrary = "CUDA";
  static bool ok(cudaError_t s) { return s == cudaSuccess; }
  static const char* text(cudaError_t s) { return cudaGetErrorString(s); }
};

template <>
struct StatusTraits<cublasStatus_t> {
  static constexpr const char* kLibrary = "cuBLAS";
  static bool ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }
  static const char* text(cublasStatus_t s) { return cublasGetStatusString(s); }
};

template <>
struct StatusTraits<cusolverStatus_t> {
  static constexpr const char* kLibrary = "cuSOLVER";
  static bool ok(cusolverStatus_t s) { return s == CUSOLVER_STATUS_SUCCESS; }
  static const char* text(cusolverStatus_t s) { return cusolver_status_string(s); }
};

// The one check: the status type is named explicitly by each macro, so CUDA_CHECK on a cuBLAS call does
// not compile.
template <typename Status>
inline void check_status(Status status, const char* statement, const char* file, int line) {
  if (!StatusTraits<Status>::ok(status)) {
    cuda_library_failed(StatusTraits<Status>::kLibrary, static_cast<int>(status), StatusTraits<Status>::text(status),
                        statement, file, line);
  }
}

}  // namespace pipequant::kernels::detail

#define PQ_CHECK_STATUS_GEN(Status, statement) \
  ::pipequant::kernels::detail::check_status<Status>((statement), #statement, __FILE__, __LINE__)

#define CUDA_CHECK(statement) PQ_CHECK_STATUS_GEN(cudaError_t, statement)
#define CUBLAS_CHECK(statement) PQ_CHECK_STATUS_GEN(cublasStatus_t, statement)
#define CUSOLVER_CHECK(statement) PQ_CHECK_STATUS_GEN(cusolverStatus_t, statement)
// After a kernel launch: launch-configuration errors surface here, execution errors at the next sync.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
