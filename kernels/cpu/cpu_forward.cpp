// CpuBackend: the Llama block forward, the Hessian accumulation and the loss.
#include "kernels/cpu/cpu_backend.hpp"
#include "kernels/error.hpp"

namespace pipequant::kernels {

void CpuBackend::rms_norm(const float*, const float*, float*, int64_t, int64_t, float) { PQ_ASSERT(false, "rms_norm: not written yet"); }
void CpuBackend::rope(float*, int64_t, int64_t, int64_t, int64_t, const float*) { PQ_ASSERT(false, "rope: not written yet"); }
void CpuBackend::attention(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) { PQ_ASSERT(false, "attention: not written yet"); }
void CpuBackend::swiglu(const float*, const float*, float*, int64_t) { PQ_ASSERT(false, "swiglu: not written yet"); }
void CpuBackend::add(float*, const float*, int64_t) { PQ_ASSERT(false, "add: not written yet"); }
void CpuBackend::add_bias(float*, const float*, int64_t, int64_t) { PQ_ASSERT(false, "add_bias: not written yet"); }
double CpuBackend::nll_sum(const float*, const int32_t*, int64_t, int64_t) { PQ_ASSERT(false, "nll_sum: not written yet"); return 0; }
void CpuBackend::hessian_accumulate(const float*, int64_t, int64_t, float*) { PQ_ASSERT(false, "hessian_accumulate: not written yet"); }

}  // namespace pipequant::kernels
