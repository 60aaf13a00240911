// Backend selection: the CUDA entry points resolve to the CUDA backend when it is built, and say so when not.
#include "kernels/backend.hpp"
#include "base/error.hpp"

#ifndef PIPEQUANT_HAVE_CUDA
namespace pipequant::kernels {

int cuda_device_count() { return 0; }

std::unique_ptr<Backend> make_cuda_backend(int, size_t, int) {
  fail("--backend cuda: this build of pipequant has no CUDA backend (no nvcc was found when it was built)");
}

}  // namespace pipequant::kernels
#endif
