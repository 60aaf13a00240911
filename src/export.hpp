#pragma once
// `pipequant export OUT --to DIR --format gptq|awq`: a Hugging Face checkpoint directory made from a complete
// quantized output, in the layout inference engines load (io/hf_quant.hpp, docs/export.md): config.json with its
// quantization_config, *.safetensors of bounded size (with model.safetensors.index.json when there are several),
// quantize_config.json for GPTQ, and the tokenizer files of the source model. Everything is written into DIR.partial
// and renamed to DIR at the very end. Collective: the safetensors files go round-robin to the ranks, so the files
// and their bytes do not depend on the number of ranks; rank 0 writes the rest.

#include <array>
#include <cstdint>
#include <string>

namespace pipequant {

enum class ExportFormat { kGptq, kAwq };
// GPTQ's zero-point convention: gptq (v1) stores zero - 1, gptq_v2 the zero; auto takes v1 when it can hold them.
enum class CheckpointFormat { kAuto, kGptq, kGptqV2 };

const char* name(ExportFormat f);      // "gptq", "awq"
const char* name(CheckpointFormat f);  // "auto", "gptq", "gptq_v2"

inline constexpr std::array kExportFormats{ExportFormat::kGptq, ExportFormat::kAwq};
inline constexpr std::array kCheckpointFormats{CheckpointFormat::kAuto, CheckpointFormat::kGptq,
                                               CheckpointFormat::kGptqV2};

struct ExportOptions {
  std::string out_dir;  // a complete pipequant output (model.h5, shard-*.h5)
  std::string to_dir;   // the checkpoint directory to make
  ExportFormat format = ExportFormat::kGptq;
  CheckpointFormat checkpoint_format = CheckpointFormat::kAuto;
  std::string model_dir;                     // where the tokenizer files are; empty: the --model recorded in model.h5
  uint64_t max_shard_bytes = 5'000'000'000;  // per .safetensors file (one linear or tensor larger gets a file alone)
  bool overwrite = false;                    // replace a DIR that is not empty
};

// Collective over the world. Throws UserError (one line: the linear or file, and what was expected) for an output
// that is not complete, a DIR that is not empty without --overwrite, and a model the format cannot hold.
void run_export(const ExportOptions& options);

}  // namespace pipequant
