#pragma once
// The planner: which ranks form which pipeline stage, which contiguous blocks each stage owns (balanced by
// weight bytes, or given by the user), and what memory each stage needs (docs/design.md section 7).

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "io/model_config.hpp"

namespace pipequant {

struct StagePlan {
  int stage = 0;
  int first_rank = 0;  // ranks [first_rank, first_rank + ranks) form the stage group
  int ranks = 1;
  int64_t first_block = 0;  // blocks [first_block, first_block + blocks)
  int64_t blocks = 0;
  uint64_t weight_bytes = 0;  // source bytes of the stage's blocks (plus embedding / head where owned)
  bool has_embedding = false;
  bool has_head = false;
  std::string fp_blocks;      // fp propagation: "resident" or "streamed" (see fp_blocks_resident); else empty
  uint64_t host_bytes = 0;    // estimated peak host memory per rank
  uint64_t device_bytes = 0;  // estimated peak backend memory per rank
};

struct Plan {
  int world = 1;
  int ranks_per_stage = 1;
  std::vector<StagePlan> stages;
};

struct PlanInputs {
  io::ModelConfig config;
  std::vector<uint64_t> block_bytes;  // source bytes of each block
  uint64_t embedding_bytes = 0;
  uint64_t head_bytes = 0;  // final norm + lm_head (0 extra when tied)
  int world = 1;
  int ranks_per_stage = 1;       // D
  std::string blocks_per_stage;  // "" = balance by bytes; "N" = N each (last takes the rest); "a,b,c" = explicit
  int64_t samples = 0;           // calibration samples of the whole job
  int64_t seq_len = 0;
  int64_t micro_batch = 1;
  bool fp_propagation = false;     // fp mode holds a stage's blocks in host memory (fp32) ...
  uint64_t fp_resident_bytes = 0;  // ... when twice their source bytes fit this
};

// Whether fp propagation keeps a stage whose blocks have `block_bytes` source bytes in host memory.
inline bool fp_blocks_resident(uint64_t block_bytes, uint64_t fp_resident_bytes) {
  return 2 * block_bytes <= fp_resident_bytes;
}

// Throws UserError when the world cannot be split (world % D != 0, more stages than blocks, a bad
// --blocks-per-stage).
Plan make_plan(const PlanInputs& in);
void print_plan(std::ostream& os, const Plan& plan);

}  // namespace pipequant
