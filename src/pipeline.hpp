#pragma once
// The block-by-block driver: quantize a checkpoint (DESIGN.md section 2) and evaluate perplexity through the
// same block forward.

#include <cstdint>
#include <string>
#include <vector>

#include "src/quant.hpp"
#include "src/report.hpp"

namespace pipequant {

struct RunOptions {
  std::string backend = "auto";  // auto | cpu | cuda
  int threads = 0;               // CPU threads, 0 = all cores
  int64_t micro_batch = 4;       // samples per forward call
  double gpu_mem_gb = 0.0;       // CUDA allocator budget per rank in GB (1e9 bytes); 0 = free memory less a margin
  // GEMMs of the block forward: auto (the checkpoint's bf16/fp16 on the cuda backend, fp32 otherwise) | fp32 |
  // bf16 | fp16; everything else runs in fp32
  std::string compute_dtype = "auto";
};

struct QuantizeOptions {
  std::string model_dir;
  std::string calib_path;
  std::string out_dir;
  int64_t seq_len = 2048;
  int64_t nsamples = 0;  // 0: all windows of the file, at most 128
  QuantConfig quant;
  std::string propagation = "quantized";  // quantized | fp
  bool overwrite = false;
  std::string metrics_path;
  std::string args_json;         // the command line as JSON, stored in model.h5
  int ranks_per_stage = 1;       // D: ranks of one stage group (world = P stages x D)
  std::string blocks_per_stage;  // "" = balance by bytes; "N" or "a,b,c"
  bool dry_run = false;          // print the plan and stop
  // fp propagation keeps a stage's blocks in host memory when their fp32 copies (counted as twice the source
  // bytes) fit this, and streams them one at a time otherwise
  uint64_t fp_resident_bytes = uint64_t{16} * 1000 * 1000 * 1000;
  RunOptions run;
};

struct EvalOptions {
  std::string model_dir;
  std::string quantized_dir;  // empty: the original checkpoint
  std::string tokens_path;
  int64_t seq_len = 2048;
  int64_t max_windows = 0;  // 0: all
  RunOptions run;
};

struct EvalResult {
  double perplexity = 0.0;
  double nll_sum = 0.0;
  int64_t predicted = 0;
  int64_t windows = 0;
  double seconds = 0.0;
};

// Both throw UserError for bad inputs; both print progress on rank 0.
std::vector<StageMetrics> run_quantize(const QuantizeOptions& options);
EvalResult run_eval(const EvalOptions& options);

// Logits [tokens.size(), vocab] of one sequence through the original checkpoint (tests, debugging).
std::vector<float> sequence_logits(const std::string& model_dir, const std::vector<int32_t>& tokens,
                                   const RunOptions& run);

}  // namespace pipequant
