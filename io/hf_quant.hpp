#pragma once
// The quantized-linear layouts of the Hugging Face checkpoints that inference engines load (docs/export.md), and
// their quantization_config. Both directions live here: `pipequant export` packs, `eval --model` unpacks.
//
// GPTQ (quant_method "gptq"), per linear <module>.{qweight,qzeros,scales,g_idx}, K = in_features, N = out_features:
//   qweight int32 [K*bits/32, N]   one little-endian bit stream per output column along K (3-bit codes straddle
//                                  words); written as ceil(K*bits/32) rows when K*bits is not a multiple of 32
//   qzeros  int32 [G, N*bits/32]   one bit stream per group along N (ceil likewise)
//                                  checkpoint_format "gptq": stores zero - 1 (masked to bits); loaders add 1 after
//                                  unpacking, so a zero of 0 cannot be stored (it reads back as 2^bits)
//                                  checkpoint_format "gptq_v2": stores the zero as it is
//   scales  fp16 [G, N]
//   g_idx   int32 [K]              group of each input channel (act-order permutes it)
//   W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])
// AWQ (quant_method "awq", version "gemm", AutoAWQ's WQLinear_GEMM), 4-bit only, groups along K without act-order:
//   qweight int32 [K, N/8]   word j of row k holds column 8j + kAwqOrder[p] in bits [4p, 4p + 4)
//   qzeros  int32 [G, N/8]   the same packing of the zeros, stored as they are
//   scales  fp16 [G, N]
//   W[n, k] = scales[k / group_size, n] * (q[k, n] - zero[k / group_size, n])

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace pipequant::io {

// The order in which AutoAWQ's GEMM layout places 8 consecutive output columns in the nibbles of a word.
inline constexpr std::array<int, 8> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};

enum class HfQuantFormat { kGptq, kGptqV2, kAwq };
const char* name(HfQuantFormat f);  // "gptq", "gptq_v2", "awq"

// What a checkpoint's quantization_config says (config.json, or quantize_config.json / quant_config.json beside it).
struct HfQuantConfig {
  HfQuantFormat format = HfQuantFormat::kGptq;
  int bits = 4;
  int64_t group_size = 128;  // -1: one group per row
  bool desc_act = false;     // GPTQ act-order: g_idx is not k / group_size
  bool sym = false;
  bool static_groups = false;
  bool zero_point = true;              // AWQ
  std::optional<double> damp_percent;  // GPTQ: written when given, read when present
};

// The quantization_config object written into config.json (and quantize_config.json for GPTQ), with the tool that
// made it in meta.
nlohmann::json quantization_config_json(const HfQuantConfig& c, const std::string& producer);
// Parses a quantization_config object; nullopt when `j` is not a GPTQ or AWQ config. Both spellings are read: the
// transformers/GPTQ keys (quant_method, bits, group_size, desc_act, sym, static_groups, checkpoint_format) and
// AutoAWQ's quant_config.json (w_bit, q_group_size, zero_point, version). Throws UserError naming `origin` and the
// field for a malformed or unsupported one (bits not 2/3/4/8, AWQ not 4-bit or not version gemm, checkpoint_format
// not gptq/gptq_v2, a quantized lm_head, ...).
std::optional<HfQuantConfig> parse_quantization_config(const nlohmann::json& j, const std::string& origin);
// The quantization config of a checkpoint directory: config.json's quantization_config, else quantize_config.json,
// else quant_config.json; nullopt when there is none. Throws UserError when config.json's quantization_config names
// a method other than GPTQ or AWQ.
std::optional<HfQuantConfig> read_quantization_config(const std::string& model_dir);

// GPTQ zeros [G, N] (integers in [0, 2^bits - 1]) to qzeros words [G, ceil(N*bits/32)]. v1 (format kGptq) stores
// zero - 1; throws UserError naming `where` and the first (group, column) whose zero is 0, which v1 cannot hold.
std::vector<int32_t> gptq_pack_zeros(const uint8_t* zeros_gn, int64_t g, int64_t n, int bits, HfQuantFormat format,
                                     const std::string& where);
// The zeros [G, N] as the public loaders read them: v1 adds 1 after unpacking (so 2^bits - 1 stored reads as
// 2^bits, as AutoGPTQ and vLLM read it); words [G, ceil(N*bits/32)].
std::vector<int32_t> gptq_unpack_zeros(const int32_t* words, int64_t g, int64_t n, int bits, HfQuantFormat format);
// Whether v1 can hold these zeros (none is 0).
bool gptq_v1_can_hold(const uint8_t* zeros_gn, int64_t count);

// AWQ: codes [K][N] (values < 16) to words [K][N/8] in kAwqOrder; N must be a multiple of 8. The same function packs
// zeros [G][N] to [G][N/8].
std::vector<int32_t> awq_pack(const uint8_t* codes, int64_t rows, int64_t n);
std::vector<uint8_t> awq_unpack(const int32_t* words, int64_t rows, int64_t n);

}  // namespace pipequant::io
