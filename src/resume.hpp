#pragma once
// Resuming a quantization (docs/design.md section 5): the run's fingerprint, rank 0's decision whether an existing
// output is resumed, started fresh or refused, and what a stage's shard already holds.

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "comm/stage_group.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "src/calibration.hpp"
#include "src/model.hpp"
#include "src/options.hpp"
#include "src/report.hpp"

namespace pipequant {

// The fingerprint in three parts, so that a refusal can say which input changed: the model (config, tensor names,
// dtypes and shapes, and samples of the weights themselves), the calibration tokens, and the options that change
// the result (not the input paths: the same files under another spelling are the same run).
struct RunFingerprint {
  std::string model, calib, args;  // 16 hex digits each
  std::string str() const { return "model-" + model + "-calib-" + calib + "-args-" + args; }
};

// sample_weights: also digest 8 runs of 512 bytes of every tensor, read from the files (rank 0, which alone
// decides, does this).
RunFingerprint fingerprint_run(const io::ModelConfig& config, const io::Checkpoint& ckpt, const Samples& calib,
                               const std::string& fingerprint_args_json, bool sample_weights);

// Rank 0: whether opt.out_dir is resumed (its model.h5 has index.fingerprint and no --overwrite). A fresh start
// removes what an earlier run left; either way model.h5 is written with complete = 0 until the run finishes.
// Throws UserError when the directory holds another run's output (saying what differs) or shards without a
// model.h5, unless --overwrite.
bool decide_resume(const QuantizeOptions& opt, io::ModelIndex& index);

// What an earlier run left in this stage's shard: the blocks whose complete marker and checksums verify (read by
// the group root and agreed by the group), and whether the shard could be read at all.
struct ShardState {
  std::set<int64_t> done;
  bool readable = false;
};
// Collective on the group; `resume` false gives an empty state.
ShardState agree_on_shard_state(const comm::StageGroup& group, const io::ModelConfig& config,
                                const std::string& shard_path, int64_t first_block, int64_t blocks, bool resume);

// A block an earlier run completed: its dequantized weights (quantized propagation feeds them forward) and what
// that run measured, in block_modules order.
struct ResumedBlock {
  std::vector<std::vector<float>> w;  // [out, in] each
  std::vector<LinearRecord> records;
  std::array<std::vector<float>, 2> norms;  // input and post-attention, as written (AWQ folds scales into them)
};
std::map<int64_t, ResumedBlock> load_resumed_blocks(const io::ModelConfig& config, const std::string& shard_path,
                                                    const std::set<int64_t>& blocks);

}  // namespace pipequant
