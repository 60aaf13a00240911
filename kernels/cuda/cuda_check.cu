// The failure path of CUDA_CHECK / CUBLAS_CHECK / CUSOLVER_CHECK.
#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/cuda_check.hpp"

namespace pipequant::kernels::detail {

void cuda_library_failed(const char* library, int code, const char* text, const char* statement, const char* file,
                         int line) {
  int initialized = 0, finalized = 0, rank = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  char host[256] = "?";
  gethostname(host, sizeof(host) - 1);
  int device = -1;
  cudaGetDevice(&device);  // best effort: the context may be the thing that failed
  std::fprintf(stderr, "[%s r%d] %s error %d (%s): %s failed at %s:%d on device %d\n", host, rank, library, code,
               text ? text : "?", statement, file, line, device);
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 4);
  std::abort();
}

const char* cusolver_status_string(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "success";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUSOLVER_STATUS_INVALID_VALUE: return "invalid value";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "mapping error";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "internal error";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "matrix type not supported";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "not supported";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "invalid workspace";
    default: return "unknown cuSOLVER status";
  }
}

}  // namespace pipequant::kernels::detail
