#pragma once
// The stage worker: what one rank of a pipeline stage does to quantize its blocks (docs/design.md sections 2, 5, 7).
// Its phases, in order:
//   prepare()          inputs checked, the plan made and printed, the stage group formed, the fingerprint and the
//                      resume decision taken, the shard opened
//   obtain_inputs()    the stage's calibration inputs, through its propagation strategy (src/propagation.hpp)
//   quantize_block(b)  forward + Hessians per linear group, solves, pack + write, the block's outputs for the next
//   finish()           the model's dense tensors, the shard closed, metrics gathered, report and model.h5 on rank 0
// run_quantize (src/pipeline.hpp) runs them; a test can drive them block by block.

#include <array>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "comm/stage.hpp"
#include "comm/stage_group.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "kernels/backend.hpp"
#include "src/awq.hpp"
#include "src/calibration.hpp"
#include "src/model.hpp"
#include "src/options.hpp"
#include "src/planner.hpp"
#include "src/propagation.hpp"
#include "src/quant.hpp"
#include "src/report.hpp"
#include "src/resume.hpp"

namespace pipequant {

// What a linear's record and output say beyond its solve: AWQ's choices, an expert's tokens (io::PackedLinear).
struct LinearNotes {
  double awq_alpha = -1.0;
  double awq_clip = 1.0;
  int64_t expert_tokens = -1;
  std::string expert_hessian;
};

class StageWorker {
 public:
  // Reads and checks the inputs (every rank, headers only: tensor data is mapped when first read).
  explicit StageWorker(const QuantizeOptions& options);
  ~StageWorker();
  StageWorker(const StageWorker&) = delete;
  StageWorker& operator=(const StageWorker&) = delete;

  // Collective on the world. False with --dry-run: the plan is printed and nothing else happens.
  bool prepare();
  void obtain_inputs();
  // Blocks in order, first_block() to end_block() - 1; a block an earlier run completed is replayed from its shard.
  void quantize_block(int64_t b);
  // Collective on the world; rank 0 returns every stage's metrics, the other ranks an empty vector.
  std::vector<StageMetrics> finish();

  int64_t first_block() const { return stage_plan().first_block; }
  int64_t end_block() const { return stage_plan().first_block + stage_plan().blocks; }

 private:
  using GroupErrors = std::array<double, kLinearGroups>;  // the largest relative error of each linear group

  const StagePlan& stage_plan() const { return plan_.stages[static_cast<size_t>(group_ ? group_->layout().stage : 0)]; }
  void check_outputs_writable() const;
  void decide_resume();
  void open_stage();
  void embed_inputs();
  StageContext context();

  // A linear group's Hessian and the baseline terms of its linears' errors (kLinearCount slots, the group's set).
  struct GroupInputs {
    std::vector<float> h;
    std::array<BaselineTerms, kLinearCount> terms{};
    std::vector<float> magnitudes;  // AWQ: RMS of each input channel, from diag(H)
  };
  // An AWQ linear, quantized and held until its block ends: a later group's scales may fold into its rows. Its
  // values (a QuantizedLinear) are shared with the runner's copy under quantized propagation.
  struct PendingLinear {
    Linear linear;
    BaselineTerms terms;
    double solve_seconds = 0.0;
    double awq_alpha = -1.0;
    double awq_clip = 1.0;
  };
  GroupErrors solve_block(int64_t b);
  GroupErrors replay_resumed_block(int64_t b);
  GroupInputs group_hessian(int64_t b, int group);
  bool terms_from_inputs(int group) const;
  void add_terms_from_inputs(int group, const std::vector<float>& x, GroupInputs& in);
  void add_terms_from_hessian(int group, GroupInputs& in);
  std::optional<GptqFactor> group_factor(int group, std::vector<float> h);
  using TileQuantizer = std::function<QuantizedLinear(const float* w, int64_t rows)>;
  QuantizedLinear solve_rows(Linear source, int64_t r0, int64_t r1, const TileQuantizer& quantize_tile);
  QuantizedLinear solve_owned_rows(int index, const TileQuantizer& quantize_tile);
  double quantize_linear(int64_t b, int index, std::optional<GptqFactor>& factor, bool last_of_group,
                         const BaselineTerms& terms);
  void gather_linear(QuantizedLinear& ql, double error2, const BaselineTerms& terms, int64_t out);
  void write_linear_result(int64_t b, const std::string& module, const QuantizedLinear& ql, const BaselineTerms& terms,
                           double solve_seconds, const LinearNotes& notes = LinearNotes());
  bool awq_can_fold(int group) const;
  double awq_group(int64_t b, int group, const GroupInputs& in);
  void fold_awq_scales(int group, const std::vector<float>& scales);
  double awq_linear(int64_t b, int index, const AwqScaleChoice& choice, const GroupInputs& in, const float* h_backend);
  void write_pending_linears(int64_t b);
  void note_forward_peak();  // the backend's high-water mark of the forward + Hessian phase
  void note_solve_peak();    // ... of a solve
  // Mixture-of-Experts blocks (src/stage_worker_moe.cpp)
  struct MoeInputs;
  struct ExpertSolve;
  void solve_experts(int64_t b, GroupErrors& errors);
  MoeInputs moe_inputs();
  std::vector<float> expert_hessian(const MoeInputs& in, int64_t e, bool down_inputs);
  void solve_expert_round(int64_t b, const MoeInputs& in, int64_t first, std::vector<ExpertSolve>& round, bool down);
  void solve_expert(int64_t b, int64_t e, std::vector<float> h, ExpertSolve& out, bool down);
  void share_expert_round(int64_t first, std::vector<ExpertSolve>& round, bool down);
  void write_expert_round(int64_t b, const MoeInputs& in, int64_t first, const std::vector<ExpertSolve>& round,
                          GroupErrors& errors);
  void write_block_tensors(int64_t b);
  void post_progress(int64_t b, double seconds, const GroupErrors& errors);

  void write_model_tensors();
  std::vector<uint64_t> bytes_per_member(uint64_t mine) const;
  std::vector<StageMetrics> gather_metrics() const;
  void report(const std::vector<StageMetrics>& stages);

  const QuantizeOptions& opt_;
  const bool world_root_;
  const Clock::time_point t_start_;
  // inputs and plan
  io::ModelConfig config_;
  io::Checkpoint ckpt_;
  Samples calib_;
  Plan plan_;
  // the stage
  std::unique_ptr<comm::StageGroup> group_;
  io::ModelIndex index_;
  bool resume_ = false;
  std::set<int64_t> done_;                        // blocks an earlier run completed and verified
  std::map<int64_t, ResumedBlock> resumed_;       // ... and what they hold
  std::unique_ptr<io::ShardWriter> shard_;
  std::unique_ptr<kernels::Backend> backend_;
  std::optional<kernels::HalfFormat> half_;
  std::unique_ptr<WeightSource> source_;
  std::unique_ptr<comm::ActivationTransport> transport_;
  std::unique_ptr<BlockRunner> runner_;
  std::unique_ptr<PropagationStrategy> propagation_;
  std::unique_ptr<comm::ProgressRelay> progress_;
  // this rank's calibration samples [sample_begin_, sample_begin_ + batches_.samples) and their activations
  int64_t sample_begin_ = 0;
  MicroBatches batches_;
  std::vector<float> x_;
  // the block's norms (input, post-attention) as the output holds them: AWQ folds its scales into them
  std::array<std::vector<float>, 2> norms_;
  std::array<std::optional<PendingLinear>, kLinearCount> pending_;  // AWQ
  std::vector<ExpertWeights> experts_;  // an MoE block's experts as held (quantized ones replace the source's)
  StageMetrics metrics_;
  Clock::time_point t_sync_;
};

}  // namespace pipequant
