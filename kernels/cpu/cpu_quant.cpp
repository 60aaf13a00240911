// CpuBackend: factorization, quantization grid and the GPTQ column loop.
#include "kernels/cpu/cpu_backend.hpp"
#include "kernels/error.hpp"

namespace pipequant::kernels {

bool CpuBackend::reverse_cholesky(float*, int64_t) { PQ_ASSERT(false, "reverse_cholesky: not written yet"); return false; }
void CpuBackend::quant_params(const float*, int64_t, int64_t, int64_t, QuantGrid, float*, float*, int64_t) { PQ_ASSERT(false, "quant_params: not written yet"); }
void CpuBackend::quantize(const float*, int64_t, int64_t, const float*, const float*, int64_t, const int32_t*, QuantGrid, uint8_t*, float*) { PQ_ASSERT(false, "quantize: not written yet"); }
void CpuBackend::gptq_block(const GptqBlockArgs&) { PQ_ASSERT(false, "gptq_block: not written yet"); }

}  // namespace pipequant::kernels
