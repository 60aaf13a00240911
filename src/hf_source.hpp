#pragma once
// Hugging Face GPTQ and AWQ checkpoints as a weight source: each linear's qweight/qzeros/scales/g_idx unpacked to
// codes and tables (a QuantizedLinear, exact and compact) the way the public loaders read them (io/hf_quant.hpp),
// everything else read as an unquantized checkpoint's tensors are.

#include <memory>
#include <optional>
#include <string>

#include "io/hf_quant.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "src/model.hpp"

namespace pipequant {

// The tensors that stand for <module>.weight in a checkpoint of this format: qweight, qzeros, scales and g_idx
// (g_idx may be absent where the groups are k / group_size).
const std::vector<std::string>& hf_linear_tensor_suffixes();

// Checks one linear `module` (e.g. "model.layers.0.mlp.up_proj") of shape [out, in] against the quantization
// config: dtypes and shapes of qweight, qzeros, scales and g_idx. Throws UserError naming the file and the tensor.
void expect_hf_quantized_linear(const io::Checkpoint& ckpt, const io::ModelConfig& config,
                                const io::HfQuantConfig& quant, const std::string& module, int64_t out, int64_t in);

// Reads one quantized linear [out, in] into codes and tables: v1 zeros as the loaders read them (stored + 1, so a
// zero may be 2^bits), g_idx from the file or k / group_size. Throws UserError naming the file and tensor for a
// bad shape, dtype or value.
QuantizedLinear read_hf_quantized_linear(const io::Checkpoint& ckpt, const io::HfQuantConfig& quant,
                                         const std::string& module, int64_t out, int64_t in);

// The source for `pipequant eval --model DIR`: an unquantized checkpoint, or a GPTQ/AWQ one when the directory's
// config says so (io::read_quantization_config); validated either way.
std::unique_ptr<WeightSource> model_source(const io::Checkpoint& checkpoint, const std::string& model_dir,
                                           const io::ModelConfig& config);

}  // namespace pipequant
