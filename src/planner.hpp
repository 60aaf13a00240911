#pragma once
// The planner: which ranks form which pipeline stage, which contiguous blocks each stage owns (balanced by
// weight bytes, or given by the user), and what memory one rank of each stage needs, phase by phase, counted
// from what the quantize path allocates (docs/design.md sections 6 and 7). `pipequant plan` makes it for any
// world size from config.json and the safetensors headers alone, in one process; quantize prints it and refuses,
// before any work, a plan that does not fit --host-mem or --gpu-mem.

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "src/options.hpp"

namespace pipequant {

// The phases of a stage's work as the memory estimate sees them, in the order they come (src/stage_worker.hpp).
enum class Phase {
  kEmbed,      // the first stage embeds its samples' tokens (through the fp32 embedding table)
  kInputs,     // obtain_inputs: the stage's inputs arrive; fp propagation forwards them through the stage's blocks
  kHessian,    // forward + Hessian of a linear group, up to its sum over the stage group
  kSolve,      // the GPTQ solve of a linear: factorization and column loop
  kCheck,      // after the solve: rows gathered, relative errors of GPTQ and of the RTN baseline, packing
  kPropagate,  // the block's outputs become the next block's inputs
};
inline constexpr std::array kPhases{Phase::kEmbed, Phase::kInputs, Phase::kHessian,
                                    Phase::kSolve, Phase::kCheck,  Phase::kPropagate};
// "embed", "inputs", "hessian", "solve", "check", "propagate".
const char* name(Phase phase);
inline constexpr unsigned phase_bit(Phase phase) { return 1u << static_cast<int>(phase); }

// One term of a stage's memory estimate: what one rank holds, where, and in which phases.
struct MemoryTerm {
  std::string name;  // an identifier ("hessian_sum_fp64"): a line of plan --verbose, a key of plan --json
  uint64_t bytes = 0;
  bool backend = false;  // backend memory (the GPU's on cuda; on the CPU backend it is host memory)
  unsigned phases = 0;   // phase_bit() of each phase it is live in
  bool live_in(Phase phase) const { return (phases & phase_bit(phase)) != 0; }
};

// What one rank of a stage holds at once in one phase.
struct PhasePeak {
  Phase phase = Phase::kEmbed;
  uint64_t host_bytes = 0;    // host memory, the CPU backend's included
  uint64_t device_bytes = 0;  // backend memory
};

// Memory per rank a plan is checked against; 0 = not checked.
struct MemoryBudgets {
  double host_gb = 0.0;    // --host-mem
  double device_gb = 0.0;  // --gpu-mem (the cuda backend's budget; the CPU backend's memory is host memory)
};

struct StagePlan {
  int stage = 0;
  int first_rank = 0;  // ranks [first_rank, first_rank + ranks) form the stage group
  int ranks = 1;
  int64_t first_block = 0;  // blocks [first_block, first_block + blocks)
  int64_t blocks = 0;
  uint64_t weight_bytes = 0;  // source bytes of the stage's blocks (plus embedding / head where owned)
  bool has_embedding = false;
  bool has_head = false;
  std::string fp_blocks;          // fp propagation: "resident" or "streamed" (see fp_blocks_resident); else empty
  uint64_t host_bytes = 0;        // estimated peak host memory per rank: the largest phase's (CPU backend included)
  uint64_t device_bytes = 0;      // estimated peak backend memory per rank: the largest phase's
  std::vector<MemoryTerm> terms;  // what the estimate counts (stage_memory_terms)
  std::vector<PhasePeak> phases;  // the sums of the terms live in each phase, in the order of Phase
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
  // where the arithmetic runs: kAuto is decided as quantize decides it (cuda when a device is visible)
  BackendKind backend = BackendKind::kAuto;
  ComputeDtype compute_dtype = ComputeDtype::kAuto;  // the forward's weights on the backend: 16-bit or fp32
  int64_t group_size = 128;                          // quantization groups (the solve's tables)
  // the process itself (binary, MPI, BLAS, CUDA libraries): its resident set where the plan is made
  uint64_t process_bytes = 0;
  // checked by plan_refusal; a --gpu-mem budget also sends the solves that do not fit it to the host, as quantize
  // does (docs/design.md section 4, fallback 3)
  MemoryBudgets budgets;
};

struct Plan {
  int world = 1;
  int ranks_per_stage = 1;
  BackendKind backend = BackendKind::kCpu;  // as decided (never kAuto)
  bool half_weights = false;                // the forward's weights are 16-bit on the backend
  std::vector<StagePlan> stages;
  PlanInputs inputs;  // what it was made from (to plan variations of it)
};

// Whether fp propagation keeps a stage whose blocks have `block_bytes` source bytes in host memory.
inline bool fp_blocks_resident(uint64_t block_bytes, uint64_t fp_resident_bytes) {
  return 2 * block_bytes <= fp_resident_bytes;
}

// The most calibration samples one rank of a stage group of `ranks` holds: samples go to the ranks in whole
// Hessian chunks (comm::StageGroup::owned_range with kHessianChunk).
int64_t samples_per_rank(int64_t samples, int ranks);

// The terms of stage s's memory estimate per rank, one for each buffer of the quantize path that is not bounded by
// a small constant (upload staging, attention tiles), for GPTQ (RTN holds less), at the linear group that needs the
// most; the process itself as PlanInputs::process_bytes. `plan` gives the decided backend and weight format.
std::vector<MemoryTerm> stage_memory_terms(const PlanInputs& in, const Plan& plan, const StagePlan& s);

// Throws UserError when the world cannot be split (world % D != 0, more stages than blocks, a bad
// --blocks-per-stage, fewer Hessian chunks of samples than ranks in a stage).
Plan make_plan(const PlanInputs& in);
// The block sizes, embedding and head of a checkpoint, from its headers only (no tensor data is read).
void add_checkpoint_sizes(PlanInputs& in, const io::Checkpoint& checkpoint);

// The layout `plan` recommends for in.world ranks and in's propagation mode, among the splits P x D of the world
// that can be made and fit the budgets: which keeps the most ranks busy. Quantized propagation runs the stages one
// after another, so only one stage group works at a time: the widest group (the fewest stages) that the Hessian
// chunks of the samples allow. fp propagation runs every stage at once: the most stages (D = 1 where the blocks
// allow). Nothing when no split fits.
struct LayoutAdvice {
  int stages = 0;
  int ranks_per_stage = 0;
  std::string why;
};
std::optional<LayoutAdvice> recommend_layout(const PlanInputs& in);

// The inputs of a plan from the options `plan` takes (quantize fills a PlanOptions from its own): the checkpoint's
// sizes, the layout, the calibration shape, the backend and the budgets.
PlanInputs plan_inputs(const PlanOptions& options, const io::ModelConfig& config, const io::Checkpoint& checkpoint);

// The table quantize prints (a row per stage: ranks, blocks, weights, host and device peaks), below it each stage's
// peak by phase, a line on the backend, and, when plan.inputs has budgets, whether the plan fits them. verbose: each
// stage's memory terms too.
void print_plan(std::ostream& os, const Plan& plan, bool verbose = false);
// "fits: yes: ..." or "fits: no: <refusal>" when the plan's inputs carry a budget; nothing otherwise.
void print_fit(std::ostream& os, const Plan& plan);
// {"world", "ranks_per_stage", "backend", "stages": [{"stage", "ranks", "blocks": [first, last], "host_peak_gb",
// "device_peak_gb", "weights_gb", "phases", "host_terms_gb", "device_terms_gb"}], "fits", "refusal"} (GB = 1e9 bytes).
nlohmann::json plan_json(const Plan& plan);

// "" when every stage fits plan.inputs.budgets; otherwise one line naming the stage, what it needs, the budget and
// what would make it fit: "stage 0 needs 49.9 GB of device memory, --gpu-mem is 40: use --micro-batch 1".
std::string plan_refusal(const Plan& plan);

// quantize, on every rank, with the run's plan (made with its backend, compute dtype, group size and budgets):
// throws UserError(plan_refusal) when a stage does not fit; rank 0 says so when a budget was checked and fits.
void check_plan_fits(const Plan& run);

// `pipequant plan`: reads config.json and the safetensors headers, plans, prints (rank 0 only). Returns the exit
// code: 0 when the plan fits the budgets, 1 when it does not (the refusal is printed).
int run_plan(const PlanOptions& options, std::ostream& os);

}  // namespace pipequant
