// The experts of a Mixture-of-Experts block (docs/design.md section 4), after the attention's linear groups:
// each expert's gate and up_proj from one Hessian of the tokens routed to it, then its down_proj from the Hessian of
// what those tokens make of gate and up. Experts are spread over the stage group in rounds of D (expert e belongs to
// member e mod D): every member adds its own samples' rows to each Hessian of the round (summed over the group in
// member order, as a dense group's), the owner solves its expert whole, and every member receives the result. A
// solve does not depend on who makes it, so the output is the same bits for any layout.
#include <algorithm>
#include <cstring>

#include "base/error.hpp"
#include "src/driver_util.hpp"
#include "src/hessian.hpp"
#include "src/moe.hpp"
#include "src/stage_worker.hpp"

namespace pipequant {

// This rank's MLP inputs and how they are routed.
struct StageWorker::MoeInputs {
  std::vector<float> xn;           // [samples * seq, hidden]: the post-attention norm's outputs
  std::vector<ExpertRows> routes;  // [samples]: each sample's rows by expert
  std::vector<int64_t> routed;     // [experts]: tokens routed to each, over the stage group
  std::vector<char> all_tokens;    // [experts]: its Hessians see every token
};

// One expert's gate, up and down as its owner solved them (every member's after share_expert_round).
struct StageWorker::ExpertSolve {
  std::array<QuantizedLinear, 3> ql;
  std::array<BaselineTerms, 3> terms;
};

namespace {

// "routed", "all", "all (low tokens)": the tokens an expert's Hessians saw (io::PackedLinear::expert_hessian).
const char* expert_hessian_word(MoeCalibration mode, bool all_tokens, bool shared) {
  if (shared) return "all (shared expert)";
  if (!all_tokens) return "routed";
  return mode == MoeCalibration::kAll ? "all" : "all (low tokens)";
}

// The expert linears solved from one Hessian: gate and up (first 0, two), or down (first 2, one).
struct Which {
  int first;
  int count;
};
Which which_linears(bool down) { return down ? Which{2, 1} : Which{0, 2}; }

// The width of expert e's inputs (down: its down_proj's, the expert's width; e = num_experts: the shared expert).
int64_t input_width(const io::ModelConfig& c, int64_t e, bool down) {
  if (!down) return c.hidden_size;
  return e == c.num_experts ? c.shared_expert_intermediate_size : c.expert_intermediate_size;
}

const Linear& expert_linear(const ExpertWeights& w, int which) { return which == 0 ? w.gate : which == 1 ? w.up : w.down; }
Linear& expert_linear(ExpertWeights& w, int which) { return which == 0 ? w.gate : which == 1 ? w.up : w.down; }

std::vector<uint8_t> terms_bytes(const BaselineTerms& t) {
  std::vector<uint8_t> b(2 * sizeof(double));
  std::memcpy(b.data(), &t.weight2, sizeof(double));
  std::memcpy(b.data() + sizeof(double), &t.rtn_error2, sizeof(double));
  return b;
}

BaselineTerms terms_from_bytes(const std::vector<uint8_t>& b) {
  PQ_ASSERT(b.size() == 2 * sizeof(double), "terms_from_bytes: ", b.size(), " bytes");
  BaselineTerms t;
  std::memcpy(&t.weight2, b.data(), sizeof(double));
  std::memcpy(&t.rtn_error2, b.data() + sizeof(double), sizeof(double));
  return t;
}

}  // namespace

void StageWorker::solve_experts(int64_t b, GroupErrors& errors) {
  auto t0 = Clock::now();
  const MoeInputs in = moe_inputs();
  metrics_.forward_seconds += seconds_since(t0);
  const int64_t experts = solved_experts(config_);  // the shared expert last, where there is one
  for (int64_t first = 0; first < experts; first += group_->size()) {
    std::vector<ExpertSolve> round(static_cast<size_t>(std::min<int64_t>(group_->size(), experts - first)));
    solve_expert_round(b, in, first, round, false);  // gate and up
    solve_expert_round(b, in, first, round, true);   // down, from the inputs gate and up make
    write_expert_round(b, in, first, round, errors);
  }
}

// The post-attention inputs of this rank's samples and their routing; the routed token counts over the group.
StageWorker::MoeInputs StageWorker::moe_inputs() {
  const int64_t seq = calib_.seq, h = config_.hidden_size, experts = config_.num_experts;
  MoeMlp& moe = *runner_->moe();
  MoeInputs in;
  in.xn.resize(static_cast<size_t>(batches_.samples * seq * h));
  in.routes.resize(static_cast<size_t>(batches_.samples));
  for_each_micro_batch(*runner_, x_.data(), batches_.samples, h, Until::kGateUpInput,
                       [&](int64_t s0, int64_t n, const float* acts) {
                         backend_->download(in.xn.data() + s0 * seq * h, acts, sizeof(float) * static_cast<size_t>(n * seq * h));
                         for (int64_t s = 0; s < n; ++s)
                           in.routes[static_cast<size_t>(s0 + s)] = group_by_expert(moe.route_rows(acts + s * seq * h, seq), experts);
                       });
  in.routed.assign(static_cast<size_t>(experts), 0);
  for (const ExpertRows& r : in.routes)
    for (int64_t e = 0; e < experts; ++e) in.routed[static_cast<size_t>(e)] += r.count(e);
  group_->sum(in.routed.data(), experts);
  in.all_tokens.resize(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e)
    in.all_tokens[static_cast<size_t>(e)] =
        opt_.moe_calibration == MoeCalibration::kAll || in.routed[static_cast<size_t>(e)] < opt_.moe_min_tokens;
  if (config_.shared_expert()) {  // every token goes through it
    in.routed.push_back(calib_.count * seq);
    in.all_tokens.push_back(1);
  }
  return in;
}

// Expert e's Hessian over the stage group: of its inputs (down_inputs false: the rows it sees, hidden wide) or of its
// down_proj's inputs (silu(gate x) * up x of those rows, through gate and up as the block holds them now). Each
// sample's rows are one accumulation step in global sample order, as a dense group's samples are.
std::vector<float> StageWorker::expert_hessian(const MoeInputs& in, int64_t e, bool down_inputs) {
  const int64_t seq = calib_.seq, h = config_.hidden_size;
  const int64_t width = input_width(config_, e, down_inputs);
  const bool all = in.all_tokens[static_cast<size_t>(e)] != 0;
  MoeMlp& moe = *runner_->moe();
  HessianAccumulator acc(*backend_, width);
  kernels::Buffer<float> x(*backend_, seq * h), y(*backend_, down_inputs ? seq * width : 0);
  std::vector<float> rows(static_cast<size_t>(seq * h));
  for (int64_t s = 0; s < batches_.samples; ++s) {
    const float* xs = in.xn.data() + s * seq * h;
    const ExpertRows& r = in.routes[static_cast<size_t>(s)];
    const int64_t n = all ? seq : r.count(e);  // (the shared expert is `all`: r has no count of it)
    if (n == 0) continue;
    if (!all)
      for (int64_t j = 0; j < n; ++j)
        std::copy_n(xs + r.row[static_cast<size_t>(r.offset[static_cast<size_t>(e)] + j)] * h, h, rows.begin() + j * h);
    backend_->upload(x.data(), all ? xs : rows.data(), sizeof(float) * static_cast<size_t>(n * h));
    if (down_inputs) moe.expert_hidden(e, x.data(), y.data(), n);
    acc.add_sample(down_inputs ? y.data() : x.data(), n, sample_begin_ + s);
  }
  return acc.finish(*group_, all ? calib_.count * seq : in.routed[static_cast<size_t>(e)]);
}

// The round's experts first .. first + round.size() - 1: every member takes part in each Hessian, the owner of each
// keeps it and solves it; then every member holds every result.
void StageWorker::solve_expert_round(int64_t b, const MoeInputs& in, int64_t first, std::vector<ExpertSolve>& round,
                                     bool down) {
  auto t0 = Clock::now();
  std::vector<float> mine;
  int64_t mine_e = -1;
  for (int64_t e = first; e < first + static_cast<int64_t>(round.size()); ++e) {
    std::vector<float> h = expert_hessian(in, e, down);
    const auto names = solved_expert_modules(config_, e);
    require_finite_hessian(h, input_width(config_, e, down), b, down ? names[2] : names[0] + ", " + names[1]);
    if (e - first == group_->index()) {
      mine = std::move(h);
      mine_e = e;
    }
  }
  metrics_.forward_seconds += seconds_since(t0);
  note_forward_peak();
  t0 = Clock::now();
  if (mine_e >= 0) solve_expert(b, mine_e, std::move(mine), round[static_cast<size_t>(mine_e - first)], down);
  note_solve_peak();
  share_expert_round(first, round, down);
  metrics_.solve_seconds += seconds_since(t0);
}

// Expert e's gate and up (or down) from their Hessian h, whole, on this rank: the baseline terms from h, then GPTQ
// from its factor (made in h's own memory) or RTN.
void StageWorker::solve_expert(int64_t b, int64_t e, std::vector<float> h, ExpertSolve& out, bool down) {
  const QuantConfig& q = opt_.quant;
  const Which which = which_linears(down);
  const ExpertWeights& w = experts_[static_cast<size_t>(e)];
  const int64_t cols = expert_linear(w, which.first).in;
  {
    kernels::Buffer<float> copy;
    const float* hb = kernels::host_floats_on_backend(*backend_, h.data(), static_cast<int64_t>(h.size()), copy);
    for (int i = which.first; i < which.first + which.count; ++i) {
      const Linear& lin = expert_linear(w, i);
      out.terms[static_cast<size_t>(i)] = baseline_terms(
          *backend_, [&lin](int64_t r0, int64_t r1, float* dst) { lin.rows_f32(r0, r1, dst); }, lin.out, lin.in, hb, q);
    }
  }
  const int64_t rows = expert_linear(w, which.first).out;
  std::optional<GptqFactor> factor;
  if (q.method == Method::kGptq)
    factor = factor_hessian(*backend_, std::move(h), cols, std::min(rows, solve_tile_rows(cols)), q);
  h = std::vector<float>();
  const auto names = solved_expert_modules(config_, e);
  for (int i = which.first; i < which.first + which.count; ++i) {
    const Linear& lin = expert_linear(w, i);
    const std::string name = block_prefix(b) + names[static_cast<size_t>(i)];
    QuantizedLinear ql = solve_rows(lin, 0, lin.out, [&](const float* wt, int64_t n) {
      return factor ? gptq_solve(*factor, wt, n, name) : rtn_quantize(*backend_, wt, n, lin.in, nullptr, q);
    });
    const BaselineTerms& t = out.terms[static_cast<size_t>(i)];
    const double error2 = factor && ql.fallback != Fallback::kRtn ? ql.error2 : t.rtn_error2;
    ql.relative_error = t.weight2 > 0.0 ? error2 / t.weight2 : 0.0;
    out.ql[static_cast<size_t>(i)] = std::move(ql);
  }
}

// Each owner's results of the round reach every member; the block holds them from here on (quantized propagation:
// the down_proj's Hessian sees the quantized gate and up, and the next block the quantized experts).
void StageWorker::share_expert_round(int64_t first, std::vector<ExpertSolve>& round, bool down) {
  const Which which = which_linears(down);
  for (size_t m = 0; m < round.size(); ++m) {
    const auto e = static_cast<int64_t>(first + static_cast<int64_t>(m));
    for (int i = which.first; i < which.first + which.count; ++i) {
      QuantizedLinear& ql = round[m].ql[static_cast<size_t>(i)];
      BaselineTerms& t = round[m].terms[static_cast<size_t>(i)];
      if (group_->size() > 1) {
        const bool owner = static_cast<int>(m) == group_->index();
        std::vector<uint8_t> bytes = owner ? ql.to_bytes() : std::vector<uint8_t>();
        std::vector<uint8_t> terms = owner ? terms_bytes(t) : std::vector<uint8_t>();
        group_->broadcast(bytes, static_cast<int>(m));
        group_->broadcast(terms, static_cast<int>(m));
        if (!owner) {
          ql = QuantizedLinear::from_bytes(bytes);
          t = terms_from_bytes(terms);
        }
      }
      if (world_root_)
        for (const auto& line : ql.log) std::printf("  warning: %s\n", line.c_str());
      Linear& held = expert_linear(experts_[static_cast<size_t>(e)], i);
      held = Linear::of(ql.rows, ql.cols, ql);  // the source's values go
      if (propagation_->feeds_quantized()) runner_->moe()->set_expert_linear(e, i, held);
    }
  }
}

// The round's linears written and recorded in expert order: gate, up, down of each (block_modules order).
void StageWorker::write_expert_round(int64_t b, const MoeInputs& in, int64_t first,
                                     const std::vector<ExpertSolve>& round, GroupErrors& errors) {
  for (size_t m = 0; m < round.size(); ++m) {
    const auto e = static_cast<size_t>(first + static_cast<int64_t>(m));
    const auto names = solved_expert_modules(config_, static_cast<int64_t>(e));
    LinearNotes notes;
    notes.expert_tokens = in.routed[e];
    notes.expert_hessian = expert_hessian_word(opt_.moe_calibration, in.all_tokens[e] != 0,
                                               static_cast<int64_t>(e) == config_.num_experts);
    for (size_t i = 0; i < 3; ++i) {
      const QuantizedLinear& ql = round[m].ql[i];
      write_linear_result(b, names[i], ql, round[m].terms[i], ql.solve_seconds, notes);
      double& worst = errors[i < 2 ? 2 : 3];
      worst = std::max(worst, ql.relative_error);
    }
  }
}

}  // namespace pipequant
