// The failure path of CUDA_CHECK / CUBLAS_CHECK / CUSOLVER_CHECK.
#include "base/abort.hpp"
#include "base/error.hpp"
#include "kernels/cuda/cuda_check.hpp"

namespace pipequant::kernels::detail {

void cuda_library_failed(const char* library, int code, const char* text, const char* statement, const char* file,
                         int line) {
  int device = -1;
  cudaGetDevice(&device);  // best effort: the context may be the thing that failed
  abort_job(::pipequant::detail::concat(library, " error ", code, " (", text ? text : "?", "): ", statement, " failed at ", file, ":",
                           line, " on device ", device),
            4, Failure::kInternal);
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
