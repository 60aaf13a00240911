#include "src/stage_worker.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "base/numeric.hpp"
#include "comm/world.hpp"
#include "src/driver_util.hpp"
#include "src/hessian.hpp"
#include "src/moe.hpp"
#include "src/pipeline.hpp"

namespace pipequant {

namespace {

std::string shard_file(int stage, int stages) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05d-of-%05d.h5", stage, stages);
  return buf;
}

Samples load_calibration(const QuantizeOptions& opt, const io::ModelConfig& config) {
  const io::TokenFile file = io::read_tokens(opt.calib_path);
  check_vocab(file, config.vocab_size, config.path);
  Samples calib = calibration_samples(file, opt.seq_len, opt.nsamples, 128);
  const int64_t chunks = (calib.count + kHessianChunk - 1) / kHessianChunk;
  PQ_REQUIRE(chunks >= opt.ranks_per_stage, "--ranks-per-stage ", opt.ranks_per_stage, ": the ", calib.count,
             " calibration samples form ", chunks, " Hessian chunk(s) of up to ", kHessianChunk,
             " samples and each rank of a stage needs one; use at least ",
             kHessianChunk * (opt.ranks_per_stage - 1) + 1, " samples (--nsamples) or fewer ranks per stage");
  return calib;
}

Plan make_quantize_plan(const QuantizeOptions& opt, const io::ModelConfig& config, const io::Checkpoint& ckpt,
                        const Samples& calib) {
  PlanOptions p;
  p.model_dir = opt.model_dir;
  p.world = world_size();
  p.ranks_per_stage = opt.ranks_per_stage;
  p.blocks_per_stage = opt.blocks_per_stage;
  p.seq_len = calib.seq;
  p.nsamples = calib.count;
  p.propagation = opt.propagation;
  p.fp_resident_bytes = opt.fp_resident_bytes;
  p.run = opt.run;
  p.host_mem_gb = opt.host_mem_gb;
  p.group_size = opt.quant.group_size;
  return make_plan(plan_inputs(p, config, ckpt));
}

// model.h5's contents: the source config, the arguments, the fingerprint, which shard holds what.
io::ModelIndex make_model_index(const QuantizeOptions& opt, const io::ModelConfig& config, const io::Checkpoint& ckpt,
                                const Plan& plan, const std::string& fingerprint) {
  const int stages = static_cast<int>(plan.stages.size());
  io::ModelIndex index;
  index.config_json = config.raw.dump();
  index.args_json = opt.args_json;
  index.fingerprint = fingerprint;
  for (int s = 0; s < stages; ++s) index.shard_files.push_back(shard_file(s, stages));
  for (const auto& st : plan.stages)
    for (int64_t b = st.first_block; b < st.first_block + st.blocks; ++b) index.block_shard[b] = st.stage;
  index.tensor_shard["model.embed_tokens.weight"] = 0;
  index.tensor_shard["model.norm.weight"] = stages - 1;
  if (!config.tie_word_embeddings && ckpt.has("lm_head.weight")) index.tensor_shard["lm_head.weight"] = stages - 1;
  return index;
}

// The backend's high-water mark since the last call goes to one phase's slot and the stage's overall peak; the next
// phase starts counting from what is live now.
void note_peak(kernels::Backend& backend, uint64_t& phase, StageMetrics& m) {
  const uint64_t peak = backend.peak_bytes();
  phase = std::max(phase, peak);
  m.peak_device_bytes = std::max(m.peak_device_bytes, peak);
  backend.reset_peak();
}

// A solved row slice of every group member becomes the whole linear on every member. scales and zeros are
// [groups, rows]: gathered as [rows, groups] and transposed back.
QuantizedLinear gather_rows(const comm::StageGroup& group, const QuantizedLinear& part, int64_t rows) {
  QuantizedLinear full = part;
  full.rows = rows;
  full.q.resize(static_cast<size_t>(rows * part.cols));
  group.all_gather_rows(part.q.data(), full.q.data(), rows, part.cols);
  const auto gather_table = [&](const std::vector<float>& mine, std::vector<float>& out) {
    std::vector<float> mine_t(static_cast<size_t>(part.rows * part.groups)), all_t(static_cast<size_t>(rows * part.groups));
    for (int64_t g = 0; g < part.groups; ++g)
      for (int64_t r = 0; r < part.rows; ++r) mine_t[static_cast<size_t>(r * part.groups + g)] = mine[static_cast<size_t>(g * part.rows + r)];
    group.all_gather_rows(mine_t.data(), all_t.data(), rows, part.groups);
    out.resize(static_cast<size_t>(part.groups * rows));
    for (int64_t g = 0; g < part.groups; ++g)
      for (int64_t r = 0; r < rows; ++r) out[static_cast<size_t>(g * rows + r)] = all_t[static_cast<size_t>(r * part.groups + g)];
  };
  gather_table(part.scales, full.scales);
  gather_table(part.zeros, full.zeros);
  return full;
}

}  // namespace

StageWorker::StageWorker(const QuantizeOptions& options)
    : opt_(options),
      world_root_(world_rank() == 0),
      t_start_(Clock::now()),
      config_(io::ModelConfig::load(options.model_dir)),
      ckpt_(io::Checkpoint::open(options.model_dir)) {
  validate(opt_.quant);
  PQ_REQUIRE(opt_.run.micro_batch > 0, "--micro-batch must be positive");
  PQ_REQUIRE(!config_.moe() || opt_.quant.method != Method::kAwq, config_.path, ": ", config_.architecture,
             " is a Mixture-of-Experts model: --method awq does not handle experts yet; use gptq or rtn");
  validate_checkpoint(ckpt_, config_);
  config_.check_seq_len(opt_.seq_len);
  calib_ = load_calibration(opt_, config_);
  plan_ = make_quantize_plan(opt_, config_, ckpt_, calib_);
}

StageWorker::~StageWorker() = default;

// Where the results go, checked by rank 0 before any work and before the plan is printed, so that an error is the
// only thing said about it.
void StageWorker::check_outputs_writable() const {
  prepare_out_dir(opt_.out_dir);
  if (opt_.metrics_path.empty()) return;
  std::ofstream f(opt_.metrics_path, std::ios::app);
  PQ_REQUIRE(f.good(), "--metrics ", opt_.metrics_path, ": cannot open for writing");
}

bool StageWorker::prepare() {
  if (world_root_ && !opt_.dry_run) check_outputs_writable();
  if (world_root_) {
    std::ostringstream os;
    print_plan(os, plan_);
    std::fputs(os.str().c_str(), stdout);
    std::fflush(stdout);
  }
  check_plan_fits(plan_);  // --host-mem, --gpu-mem: a plan that does not fit is refused before any work
  if (opt_.dry_run) return false;
  group_ = std::make_unique<comm::StageGroup>(opt_.ranks_per_stage);
  decide_resume();
  open_stage();
  return true;
}

// Rank 0 decides for everybody whether the output is resumed; each stage group then agrees on what its shard holds.
void StageWorker::decide_resume() {
  const RunFingerprint fp = fingerprint_run(config_, ckpt_, calib_, opt_.fingerprint_args_json, world_root_);
  index_ = make_model_index(opt_, config_, ckpt_, plan_, fp.str());
  int resume = 0;
  if (world_root_) {
    resume = pipequant::decide_resume(opt_, index_) ? 1 : 0;
    std::printf(
        "pipequant quantize: %s, %lld blocks, %s %d-bit group %lld%s%s, %lld samples x %lld tokens, "
        "propagation %s\n",
        opt_.model_dir.c_str(), static_cast<long long>(config_.num_layers), name(opt_.quant.method), opt_.quant.bits,
        static_cast<long long>(opt_.quant.group_size), opt_.quant.sym ? " sym" : "",
        opt_.quant.act_order ? " act-order" : "", static_cast<long long>(calib_.count),
        static_cast<long long>(calib_.seq), name(opt_.propagation));
    std::fflush(stdout);
  }
  comm::broadcast_from_world_root(resume);
  resume_ = resume != 0;
}

void StageWorker::open_stage() {
  const StagePlan& sp = stage_plan();
  const std::string shard_path = opt_.out_dir + "/" + index_.shard_files[static_cast<size_t>(sp.stage)];
  const ShardState state = agree_on_shard_state(*group_, config_, shard_path, sp.first_block, sp.blocks, resume_);
  done_ = state.done;
  resumed_ = load_resumed_blocks(config_, shard_path, done_);
  group_->barrier();
  shard_ = std::make_unique<io::ShardWriter>(shard_path, group_->comm(), resume_ && state.readable);

  backend_ = make_backend(opt_.run);
  half_ = forward_format(opt_.run, *backend_, config_);
  source_ = checkpoint_source(ckpt_, config_);
  transport_ = make_transport(opt_.run, *backend_, group_->layout());
  if (world_root_) std::printf("pipequant quantize: transport %s\n", transport_->name().c_str());
  const auto [s_begin, s_end] = group_->owned_range(calib_.count, kHessianChunk);
  sample_begin_ = s_begin;
  batches_.samples = s_end - s_begin;
  batches_.size = std::min(opt_.run.micro_batch, batches_.samples);
  runner_ = std::make_unique<BlockRunner>(*backend_, config_, calib_.seq, batches_.size, half_);
  propagation_ = make_propagation(opt_.propagation, sp, *source_);
  progress_ = std::make_unique<comm::ProgressRelay>();

  metrics_.stage = sp.stage;
  metrics_.ranks = group_->size();
  metrics_.first_block = sp.first_block;
  metrics_.blocks = sp.blocks;
  metrics_.planned_host_peak_bytes = sp.host_bytes;
}

StageContext StageWorker::context() {
  return StageContext{group_->layout(), stage_plan(), *source_,       *transport_,    *runner_,  *backend_,
                      x_,               batches_,     calib_.seq,     config_.hidden_size, metrics_, t_sync_};
}

// The first stage embeds its samples' tokens.
void StageWorker::embed_inputs() {
  const auto t0 = Clock::now();
  const auto table = source_->embed_tokens();
  embed(table, config_.hidden_size, calib_.tokens.data() + sample_begin_ * calib_.seq, batches_.samples * calib_.seq,
        x_.data());
  metrics_.load_seconds += seconds_since(t0);
}

void StageWorker::obtain_inputs() {
  // the common origin of the busy spans: every rank leaves this barrier at (nearly) the same moment
  comm::world_barrier();
  t_sync_ = Clock::now();
  x_.resize(static_cast<size_t>(batches_.samples * calib_.seq * config_.hidden_size));
  if (group_->layout().first()) embed_inputs();
  StageContext ctx = context();
  propagation_->obtain_inputs(ctx);
  note_forward_peak();  // embedding, fp-mode forward
}

void StageWorker::quantize_block(int64_t b) {
  const auto t_block = Clock::now();
  auto t0 = Clock::now();
  {
    StageContext ctx = context();
    // the runner holds the block's weights from here on: each linear's source values go once it is quantized
    const BlockWeights weights = propagation_->block_weights(ctx, b);
    norms_ = {weights.input_norm, weights.post_norm};
    runner_->set_block(weights);
    experts_ = weights.moe.experts;  // an MoE block's experts as held (shared values), the shared expert last
    if (weights.moe.shared) experts_.push_back(weights.moe.shared->mlp);
  }
  metrics_.load_seconds += seconds_since(t0);
  const GroupErrors errors = done_.count(b) ? replay_resumed_block(b) : solve_block(b);
  // the block's outputs are the next block's inputs
  t0 = Clock::now();
  propagate(*runner_, x_, batches_.samples, config_.hidden_size);
  require_finite_activations(x_, b, sample_begin_, calib_.seq, config_.hidden_size, "calibration sample");
  metrics_.forward_seconds += seconds_since(t0);
  note_forward_peak();
  experts_.clear();
  post_progress(b, seconds_since(t_block), errors);
}

void StageWorker::note_forward_peak() { note_peak(*backend_, metrics_.peak_device_forward_bytes, metrics_); }
void StageWorker::note_solve_peak() { note_peak(*backend_, metrics_.peak_device_solve_bytes, metrics_); }

StageWorker::GroupErrors StageWorker::replay_resumed_block(int64_t b) {
  GroupErrors errors{};
  const ResumedBlock& r = resumed_.at(b);
  const bool live = propagation_->feeds_quantized();
  const int dense = block_linear_count(config_, b);
  for (size_t i = 0; i < r.records.size(); ++i) {
    metrics_.linears.push_back(r.records[i]);
    const auto at = static_cast<int>(i);
    const bool expert = at >= dense;
    const int which = expert ? (at - dense) % 3 : -1;  // an expert's gate, up or down
    const int g = expert ? (which < 2 ? 2 : 3) : kLinears[i].group;
    errors[static_cast<size_t>(g)] = std::max(errors[static_cast<size_t>(g)], r.records[i].relative_error);
    if (!live) continue;
    const Linear w = Linear::of(r.records[i].out_features, r.records[i].in_features, r.w[i]);
    if (expert)
      runner_->moe()->set_expert_linear((at - dense) / 3, which, w);
    else
      runner_->set_linear(at, w);
  }
  if (live) runner_->set_norms(r.norms[0], r.norms[1]);  // AWQ folds scales into them
  ++metrics_.blocks_resumed;
  return errors;
}

// True-sequential: each linear group's Hessian is taken through the block as quantized so far.
StageWorker::GroupErrors StageWorker::solve_block(int64_t b) {
  GroupErrors errors{};
  shard_->begin_block(b);
  const int groups = runner_->moe() ? 2 : kLinearGroups;  // an MoE block: the attention's, then its experts
  for (int g = 0; g < groups; ++g) {
    auto t0 = Clock::now();
    GroupInputs in = group_hessian(b, g);
    metrics_.forward_seconds += seconds_since(t0);
    note_forward_peak();
    t0 = Clock::now();
    if (!terms_from_inputs(g)) add_terms_from_hessian(g, in);
    metrics_.solve_seconds += seconds_since(t0);
    if (opt_.quant.method == Method::kAwq) {
      errors[static_cast<size_t>(g)] = awq_group(b, g, in);
      continue;
    }
    std::optional<GptqFactor> factor = group_factor(g, std::move(in.h));  // H is gone from here on
    int last = 0;
    for (int i = 0; i < kLinearCount; ++i)
      if (kLinears[static_cast<size_t>(i)].group == g) last = i;
    for (int i = 0; i < kLinearCount; ++i) {
      if (kLinears[static_cast<size_t>(i)].group != g) continue;
      const double e = quantize_linear(b, i, factor, i == last, in.terms[static_cast<size_t>(i)]);
      errors[static_cast<size_t>(g)] = std::max(errors[static_cast<size_t>(g)], e);
    }
  }
  if (runner_->moe()) solve_experts(b, errors);
  const auto t0 = Clock::now();
  write_pending_linears(b);
  write_block_tensors(b);
  shard_->mark_complete(b);
  metrics_.write_seconds += seconds_since(t0);
  return errors;
}

namespace {

// Each linear's baseline terms summed over the stage group, in member order.
void sum_terms(const comm::StageGroup& group, std::array<BaselineTerms, kLinearCount>& terms) {
  std::vector<double> v;
  for (const auto& t : terms) v.insert(v.end(), {t.weight2, t.rtn_error2});
  group.sum(v.data(), static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < terms.size(); ++i) terms[i] = {v[2 * i], v[2 * i + 1]};
}

}  // namespace

// GPTQ: the group's linears share H, so they share its factor, made once in H's own memory (sized for the largest
// solve tile of this rank) and freed after the group's last solve. RTN needs none: H goes.
std::optional<GptqFactor> StageWorker::group_factor(int g, std::vector<float> h) {
  if (opt_.quant.method != Method::kGptq) return std::nullopt;
  const auto t0 = Clock::now();
  int64_t cols = 0, rows = 0;
  for (int i = 0; i < kLinearCount; ++i) {
    if (kLinears[static_cast<size_t>(i)].group != g) continue;
    const Linear& lin = runner_->linear(i);
    const auto [r0, r1] = group_->owned_range(lin.out);
    cols = lin.in;
    rows = std::max(rows, std::min(r1 - r0, solve_tile_rows(lin.in)));
  }
  std::optional<GptqFactor> factor = factor_hessian(*backend_, std::move(h), cols, std::max<int64_t>(rows, 1), opt_.quant);
  metrics_.solve_seconds += seconds_since(t0);
  return factor;
}

// The error's baseline terms come from the calibration inputs while they are fewer tokens than the group's width
// (4 T N K flops against 4 N K^2 from H).
bool StageWorker::terms_from_inputs(int g) const {
  return calib_.count * calib_.seq < runner_->width(static_cast<Until>(g));
}

namespace {

// A linear's rows [first + r0, first + r1) in fp32, for the baseline terms.
FillRows rows_from(const Linear& lin, int64_t first = 0) {
  return [&lin, first](int64_t r0, int64_t r1, float* dst) { lin.rows_f32(first + r0, first + r1, dst); };
}

}  // namespace

// The baseline terms of the group's linears from this rank's inputs x [tokens, K] (all rows of each linear),
// summed over the stage group.
void StageWorker::add_terms_from_inputs(int g, const std::vector<float>& x, GroupInputs& in) {
  const double scale = 2.0 / static_cast<double>(calib_.count * calib_.seq);
  kernels::Buffer<float> copy;
  const float* xb = kernels::host_floats_on_backend(*backend_, x.data(), static_cast<int64_t>(x.size()), copy);
  for (int i = 0; i < kLinearCount; ++i) {
    if (kLinears[static_cast<size_t>(i)].group != g) continue;
    const Linear& lin = runner_->linear(i);
    const int64_t tokens = static_cast<int64_t>(x.size()) / lin.in;
    in.terms[static_cast<size_t>(i)] =
        baseline_terms_from_inputs(*backend_, xb, tokens, rows_from(lin), lin.out, lin.in, scale, opt_.quant);
  }
  sum_terms(*group_, in.terms);
}

// The baseline terms from H, each rank for the rows it solves, summed over the stage group.
void StageWorker::add_terms_from_hessian(int g, GroupInputs& in) {
  kernels::Buffer<float> copy;  // H on a device backend, uploaded once
  const float* h = kernels::host_floats_on_backend(*backend_, in.h.data(), static_cast<int64_t>(in.h.size()), copy);
  for (int i = 0; i < kLinearCount; ++i) {
    if (kLinears[static_cast<size_t>(i)].group != g) continue;
    const Linear& lin = runner_->linear(i);
    const auto [r0, r1] = group_->owned_range(lin.out);
    if (r1 > r0)
      in.terms[static_cast<size_t>(i)] =
          baseline_terms(*backend_, rows_from(lin, r0), r1 - r0, lin.in, h, opt_.quant);
  }
  sum_terms(*group_, in.terms);
}

// H of linear group g over the whole stage group's samples (each rank accumulates its own, in global sample order),
// and the baseline terms when they come from the inputs (this rank's, kept for it: fewer floats than H).
namespace {

// "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj": the linears of group g.
std::string group_modules(int g) {
  std::string names;
  for (const auto& l : kLinears)
    if (l.group == g) names += (names.empty() ? "" : ", ") + std::string(l.module);
  return names;
}

}  // namespace

StageWorker::GroupInputs StageWorker::group_hessian(int64_t b, int g) {
  const Until until = static_cast<Until>(g);
  const int64_t width = runner_->width(until);
  const int64_t seq = calib_.seq;
  const bool terms = terms_from_inputs(g);
  GroupInputs in;
  std::vector<float> inputs(terms ? static_cast<size_t>(batches_.samples * seq * width) : 0);
  HessianAccumulator acc(*backend_, width);
  for_each_micro_batch(*runner_, x_.data(), batches_.samples, config_.hidden_size, until,
                       [&](int64_t s0, int64_t n, const float* acts) {
                         for (int64_t s = 0; s < n; ++s) acc.add_sample(acts + s * seq * width, seq, sample_begin_ + s0 + s);
                         if (terms)
                           backend_->download(inputs.data() + s0 * seq * width, acts,
                                              sizeof(float) * static_cast<size_t>(n * seq * width));
                       });
  if (terms) add_terms_from_inputs(g, inputs, in);
  inputs = std::vector<float>();
  in.h = acc.finish(*group_, calib_.count * seq);
  require_finite_hessian(in.h, width, b, group_modules(g));
  if (opt_.quant.method == Method::kAwq) in.magnitudes = channel_magnitudes(in.h, width);
  return in;
}

namespace {

// Rows [row0, row0 + part.rows) of `full` (preallocated, same columns and groups) from a solved tile.
void place_rows(QuantizedLinear& full, const QuantizedLinear& part, int64_t row0) {
  std::copy(part.q.begin(), part.q.end(), full.q.begin() + row0 * full.cols);
  for (int64_t g = 0; g < full.groups; ++g) {
    const auto src = static_cast<size_t>(g * part.rows), dst = static_cast<size_t>(g * full.rows + row0);
    std::copy_n(part.scales.begin() + static_cast<std::ptrdiff_t>(src), part.rows, full.scales.begin() + static_cast<std::ptrdiff_t>(dst));
    std::copy_n(part.zeros.begin() + static_cast<std::ptrdiff_t>(src), part.rows, full.zeros.begin() + static_cast<std::ptrdiff_t>(dst));
  }
  full.error2 += part.error2;
  full.solve_seconds += part.solve_seconds;
}

}  // namespace

// Rows [r0, r1) of `source`, quantized a tile at a time from its held values (fp32 tiles expanded one at a time).
QuantizedLinear StageWorker::solve_rows(Linear source, int64_t r0, int64_t r1, const TileQuantizer& quantize_tile) {
  const int64_t tile = solve_tile_rows(source.in);
  std::vector<float> w(static_cast<size_t>(std::min(tile, r1 - r0) * source.in));
  QuantizedLinear full;
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(r1, t0 + tile);
    source.rows_f32(t0, t1, w.data());
    QuantizedLinear part = quantize_tile(w.data(), t1 - t0);
    if (t0 == r0 && t1 == r1) return part;  // one tile: the result as solved
    if (t0 == r0) {
      full = part;  // shape, g_idx, damping, fallback, log; rows and tables widened below
      full.rows = r1 - r0;
      full.q.assign(static_cast<size_t>(full.rows * full.cols), 0);
      full.scales.assign(static_cast<size_t>(full.groups * full.rows), 0.0f);
      full.zeros.assign(full.scales.size(), 0.0f);
      full.error2 = 0.0;
      full.solve_seconds = 0.0;
    }
    place_rows(full, part, t0 - r0);
  }
  return full;
}

// This rank's rows of linear `index` of the runner's block (the source goes when the runner's copy does).
QuantizedLinear StageWorker::solve_owned_rows(int index, const TileQuantizer& quantize_tile) {
  const Linear& source = runner_->linear(index);
  const auto [r0, r1] = group_->owned_range(source.out);
  return solve_rows(source, r0, r1, quantize_tile);
}

// Quantizes linear `index` of block b (this rank's rows, then gathered), writes it, records it and, with quantized
// propagation, puts its quantized weights into the block. `factor`: its group's GPTQ factor (empty with RTN),
// released after the solve of the group's last linear; `terms`: its baseline terms over the whole group. Returns
// its relative error.
double StageWorker::quantize_linear(int64_t b, int index, std::optional<GptqFactor>& factor, bool last_of_group,
                                   const BaselineTerms& terms) {
  const QuantConfig& q = opt_.quant;
  auto t0 = Clock::now();
  const bool gptq = factor.has_value();
  PQ_ASSERT(q.method != Method::kGptq || gptq, "quantize_linear: GPTQ without its group's factor");
  const std::string name = block_prefix(b) + kLinears[static_cast<size_t>(index)].module;
  const int64_t in = runner_->linear(index).in;
  QuantizedLinear ql = solve_owned_rows(index, [&](const float* w, int64_t rows) {
    return gptq ? gptq_solve(*factor, w, rows, name) : rtn_quantize(*backend_, w, rows, in, nullptr, q);
  });
  if (last_of_group) factor.reset();  // R (11.3 GB for a 405B down_proj) goes before packing and writing
  const double solve_s = ql.solve_seconds;
  // GPTQ's error from its own accounting, summed over the group's rows; RTN (and the RTN fallback) is the baseline
  double error2 = ql.error2;
  group_->sum(&error2, 1);
  if (!gptq || ql.fallback == Fallback::kRtn) error2 = terms.rtn_error2;
  gather_linear(ql, error2, terms, runner_->linear(index).out);
  metrics_.solve_seconds += seconds_since(t0);
  note_solve_peak();
  write_linear_result(b, kLinears[static_cast<size_t>(index)].module, ql, terms, solve_s);
  const double e = ql.relative_error;
  if (propagation_->feeds_quantized()) runner_->set_linear(index, Linear::of(ql.rows, ql.cols, std::move(ql)));
  return e;
}

// ql: this rank's rows; error2: the whole linear's tr(D H D^T). Sets the relative error and gathers the rows of every
// member, so that ql is the whole linear of `out` rows on each.
void StageWorker::gather_linear(QuantizedLinear& ql, double error2, const BaselineTerms& terms, int64_t out) {
  ql.relative_error = terms.weight2 > 0.0 ? error2 / terms.weight2 : 0.0;
  if (group_->size() > 1) ql = gather_rows(*group_, ql, out);
  if (world_root_)
    for (const auto& line : ql.log) std::printf("  warning: %s\n", line.c_str());
}

// Packs, writes and records a quantized linear (the whole of it, on every member).
void StageWorker::write_linear_result(int64_t b, const std::string& module, const QuantizedLinear& ql,
                                      const BaselineTerms& terms, double solve_seconds, const LinearNotes& notes) {
  const auto t0 = Clock::now();
  io::PackedLinear p;
  try {
    p = pack(ql, module, opt_.quant);
  } catch (const UserError& e) {
    fail("block ", b, ": ", e.what());  // which block the module is in
  }
  p.rtn_relative_error = terms.weight2 > 0.0 ? terms.rtn_error2 / terms.weight2 : 0.0;
  p.awq_scale_exponent = notes.awq_alpha;
  p.awq_clip = notes.awq_clip;
  p.expert_tokens = notes.expert_tokens;
  p.expert_hessian = notes.expert_hessian;
  shard_->write_linear(b, p);
  metrics_.write_seconds += seconds_since(t0);
  metrics_.linears.push_back({b, module, ql.rows, ql.cols, ql.relative_error, p.rtn_relative_error, name(ql.fallback),
                              ql.damp_used, solve_seconds, notes.awq_alpha, notes.awq_clip, notes.expert_tokens,
                              notes.expert_hessian});
}

namespace {

// Positions in kLinears of the linears AWQ folds into or treats apart.
inline constexpr int kQProj = 0, kKProj = 1, kVProj = 2, kOProj = 3, kUpProj = 5, kDownProj = 6;
static_assert(std::string_view(kLinears[kVProj].module) == "self_attn.v_proj" &&
              std::string_view(kLinears[kOProj].module) == "self_attn.o_proj" &&
              std::string_view(kLinears[kUpProj].module) == "mlp.up_proj" &&
              std::string_view(kLinears[kDownProj].module) == "mlp.down_proj");

// A tensor of fp32 values for the output.
io::DenseTensor dense_f32(const std::string& name, const std::vector<float>& v) {
  io::DenseTensor t;
  t.name = name;
  t.dtype = "F32";
  t.shape = {static_cast<int64_t>(v.size())};
  t.bytes.resize(v.size() * sizeof(float));
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

}  // namespace

// Whether AWQ can fold scales for group g: into a norm (q/k/v, gate/up) always; into the preceding linear's rows
// (v -> o, up -> down) when its outputs are the group's inputs one to one and it has no bias.
bool StageWorker::awq_can_fold(int g) const {
  if (g == 0 || g == 2) return true;
  const Linear& prev = runner_->linear(g == 1 ? kVProj : kUpProj);
  const Linear& next = runner_->linear(g == 1 ? kOProj : kDownProj);
  return prev.out == next.in && prev.bias.empty();
}

// AWQ for linear group g (src/awq.hpp): the scale search over the group's linears (the rows it measures, on every
// member of the stage group; the root's choice is everyone's), the scales folded into what feeds the group, then
// each linear clipped and rounded, each member its own rows. Returns the group's largest relative error.
double StageWorker::awq_group(int64_t b, int g, const GroupInputs& in) {
  const auto t0 = Clock::now();
  std::vector<AwqLinear> linears;
  int64_t cols = 0;
  for (int i = 0; i < kLinearCount; ++i) {
    if (kLinears[static_cast<size_t>(i)].group != g) continue;
    const Linear& lin = runner_->linear(i);
    linears.push_back({rows_from(lin), lin.out});
    cols = lin.in;
  }
  kernels::Buffer<float> copy;
  const float* hb = kernels::host_floats_on_backend(*backend_, in.h.data(), static_cast<int64_t>(in.h.size()), copy);
  AwqScaleChoice choice;
  if (awq_can_fold(g)) {
    choice = search_awq_scales(*backend_, linears, cols, in.magnitudes, hb, opt_.quant);
    // the group root's choice for every member: the search's GEMMs may round otherwise on another node's CPU or
    // thread count, and the members' rows must share one set of scales; the scales are rebuilt from H alike
    group_->broadcast(choice.grid);
    choice.alpha = static_cast<double>(choice.grid) / kAwqScaleGrid;
    choice.scales = awq_scales(in.magnitudes, choice.alpha);
    fold_awq_scales(g, choice.scales);
  } else {
    choice.alpha = -1.0;  // nothing to fold into: clipping and rounding only
    choice.scales.assign(static_cast<size_t>(cols), 1.0f);
  }
  metrics_.solve_seconds += seconds_since(t0);
  double worst = 0.0;
  for (int i = 0; i < kLinearCount; ++i)
    if (kLinears[static_cast<size_t>(i)].group == g) worst = std::max(worst, awq_linear(b, i, choice, in, hb));
  return worst;
}

// x / s for the group's inputs: the norm's weights divided by s, or the preceding linear's rows (its quantized scale
// factors). With quantized propagation the block as it runs changes with them.
void StageWorker::fold_awq_scales(int g, const std::vector<float>& s) {
  const bool live = propagation_->feeds_quantized();
  if (g == 0 || g == 2) {
    std::vector<float>& norm = norms_[g == 0 ? 0 : 1];
    for (size_t k = 0; k < norm.size(); ++k) norm[k] /= s[k];
    if (live) runner_->set_norms(norms_[0], norms_[1]);
    return;
  }
  const int prev = g == 1 ? kVProj : kUpProj;
  PQ_ASSERT(pending_[static_cast<size_t>(prev)].has_value(), "fold_awq_scales: ", kLinears[static_cast<size_t>(prev)].module,
            " is not quantized yet");
  Linear& held = pending_[static_cast<size_t>(prev)]->linear;
  QuantizedLinear q = std::get<QuantizedLinear>(*held.values);  // a copy: the runner may share the values
  divide_rows(q, s);
  held = Linear::of(q.rows, q.cols, std::move(q));
  if (live) runner_->set_linear(prev, held);
}

// Linear `index` clipped and rounded with the group's scales (this rank's rows, then gathered); held until the block
// ends, as a later group may fold into it. Returns its relative error.
double StageWorker::awq_linear(int64_t b, int index, const AwqScaleChoice& choice, const GroupInputs& in,
                               const float* h_backend) {
  const auto t0 = Clock::now();
  const Linear& lin = runner_->linear(index);
  const int64_t cols = lin.in, out = lin.out;
  const bool clip = index != kQProj && index != kKProj;  // as llm-awq: q/k errors pass through the attention scores
  std::array<double, 3> sums{};                             // error2, clip ratio sum, clip count
  QuantizedLinear ql = solve_owned_rows(index, [&](const float* w, int64_t rows) {
    AwqQuantized a = awq_quantize(*backend_, w, rows, cols, choice.scales, in.h.data(), h_backend, clip, opt_.quant);
    sums[0] += a.error2;
    sums[1] += a.clip_sum;
    sums[2] += static_cast<double>(a.clip_count);
    return std::move(a.q);
  });
  group_->sum(sums.data(), 3);
  const BaselineTerms& terms = in.terms[static_cast<size_t>(index)];
  gather_linear(ql, sums[0], terms, out);
  const double seconds = seconds_since(t0);
  metrics_.solve_seconds += seconds;
  note_solve_peak();
  const double e = ql.relative_error;
  Linear held = Linear::of(ql.rows, ql.cols, std::move(ql));
  if (propagation_->feeds_quantized()) runner_->set_linear(index, held);
  pending_[static_cast<size_t>(index)] =
      PendingLinear{std::move(held), terms, seconds, choice.alpha, sums[2] > 0.0 ? sums[1] / sums[2] : 1.0};
  return e;
}

// The block's AWQ linears, final now that no later group folds into them.
void StageWorker::write_pending_linears(int64_t b) {
  for (int i = 0; i < kLinearCount; ++i) {
    auto& p = pending_[static_cast<size_t>(i)];
    if (!p) continue;
    write_linear_result(b, kLinears[static_cast<size_t>(i)].module, std::get<QuantizedLinear>(*p->linear.values),
                        p->terms, p->solve_seconds, {p->awq_alpha, p->awq_clip, -1, ""});
    p.reset();
  }
}

// The block's norms (Qwen3's q/k norms too) and biases, in their source dtype (AWQ's folded norms in fp32).
void StageWorker::write_block_tensors(int64_t b) {
  const std::string prefix = block_prefix(b);
  const std::array<const char*, 2> norms = {"input_layernorm.weight", "post_attention_layernorm.weight"};
  for (size_t n = 0; n < norms.size(); ++n)
    shard_->write_block_tensor(b, opt_.quant.method == Method::kAwq
                                      ? dense_f32(norms[n], norms_[n])
                                      : dense_from_checkpoint(ckpt_, prefix + norms[n], norms[n]));
  if (config_.qk_norm)
    for (const char* norm : kQkNormTensors)
      shard_->write_block_tensor(b, dense_from_checkpoint(ckpt_, prefix + norm, norm));
  if (config_.moe_block(b)) {  // the router (and the shared expert's gate), kept in their source dtype
    for (const std::string& module :
         {router_module(config_), config_.shared_expert() ? shared_expert_gate_module(config_) : std::string()}) {
      if (module.empty()) continue;
      const std::string name = module + ".weight";
      shard_->write_block_tensor(b, dense_from_checkpoint(ckpt_, prefix + name, name));
    }
  }
  for (const auto& linear : kLinears) {
    const std::string bias = std::string(linear.module) + ".bias";
    if (ckpt_.has(prefix + bias)) shard_->write_block_tensor(b, dense_from_checkpoint(ckpt_, prefix + bias, bias));
  }
}

void StageWorker::post_progress(int64_t b, double seconds, const GroupErrors& errors) {
  char line[256];
  std::snprintf(line, sizeof(line),
                "block %3lld/%lld  %7.2f s  %s max rel. error  qkv %.3e  o %.3e  gate_up %.3e  down %.3e\n",
                static_cast<long long>(b + 1), static_cast<long long>(config_.num_layers), seconds,
                done_.count(b) ? "resumed" : "       ", errors[0], errors[1], errors[2], errors[3]);
  if (group_->root()) progress_->post(line);
}

// The unquantized model tensors: the embedding on the first stage, the final norm and lm_head on the last.
void StageWorker::write_model_tensors() {
  if (group_->layout().first())
    shard_->write_tensor(dense_from_checkpoint(ckpt_, "model.embed_tokens.weight", "model.embed_tokens.weight"));
  if (group_->layout().last()) {
    shard_->write_tensor(dense_from_checkpoint(ckpt_, "model.norm.weight", "model.norm.weight"));
    if (index_.tensor_shard.count("lm_head.weight"))
      shard_->write_tensor(dense_from_checkpoint(ckpt_, "lm_head.weight", "lm_head.weight"));
  }
}

std::vector<StageMetrics> StageWorker::finish() {
  metrics_.busy_until_seconds = seconds_since(t_sync_);
  StageContext ctx = context();
  propagation_->pass_outputs(ctx);
  auto t0 = Clock::now();
  transport_->wait_sends();
  metrics_.wait_seconds += seconds_since(t0) + transport_->recv_wait_seconds();
  metrics_.transport_bytes = transport_->bytes_sent() + transport_->bytes_received();
  metrics_.transport_seconds = transport_->recv_wait_seconds();

  t0 = Clock::now();
  write_model_tensors();
  shard_->close();
  metrics_.hdf5_bytes = shard_->bytes_written();
  metrics_.hdf5_rank_bytes = bytes_per_member(shard_->rank_bytes_written());
  metrics_.write_seconds += seconds_since(t0);
  metrics_.peak_device_bytes = std::max<uint64_t>(metrics_.peak_device_bytes, backend_->peak_bytes());
  metrics_.peak_host_bytes = peak_host_bytes();
  metrics_.total_seconds = seconds_since(t_start_);

  progress_->drain(config_.num_layers);  // the other stages' block lines that rank 0 has not printed yet
  const std::vector<StageMetrics> stages = gather_metrics();
  if (world_root_) report(stages);
  return stages;
}

// Each member's value, in member order, on every member.
std::vector<uint64_t> StageWorker::bytes_per_member(uint64_t mine) const {
  std::vector<int64_t> all(static_cast<size_t>(group_->size()), 0);
  all[static_cast<size_t>(group_->index())] = static_cast<int64_t>(mine);
  group_->sum(all.data(), static_cast<int64_t>(all.size()));
  return {all.begin(), all.end()};
}

// Every stage root's metrics, on world rank 0 in stage order.
std::vector<StageMetrics> StageWorker::gather_metrics() const {
  const auto all = comm::gather_to_world_root(group_->root() ? to_json(metrics_).dump() : std::string());
  std::vector<StageMetrics> stages;
  for (const auto& s : all)
    if (!s.empty()) stages.push_back(stage_metrics_from_json(nlohmann::json::parse(s)));
  return stages;
}

// Rank 0: model.h5 marked complete (every block of every stage is), the report, the metrics file.
void StageWorker::report(const std::vector<StageMetrics>& stages) {
  index_.complete = true;
  io::write_model_index(opt_.out_dir, index_);
  std::ostringstream os;
  print_report(os, stages, name(opt_.quant.method), name(opt_.propagation),
               backend_->name() + ", forward GEMMs " + format_name(half_));
  std::fputs(os.str().c_str(), stdout);
  std::printf("output: %s/model.h5 (complete)\n", opt_.out_dir.c_str());
  std::fflush(stdout);
  if (!opt_.metrics_path.empty()) write_metrics(opt_.metrics_path, stages);
}

std::vector<StageMetrics> run_quantize(const QuantizeOptions& options) {
  StageWorker worker(options);
  if (!worker.prepare()) return {};
  worker.obtain_inputs();
  for (int64_t b = worker.first_block(); b < worker.end_block(); ++b) worker.quantize_block(b);
  return worker.finish();
}

}  // namespace pipequant
