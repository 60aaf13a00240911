#include "src/planner.hpp"

#include <algorithm>
#include <functional>
#include <cstdio>
#include <iomanip>
#include <limits>
#include <optional>
#include <sstream>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "comm/stage_group.hpp"
#include "kernels/backend.hpp"
#include "src/hessian.hpp"
#include "src/model.hpp"
#include "src/report.hpp"

namespace pipequant {

namespace {

// Contiguous split of `bytes` into `parts` runs minimizing the largest run (linear partition by dynamic
// programming); ties go to the earliest split so that the result is deterministic.
std::vector<int64_t> balanced_split(const std::vector<uint64_t>& bytes, int parts) {
  const int64_t n = static_cast<int64_t>(bytes.size());
  std::vector<uint64_t> prefix(static_cast<size_t>(n + 1), 0);
  for (int64_t i = 0; i < n; ++i)
    prefix[static_cast<size_t>(i + 1)] = prefix[static_cast<size_t>(i)] + bytes[static_cast<size_t>(i)];
  const uint64_t inf = std::numeric_limits<uint64_t>::max();
  // cost[p][i]: best max-run for the first i blocks in p parts; cut[p][i]: where part p starts
  std::vector<std::vector<uint64_t>> cost(static_cast<size_t>(parts + 1),
                                          std::vector<uint64_t>(static_cast<size_t>(n + 1), inf));
  std::vector<std::vector<int64_t>> cut(static_cast<size_t>(parts + 1),
                                        std::vector<int64_t>(static_cast<size_t>(n + 1), 0));
  cost[0][0] = 0;
  for (int p = 1; p <= parts; ++p)
    for (int64_t i = p; i <= n; ++i)
      for (int64_t j = p - 1; j < i; ++j) {
        if (cost[static_cast<size_t>(p - 1)][static_cast<size_t>(j)] == inf) continue;
        const uint64_t c = std::max(cost[static_cast<size_t>(p - 1)][static_cast<size_t>(j)],
                                    prefix[static_cast<size_t>(i)] - prefix[static_cast<size_t>(j)]);
        if (c < cost[static_cast<size_t>(p)][static_cast<size_t>(i)]) {
          cost[static_cast<size_t>(p)][static_cast<size_t>(i)] = c;
          cut[static_cast<size_t>(p)][static_cast<size_t>(i)] = j;
        }
      }
  std::vector<int64_t> counts(static_cast<size_t>(parts));
  int64_t i = n;
  for (int p = parts; p >= 1; --p) {
    const int64_t j = cut[static_cast<size_t>(p)][static_cast<size_t>(i)];
    counts[static_cast<size_t>(p - 1)] = i - j;
    i = j;
  }
  return counts;
}

std::vector<int64_t> user_split(const std::string& spec, int parts, int64_t blocks) {
  std::vector<int64_t> values;
  std::stringstream ss(spec);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    PQ_REQUIRE(used == item.size() && v > 0, "--blocks-per-stage: expected positive integers (N, or a,b,c), got '",
               spec, "'");
    values.push_back(v);
  }
  PQ_REQUIRE(!values.empty(), "--blocks-per-stage: empty");
  std::vector<int64_t> counts;
  if (values.size() == 1) {
    // N blocks per stage; the last stage takes what is left
    for (int p = 0; p < parts; ++p) counts.push_back(p + 1 < parts ? values[0] : blocks - values[0] * (parts - 1));
    PQ_REQUIRE(counts.back() > 0, "--blocks-per-stage ", spec, ": ", parts, " stages of ", values[0],
               " blocks need more than the model's ", blocks, " blocks");
  } else {
    PQ_REQUIRE(static_cast<int>(values.size()) == parts, "--blocks-per-stage ", spec, ": ", values.size(),
               " counts given for ", parts, " stages");
    counts = values;
    int64_t total = 0;
    for (auto v : counts) total += v;
    PQ_REQUIRE(total == blocks, "--blocks-per-stage ", spec, ": the counts add up to ", total, ", the model has ",
               blocks, " blocks");
  }
  return counts;
}

// GB (1e9 bytes) with three decimals, as the plan table prints them.
std::string gb(uint64_t b) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(3) << static_cast<double>(b) / 1e9;
  return os.str();
}

// GB with six decimals (a term of a small model is a few kB).
std::string gb_fine(uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6f", static_cast<double>(b) / 1e9);
  return buf;
}

// GB with three significant digits, for a sentence: "49.9", "0.0213", "113".
std::string gb_short(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", bytes / 1e9);
  return buf;
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

double to_gb(uint64_t b) { return static_cast<double>(b) / 1e9; }

BackendKind decide_backend(BackendKind b) {
  if (b != BackendKind::kAuto) return b;
  return kernels::cuda_device_count() > 0 ? BackendKind::kCuda : BackendKind::kCpu;  // as make_backend decides
}

// The forward's weights are 16-bit on the backend (as forward_format decides).
bool decide_half(ComputeDtype dtype, BackendKind backend, const io::ModelConfig& config) {
  if (dtype == ComputeDtype::kBf16 || dtype == ComputeDtype::kFp16) return true;
  if (dtype == ComputeDtype::kFp32 || backend != BackendKind::kCuda) return false;
  return config.torch_dtype == "bfloat16" || config.torch_dtype == "float16";
}

// A stage's budget excess: which stage, which memory, what it needs, the budget.
struct Excess {
  int stage = 0;
  bool device = false;
  uint64_t need = 0;
  double budget_gb = 0.0;
  double ratio() const { return static_cast<double>(need) / (budget_gb * 1e9); }
};

// The stage that exceeds a budget by the largest factor (the first of equals); nothing when every stage fits.
std::optional<Excess> worst_excess(const Plan& plan) {
  const MemoryBudgets& b = plan.inputs.budgets;
  std::optional<Excess> worst;
  const auto consider = [&](const Excess& e) {
    if (!worst || e.ratio() > worst->ratio()) worst = e;
  };
  for (const auto& s : plan.stages) {
    if (b.host_gb > 0 && static_cast<double>(s.host_bytes) > b.host_gb * 1e9)
      consider({s.stage, false, s.host_bytes, b.host_gb});
    if (plan.backend == BackendKind::kCuda && b.device_gb > 0 &&
        static_cast<double>(s.device_bytes) > b.device_gb * 1e9)
      consider({s.stage, true, s.device_bytes, b.device_gb});
  }
  return worst;
}

bool fits(const PlanInputs& in) {
  try {
    return !worst_excess(make_plan(in));
  } catch (const UserError&) {
    return false;  // a layout that cannot be made fits nothing
  }
}

// The largest need of `kind` (device or host) over the stages of a plan.
uint64_t largest_need(const Plan& plan, bool device) {
  uint64_t most = 0;
  for (const auto& s : plan.stages) most = std::max(most, device ? s.device_bytes : s.host_bytes);
  return most;
}

// What would make an exceeding plan fit, tried from the least change to the most: a smaller micro-batch; fp
// propagation's blocks streamed; more ranks per stage; more stages; all of these at once.
std::string what_would_fit(const Plan& plan, const Excess& excess) {
  const PlanInputs& in = plan.inputs;
  const int stages = static_cast<int>(plan.stages.size());
  const int d = in.ranks_per_stage;
  const int64_t layers = static_cast<int64_t>(in.block_bytes.size());
  const int64_t chunks = (in.samples + kHessianChunk - 1) / kHessianChunk;  // at most this many ranks per stage
  for (int64_t mb = in.micro_batch - 1; mb >= 1; mb = mb > 64 ? mb / 2 : mb - 1) {
    PlanInputs v = in;
    v.micro_batch = mb;
    if (fits(v)) return "use --micro-batch " + std::to_string(mb);
  }
  bool resident = false;
  for (const auto& s : plan.stages) resident |= s.fp_blocks == "resident";
  if (resident) {
    PlanInputs v = in;
    v.fp_resident_bytes = 0;
    if (fits(v)) return "use --fp-resident-gb 0 (the stage's blocks streamed one at a time)";
  }
  for (int64_t d2 = 2 * static_cast<int64_t>(d); d2 <= chunks; d2 *= 2) {
    PlanInputs v = in;
    v.ranks_per_stage = static_cast<int>(d2);
    v.world = stages * v.ranks_per_stage;
    if (fits(v))
      return "use --ranks-per-stage " + std::to_string(d2) + " (" + std::to_string(stages) + " stages x " +
             std::to_string(d2) + " = " + std::to_string(v.world) + " ranks)";
  }
  for (int64_t p = std::min<int64_t>(2 * stages, layers); p > stages; p = std::min<int64_t>(2 * p, layers)) {
    PlanInputs v = in;
    v.world = static_cast<int>(p) * d;
    v.blocks_per_stage.clear();
    if (fits(v))
      return "use " + std::to_string(p) + " stages (" + std::to_string(p) + " x " + std::to_string(d) + " = " +
             std::to_string(v.world) + " ranks, --ranks-per-stage " + std::to_string(d) + ")";
    if (p == layers) break;
  }
  // the smallest layout: every knob at once
  PlanInputs v = in;
  v.micro_batch = 1;
  v.fp_resident_bytes = 0;
  v.ranks_per_stage = static_cast<int>(std::max<int64_t>(d, chunks));
  v.world = static_cast<int>(layers) * v.ranks_per_stage;
  v.blocks_per_stage.clear();
  const std::string layout = "--micro-batch 1, --ranks-per-stage " + std::to_string(v.ranks_per_stage) +
                             " and one block per stage (" + std::to_string(v.world) + " ranks)";
  if (fits(v)) return "use " + layout;
  const char* what = excess.device ? "device" : "host";
  try {
    return std::string("no layout fits: even ") + layout + " needs " +
           gb_short(largest_need(make_plan(v), excess.device)) + " GB of " + what + " memory per rank";
  } catch (const UserError&) {
    return std::string("no layout fits");
  }
}

}  // namespace

const char* name(Phase phase) {
  switch (phase) {
    case Phase::kEmbed:
      return "embed";
    case Phase::kInputs:
      return "inputs";
    case Phase::kHessian:
      return "hessian";
    case Phase::kSolve:
      return "solve";
    case Phase::kCheck:
      return "check";
    case Phase::kPropagate:
      return "propagate";
  }
  return "?";
}

int64_t samples_per_rank(int64_t samples, int ranks) {
  const int64_t chunks = (samples + kHessianChunk - 1) / kHessianChunk;
  int64_t most = 0;
  for (int m = 0; m < ranks; ++m) {
    const int64_t c0 = chunks * m / ranks, c1 = chunks * (m + 1) / ranks;
    most = std::max(most, std::min(samples, c1 * kHessianChunk) - std::min(samples, c0 * kHessianChunk));
  }
  return most;
}

namespace {

// Bytes one value of the checkpoint's block tensors takes (2 for bf16/fp16, 4 for fp32), from the block sizes.
uint64_t source_value_bytes(const PlanInputs& in, const StagePlan& s, uint64_t block_values) {
  const uint64_t bytes = in.block_bytes[static_cast<size_t>(s.first_block)];
  return block_values > 0 && bytes >= 4 * block_values ? 4 : 2;
}

// What one rank holds while linear group g is worked on (StageWorker::solve_block), in bytes.
struct GroupMemory {
  uint64_t held = 0;            // host: the block's linears as held (the runner's), g's and later ones as stored,
                                // earlier ones as codes with quantized propagation
  uint64_t hessian = 0;         // host: HessianAccumulator at its peak (the CPU backend's partial included)
  uint64_t hessian_device = 0;  // backend: a device backend's fp32 partial
  uint64_t terms = 0;           // host: the baseline terms' working set (a tile, [W; D] chunks and products)
  uint64_t factor = 0;          // R [K, K]: in H's own memory on the CPU backend, on the device otherwise
  uint64_t solve_host = 0;      // host: one solve tile's fp32 rows, its codes twice, and the linear's result so far
  uint64_t solve_device = 0;    // backend: the tile's column loop (w, wc, res fp32, codes, tables)
  uint64_t results = 0;         // host: the linear's codes, gathered (D >= 2) and packed
};

GroupMemory group_memory(const PlanInputs& in, int g, bool cpu, uint64_t value_bytes) {
  const io::ModelConfig& c = in.config;
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  const uint64_t d = u(in.ranks_per_stage);
  const int64_t samples = samples_per_rank(in.samples, in.ranks_per_stage);
  const uint64_t all_tokens = u(in.samples * in.seq_len);
  const uint64_t tokens = u(samples * in.seq_len);  // this rank's
  const uint64_t chunks = u((samples + kHessianChunk - 1) / kHessianChunk);
  constexpr auto kErrorChunk = static_cast<uint64_t>(kErrorChunkFloats);
  GroupMemory m;
  uint64_t k = 0;
  for (int i = 0; i < kLinearCount; ++i) {
    const auto [out, cols] = linear_shape(c, i);
    const int gi = kLinears[static_cast<size_t>(i)].group;
    const bool coded = !in.fp_propagation && gi < g;  // quantized: codes u8 and fp32 tables
    const uint64_t groups = in.group_size > 0 ? (u(cols) + u(in.group_size) - 1) / u(in.group_size) : 1;
    m.held += coded ? u(out * cols) + 8 * u(out) * groups + 4 * u(cols) : value_bytes * u(out * cols);
    if (gi != g) continue;
    k = u(cols);
    const uint64_t rows = (u(out) + d - 1) / d;                        // this rank's
    const uint64_t tile = std::min(rows, u(solve_tile_rows(cols)));
    m.solve_host = std::max(m.solve_host, 4 * tile * k + 2 * tile * k + (rows > tile ? rows * k + 8 * rows * groups : 0));
    m.solve_device = std::max(m.solve_device, 12 * tile * k + tile * k + 8 * tile * groups + 4 * (tile + k));
    m.results = std::max(m.results, rows * k + (d >= 2 ? u(out) * k : 0) + u(out) * k / 2);
    // the baseline terms: from the inputs (this rank's [tokens, K] kept, [W; D] and its product with them) or from
    // H ([W; D] and its product with H), with a chunk of W and RTN's working set of it
    const bool from_inputs = all_tokens < k;
    const uint64_t chunk = std::min<uint64_t>(from_inputs ? u(out) : rows,
                                              std::max<uint64_t>(1, kErrorChunk / (2 * std::max(k, from_inputs ? tokens : 0))));
    const uint64_t products = 2 * 4 * 2 * chunk * (from_inputs ? tokens : k);
    m.terms = std::max(m.terms, (from_inputs ? 4 * tokens * k : 0) + 2 * 4 * 2 * chunk * k + products + 14 * chunk * k);
  }
  const uint64_t kk = k * k;
  const uint64_t one = chunks <= 1 && d == 1 ? 4 * kk : 12 * kk;  // HessianAccumulator::peak_bytes
  if (cpu) {
    m.hessian = one;
    m.factor = 4 * kk;  // H itself, factored in place (the fp64 sum is gone by then)
  } else {
    m.hessian_device = 4 * kk;
    m.hessian = 8 * kk + (chunks <= 1 && d == 1 ? 4 * kk : 4 * kk);  // the host sum (or download) and H
    m.factor = 4 * kk;
  }
  return m;
}

// The group whose work needs the most memory at once.
int heaviest_group(const PlanInputs& in, bool cpu, uint64_t value_bytes) {
  int best = 0;
  uint64_t most = 0;
  for (int g = 0; g < kLinearGroups; ++g) {
    const GroupMemory m = group_memory(in, g, cpu, value_bytes);
    const uint64_t need = m.held + std::max(m.hessian + m.terms + m.hessian_device * cpu,
                                            m.factor + m.solve_host + m.solve_device * cpu + m.results);
    if (need > most) {
      most = need;
      best = g;
    }
  }
  return best;
}

}  // namespace

namespace {

// The inputs as the dense terms see an MoE model: the linear groups gate_up and down are those of one expert (or of
// the dense MLP where some blocks have one, whichever is wider); moe_terms counts the experts besides.
PlanInputs as_dense(const PlanInputs& in) {
  PlanInputs d = in;
  io::ModelConfig& c = d.config;
  if (!c.moe()) return d;
  bool dense_blocks = false;
  for (int64_t b = 0; b < c.num_layers; ++b) dense_blocks |= !c.moe_block(b);
  c.intermediate_size = dense_blocks ? std::max(c.intermediate_size, c.expert_intermediate_size) : c.expert_intermediate_size;
  return d;
}

// An MoE block's experts (StageWorker::solve_experts): as held (the source's, then codes as they are solved), the MoE
// MLP's fp32 copies on the backend, the MLP inputs and their routing kept through the expert rounds, and one more
// Hessian per member while a round's are summed (each member keeps its own expert's, the dense terms count it).
void add_moe_terms(const PlanInputs& in, uint64_t value_bytes, uint64_t tokens, unsigned per_block, unsigned inputs,
                   unsigned hessian, unsigned solve,
                   const std::function<void(const char*, uint64_t, bool, unsigned)>& add) {
  const io::ModelConfig& c = in.config;
  if (!c.moe()) return;
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  const uint64_t expert_elems = 3 * u(c.hidden_size) * u(c.expert_intermediate_size);
  const uint64_t experts = u(c.num_experts);
  // the experts as held; the dense terms count one expert's linears already
  add("experts_held", value_bytes * (experts - 1) * expert_elems, false, per_block);
  // MoeMlp: every expert in fp32 on the backend, and its scratch for one sample's rows
  add("moe_runner_experts", 4 * experts * expert_elems + 4 * u(in.seq_len) * u(c.num_experts + 3 * c.hidden_size),
      true, per_block | (in.fp_propagation ? inputs : 0u));
  // the MLP inputs [samples * seq, hidden] fp32 and their routing (a row and a weight per token and choice)
  add("moe_inputs", 4 * tokens * u(c.hidden_size) + 8 * tokens * u(c.experts_per_token), false, hessian | solve);
  const uint64_t k = u(std::max(c.hidden_size, c.expert_intermediate_size));
  add("expert_hessian_received", 4 * k * k, false, hessian);
}

}  // namespace

std::vector<MemoryTerm> stage_memory_terms(const PlanInputs& in_model, const Plan& plan, const StagePlan& s) {
  const PlanInputs in = as_dense(in_model);
  const io::ModelConfig& c = in.config;
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  const uint64_t d = u(in.ranks_per_stage);
  const bool cpu = plan.backend == BackendKind::kCpu;
  const bool fp = in.fp_propagation, resident = s.fp_blocks == "resident", streamed = s.fp_blocks == "streamed";
  const uint64_t hidden = u(c.hidden_size), inter = u(c.intermediate_size);
  const uint64_t q_width = u(c.num_heads * c.head_dim), kv_width = u(c.num_kv_heads * c.head_dim);
  const int64_t samples = samples_per_rank(in.samples, in.ranks_per_stage);
  const uint64_t tokens = u(samples * in.seq_len);                             // this rank's
  const uint64_t mb_rows = u(std::min(in.micro_batch, samples) * in.seq_len);  // one micro-batch
  uint64_t linear_elems = 0, bias_elems = 0, k = 0, largest_linear = 0;
  for (int i = 0; i < kLinearCount; ++i) {
    const auto [out, cols] = linear_shape(c, i);
    linear_elems += u(out * cols);
    if (has_bias(c, i)) bias_elems += u(out);
    k = std::max(k, u(cols));
    largest_linear = std::max(largest_linear, u(out * cols));
  }
  // an MoE block's other experts (the dense terms see one expert's MLP)
  const uint64_t other_experts =
      c.moe() ? u(c.num_experts - 1) * 3 * hidden * u(in_model.config.expert_intermediate_size) : 0;
  const uint64_t value_bytes = source_value_bytes(in, s, linear_elems + other_experts + 2 * hidden + bias_elems);
  const uint64_t block_held = value_bytes * (linear_elems + other_experts) + 4 * (2 * hidden + bias_elems);
  // the CPU backend expands tiles of the held weights for fp32 GEMMs; otherwise the runner uploads them
  const bool expands = cpu && !plan.half_weights;
  const uint64_t runner_weights = expands ? 0
                                          : (plan.half_weights ? 2 : 4) * linear_elems +
                                                4 * (2 * hidden + bias_elems) + 4 * u(c.head_dim / 2);
  const uint64_t runner_scratch = 4 * mb_rows * (3 * hidden + 2 * q_width + 2 * kv_width + 2 * inter);
  const int g = heaviest_group(in, cpu, value_bytes);
  const GroupMemory gm = group_memory(in, g, cpu, value_bytes);

  const unsigned all = [] {
    unsigned m = 0;
    for (const Phase p : kPhases) m |= phase_bit(p);
    return m;
  }();
  const unsigned after_embed = all & ~phase_bit(Phase::kEmbed);
  const unsigned per_block =
      phase_bit(Phase::kHessian) | phase_bit(Phase::kSolve) | phase_bit(Phase::kCheck) | phase_bit(Phase::kPropagate);
  const unsigned inputs = phase_bit(Phase::kInputs), hessian = phase_bit(Phase::kHessian);
  const unsigned solve = phase_bit(Phase::kSolve), checks = phase_bit(Phase::kCheck);
  const unsigned prefetch = resident   ? 0u
                            : streamed ? (s.blocks > 1 ? inputs | per_block : 0u)
                                       : inputs | (s.blocks > 1 ? per_block : 0u);
  std::vector<MemoryTerm> t;
  const auto add = [&t](const char* name, uint64_t bytes, bool backend, unsigned phases) {
    if (bytes > 0 && phases != 0) t.push_back({name, bytes, backend, phases});
  };
  // ---- host memory
  // the process before any of this: binary, libraries (MPI, BLAS, CUDA), as measured where the plan was made
  add("process", in.process_bytes, false, all);
  // StageWorker::x_: this rank's activations [samples * seq, hidden] fp32, from the start of obtain_inputs on
  add("activations", 4 * tokens * hidden, false, all);
  // propagate(): the block's outputs [samples * seq, hidden] fp32 beside its inputs
  add("propagate_outputs", 4 * tokens * hidden, false, phase_bit(Phase::kPropagate));
  // fp propagation: the outputs sent on [samples * seq, hidden] fp32, kept until the sends complete (the streamed
  // strategy's last stage sends nothing)
  add("fp_sent", fp && (resident || !s.has_head) ? 4 * tokens * hidden : 0, false, after_embed);
  // embed_inputs(): the embedding table [vocab, hidden] in fp32 and its mapped pages, on the first stage
  add("embedding_fp32", s.has_embedding ? 4 * u(c.vocab_size) * hidden + in.embedding_bytes : 0, false,
      phase_bit(Phase::kEmbed));
  // the block's linears as the runner holds them (as stored; quantized propagation: the groups already done as
  // codes), at the heaviest group; the streamed strategy also holds one block while it forwards the inputs
  add("block_weights_held", gm.held + 4 * (2 * hidden + bias_elems), false, per_block | (streamed ? inputs : 0u));
  // BlockPrefetcher: the next block as stored, read on a helper thread while this one is quantized (the first block
  // while the inputs are awaited)
  add("prefetched_block", block_held, false, prefetch);
  // fp resident: every block of the stage as stored
  add("fp_resident_blocks", resident ? u(s.blocks) * block_held : 0, false, after_embed);
  // HessianAccumulator of the heaviest group: one fp32 [K, K] buffer; with a second chunk or D >= 2 the fp64 sum too
  add("hessian", gm.hessian, false, hessian);
  // StageGroup::sum (D >= 2): the group root receives the members' fp64 partials in pieces of kDefaultMaxCount at most
  add("group_sum_piece_fp64", d >= 2 ? 8 * std::min(k * k, u(comm::kDefaultMaxCount)) : 0, false, hessian);
  // the baseline terms of the errors (tr(W H W^T), RTN's tr(D H D^T)): a tile, [W; D] chunks, products
  add("error_terms", gm.terms, false, hessian);
  // With a --gpu-mem budget the cuda backend puts a factor and its solve that do not fit beside the runner on its
  // host fallback (docs/design.md section 4, fallback 3), as quant.cpp's solve_backend decides.
  const double room = static_cast<double>(!cpu ? in.budgets.device_gb * 1e9 : 0.0) -
                      static_cast<double>(runner_weights + runner_scratch);
  const bool to_host =
      !cpu && in.budgets.device_gb > 0 && static_cast<double>(gm.factor + gm.solve_device) > room;
  // the GPTQ factor R [K, K] of the heaviest group (on the CPU backend made in H's own memory)
  // R goes after the solve of its group's last linear: it is held through packing only in groups of several
  int group_linears = 0;
  for (const auto& l : kLinears) group_linears += l.group == g ? 1 : 0;
  const unsigned factor_phases = solve | (group_linears > 1 ? checks : 0u);
  add("gptq_factor_host", cpu || to_host ? gm.factor : 0, false, factor_phases);
  add("solve_working_set_host", to_host ? gm.solve_device : 0, false, solve);
  // one solve tile's fp32 rows and codes, and the linear's result so far when it takes several tiles
  add("solve_tile_host", gm.solve_host, false, solve);
  // after the solves: the linear's codes (gathered whole with D >= 2) and its packed words
  add("linear_results", gm.results, false, checks);
  // ---- backend memory (host memory on the CPU backend)
  // BlockRunner: a device backend's copy of the block's weights (the linears 16-bit when the forward's GEMMs are),
  // norms, biases, rope frequencies; the CPU backend expands tiles of the held weights instead
  add("runner_weights", runner_weights, true, per_block | (fp ? inputs : 0u));
  add("runner_expand_tile", expands ? 4 * std::min<uint64_t>(largest_linear, uint64_t{1} << 24) : 0,
      true, all & ~phase_bit(Phase::kEmbed));
  // the CPU backend's 16-bit GEMM widens one linear's weights and its input rows to fp32 for each call
  add("half_gemm_widening", cpu && plan.half_weights ? 4 * (largest_linear + mb_rows * k) : 0, true,
      hessian | phase_bit(Phase::kPropagate) | (fp ? inputs : 0u));
  // BlockRunner: one micro-batch's scratch: x, xn, h [rows, hidden]; q, attn [rows, heads * head_dim]; k, v
  // [rows, kv_heads * head_dim]; gate, up [rows, intermediate] (all fp32), from open_stage on
  add("runner_scratch", runner_scratch, true, all);
  // a device backend's Hessian partial and GPTQ factor
  add("hessian_partial_fp32", gm.hessian_device, true, hessian);
  add("gptq_factor", cpu || to_host ? 0 : gm.factor, true, factor_phases);
  // the column loop of one tile of this rank's rows (w, wc, res fp32, codes, tables)
  add("solve_working_set", to_host ? 0 : gm.solve_device, true, solve);
  add_moe_terms(in_model, value_bytes, tokens, per_block, inputs, hessian, solve, add);
  return t;
}

Plan make_plan(const PlanInputs& in) {
  const int64_t blocks = static_cast<int64_t>(in.block_bytes.size());
  PQ_REQUIRE(in.ranks_per_stage > 0, "--ranks-per-stage must be positive, got ", in.ranks_per_stage);
  PQ_REQUIRE(in.world > 0, "the job must have at least one rank, got ", in.world);
  PQ_REQUIRE(in.world % in.ranks_per_stage == 0, "the job has ", in.world,
             " ranks, which is not a multiple of --ranks-per-stage ", in.ranks_per_stage);
  const int parts = in.world / in.ranks_per_stage;
  PQ_REQUIRE(parts <= blocks, "the job has ", parts, " pipeline stages (", in.world, " ranks / ", in.ranks_per_stage,
             " per stage) but the model has only ", blocks, " blocks: use fewer ranks or more --ranks-per-stage");
  PQ_REQUIRE(in.samples >= in.ranks_per_stage, "each of the ", in.ranks_per_stage,
             " ranks of a stage needs at least one calibration sample; there are ", in.samples);
  const int64_t chunks = (in.samples + kHessianChunk - 1) / kHessianChunk;
  PQ_REQUIRE(chunks >= in.ranks_per_stage, "--ranks-per-stage ", in.ranks_per_stage, ": the ", in.samples,
             " calibration samples form ", chunks, " Hessian chunk(s) of up to ", kHessianChunk,
             " samples and each rank of a stage needs one; use at least ", kHessianChunk * (in.ranks_per_stage - 1) + 1,
             " samples (--nsamples) or fewer ranks per stage");
  PQ_REQUIRE(in.seq_len > 0 && in.micro_batch > 0, "--seq-len and --micro-batch must be positive");
  // balanced by the blocks' bytes alone: quantization time follows them, while the embedding (first stage) and
  // the head (last stage) cost memory, not solve time
  const std::vector<int64_t> counts = in.blocks_per_stage.empty() ? balanced_split(in.block_bytes, parts)
                                                                  : user_split(in.blocks_per_stage, parts, blocks);
  Plan plan;
  plan.world = in.world;
  plan.ranks_per_stage = in.ranks_per_stage;
  plan.inputs = in;
  plan.backend = plan.inputs.backend = decide_backend(in.backend);
  plan.half_weights = decide_half(in.compute_dtype, plan.backend, in.config);
  const bool cpu = plan.backend == BackendKind::kCpu;
  int64_t first = 0;
  for (int p = 0; p < parts; ++p) {
    StagePlan s;
    s.stage = p;
    s.first_rank = p * in.ranks_per_stage;
    s.ranks = in.ranks_per_stage;
    s.first_block = first;
    s.blocks = counts[static_cast<size_t>(p)];
    for (int64_t b = first; b < first + s.blocks; ++b) s.weight_bytes += in.block_bytes[static_cast<size_t>(b)];
    s.has_embedding = p == 0;
    s.has_head = p == parts - 1;
    if (in.fp_propagation)
      s.fp_blocks = fp_blocks_resident(s.weight_bytes, in.fp_resident_bytes) ? "resident" : "streamed";
    s.terms = stage_memory_terms(plan.inputs, plan, s);
    for (const Phase phase : kPhases) {
      PhasePeak peak{phase, 0, 0};
      for (const auto& term : s.terms) {
        if (!term.live_in(phase)) continue;
        if (term.backend) peak.device_bytes += term.bytes;
        if (!term.backend || cpu) peak.host_bytes += term.bytes;  // the CPU backend's memory is host memory
      }
      s.host_bytes = std::max(s.host_bytes, peak.host_bytes);
      s.device_bytes = std::max(s.device_bytes, peak.device_bytes);
      s.phases.push_back(peak);
    }
    if (s.has_embedding) s.weight_bytes += in.embedding_bytes;
    if (s.has_head) s.weight_bytes += in.head_bytes;
    plan.stages.push_back(std::move(s));
    first += counts[static_cast<size_t>(p)];
  }
  return plan;
}

void add_checkpoint_sizes(PlanInputs& in, const io::Checkpoint& ckpt) {
  const int64_t blocks = in.config.num_layers;
  in.block_bytes.assign(static_cast<size_t>(blocks), 0);
  const std::string layers = "model.layers.";
  for (const auto& name : ckpt.names()) {
    if (name.rfind(layers, 0) != 0) continue;
    const size_t dot = name.find('.', layers.size());
    if (dot == std::string::npos) continue;
    const std::string index = name.substr(layers.size(), dot - layers.size());
    if (index.empty() || index.find_first_not_of("0123456789") != std::string::npos) continue;
    const int64_t b = std::stoll(index);
    if (b < blocks) in.block_bytes[static_cast<size_t>(b)] += ckpt.info(name).nbytes;
  }
  in.embedding_bytes = ckpt.info("model.embed_tokens.weight").nbytes;
  in.head_bytes =
      ckpt.info("model.norm.weight").nbytes +
      (ckpt.has("lm_head.weight") && !in.config.tie_word_embeddings ? ckpt.info("lm_head.weight").nbytes : 0);
}

std::string plan_refusal(const Plan& plan) {
  const auto excess = worst_excess(plan);
  if (!excess) return "";
  return "stage " + std::to_string(excess->stage) + " needs " + gb_short(static_cast<double>(excess->need)) +
         " GB of " + (excess->device ? "device" : "host") + " memory, " +
         (excess->device ? "--gpu-mem" : "--host-mem") + " is " + number(excess->budget_gb) + ": " +
         what_would_fit(plan, *excess);
}

void print_plan(std::ostream& os, const Plan& plan, bool verbose) {
  os << "plan: " << plan.world << " ranks = " << plan.stages.size() << " stages x " << plan.ranks_per_stage
     << " ranks per stage (GB = 1e9 bytes)\n";
  os << std::left << std::setw(7) << "stage" << std::setw(10) << "ranks" << std::setw(12) << "blocks" << std::right
     << std::setw(12) << "weights GB" << std::setw(14) << "host GB/rank" << std::setw(13) << "dev GB/rank"
     << "  extra\n";
  for (const auto& s : plan.stages) {
    const std::string ranks = std::to_string(s.first_rank) + "-" + std::to_string(s.first_rank + s.ranks - 1);
    const std::string blocks = std::to_string(s.first_block) + "-" + std::to_string(s.first_block + s.blocks - 1);
    std::string extra;
    if (s.has_embedding) extra += " embedding";
    if (s.has_head) extra += " norm+lm_head";
    if (!s.fp_blocks.empty()) extra += " fp-blocks-" + s.fp_blocks;
    os << std::left << std::setw(7) << s.stage << std::setw(10) << ranks << std::setw(12) << blocks << std::right
       << std::setw(12) << gb(s.weight_bytes) << std::setw(14) << gb(s.host_bytes) << std::setw(13)
       << gb(s.device_bytes) << " " << extra << "\n";
  }
  // below the table (whose lines scripts read): the peaks by phase, the backend, the budgets
  os << "peak per rank by phase, GB host/device:\n" << std::left << std::setw(7) << "stage" << std::right;
  for (const Phase phase : kPhases) os << std::setw(16) << name(phase);
  os << "\n";
  for (const auto& s : plan.stages) {
    os << std::left << std::setw(7) << s.stage << std::right;
    for (const auto& p : s.phases) os << std::setw(16) << gb(p.host_bytes) + "/" + gb(p.device_bytes);
    os << "\n";
  }
  if (plan.backend == BackendKind::kCpu)
    os << "backend cpu: its memory is host memory, counted in host GB (dev GB: the backend's part)\n";
  else
    os << "backend cuda, forward weights " << (plan.half_weights ? "16-bit" : "fp32")
       << ": dev GB counts the allocations within --gpu-mem (the CUDA context and library workspaces come on top)\n";
  if (verbose)
    for (const auto& s : plan.stages) {
      os << "stage " << s.stage << " memory terms per rank, GB (phases: e embed, i inputs, h hessian, s solve, "
         << "c check, p propagate):\n";
      for (const auto& term : s.terms) {
        std::string phases;
        for (const Phase phase : kPhases) phases += term.live_in(phase) ? name(phase)[0] : '.';
        os << "  " << std::left << std::setw(26) << term.name << std::setw(8) << (term.backend ? "backend" : "host")
           << std::right << std::setw(12) << gb_fine(term.bytes) << "  " << phases << "\n";
      }
    }
}

void print_fit(std::ostream& os, const Plan& plan) {
  const MemoryBudgets& b = plan.inputs.budgets;
  if (b.host_gb <= 0 && b.device_gb <= 0) return;
  const std::string refusal = plan_refusal(plan);
  if (!refusal.empty()) {
    os << "fits: no: " << refusal << "\n";
    return;
  }
  os << "fits: yes:";
  if (b.host_gb > 0) os << " host peaks within --host-mem " << number(b.host_gb);
  if (b.device_gb > 0)
    os << (b.host_gb > 0 ? "," : "")
       << (plan.backend == BackendKind::kCuda ? " device peaks within --gpu-mem " + number(b.device_gb)
                                              : std::string(" --gpu-mem not checked (backend cpu)"));
  os << "\n";
}

nlohmann::json plan_json(const Plan& plan) {
  nlohmann::json j;
  j["world"] = plan.world;
  j["ranks_per_stage"] = plan.ranks_per_stage;
  j["backend"] = name(plan.backend);
  j["budgets"] = {{"host_mem_gb", plan.inputs.budgets.host_gb}, {"gpu_mem_gb", plan.inputs.budgets.device_gb}};
  j["stages"] = nlohmann::json::array();
  const bool cpu = plan.backend == BackendKind::kCpu;
  for (const auto& s : plan.stages) {
    nlohmann::json st;
    st["stage"] = s.stage;
    st["ranks"] = s.ranks;
    st["blocks"] = {s.first_block, s.first_block + s.blocks - 1};
    st["host_peak_gb"] = to_gb(s.host_bytes);
    st["device_peak_gb"] = to_gb(s.device_bytes);
    st["weights_gb"] = to_gb(s.weight_bytes);
    if (!s.fp_blocks.empty()) st["fp_blocks"] = s.fp_blocks;
    st["phases"] = nlohmann::json::object();
    for (const auto& p : s.phases)
      st["phases"][name(p.phase)] = {{"host_gb", to_gb(p.host_bytes)}, {"device_gb", to_gb(p.device_bytes)}};
    // host memory: the CPU backend's terms are host memory too
    st["host_terms_gb"] = nlohmann::json::object();
    st["device_terms_gb"] = nlohmann::json::object();
    for (const auto& term : s.terms) {
      if (!term.backend || cpu) st["host_terms_gb"][term.name] = to_gb(term.bytes);
      if (term.backend) st["device_terms_gb"][term.name] = to_gb(term.bytes);
    }
    j["stages"].push_back(std::move(st));
  }
  const std::string refusal = plan_refusal(plan);
  j["fits"] = refusal.empty();
  if (const auto a = recommend_layout(plan.inputs))
    j["recommended"] = {{"stages", a->stages}, {"ranks_per_stage", a->ranks_per_stage}, {"why", a->why}};
  if (!refusal.empty()) j["refusal"] = refusal;
  return j;
}

void check_plan_fits(const Plan& run) {
  const MemoryBudgets& budgets = run.inputs.budgets;
  if (budgets.host_gb <= 0 && budgets.device_gb <= 0) return;
  const std::string refusal = plan_refusal(run);
  PQ_REQUIRE(refusal.empty(), refusal);
  if (world_rank() != 0) return;
  uint64_t host = 0, device = 0;
  for (const auto& s : run.stages) {
    host = std::max(host, s.host_bytes);
    device = std::max(device, s.device_bytes);
  }
  if (budgets.host_gb > 0)
    std::printf("memory: every stage fits --host-mem %s (largest host peak %s GB per rank)\n",
                number(budgets.host_gb).c_str(), gb_short(static_cast<double>(host)).c_str());
  if (budgets.device_gb > 0 && run.backend == BackendKind::kCuda)
    std::printf("memory: every stage fits --gpu-mem %s (largest device peak %s GB per rank)\n",
                number(budgets.device_gb).c_str(), gb_short(static_cast<double>(device)).c_str());
  std::fflush(stdout);
}

PlanInputs plan_inputs(const PlanOptions& o, const io::ModelConfig& config, const io::Checkpoint& ckpt) {
  PlanInputs in;
  in.config = config;
  add_checkpoint_sizes(in, ckpt);
  in.world = o.world;
  in.ranks_per_stage = o.ranks_per_stage;
  in.blocks_per_stage = o.blocks_per_stage;
  in.samples = o.nsamples;
  in.seq_len = o.seq_len;
  in.micro_batch = o.run.micro_batch;
  in.fp_propagation = o.propagation == Propagation::kFp;
  in.fp_resident_bytes = o.fp_resident_bytes;
  in.backend = o.run.backend;
  in.compute_dtype = o.run.compute_dtype;
  in.group_size = o.group_size;
  in.budgets = {o.host_mem_gb, o.run.gpu_mem_gb};
  in.process_bytes = resident_host_bytes();
  return in;
}

std::optional<LayoutAdvice> recommend_layout(const PlanInputs& in) {
  std::vector<int> fitting;  // D, ascending
  for (int d = 1; d <= in.world; ++d) {
    if (in.world % d != 0) continue;
    PlanInputs v = in;
    v.ranks_per_stage = d;
    v.blocks_per_stage.clear();
    if (fits(v)) fitting.push_back(d);
  }
  if (fitting.empty()) return std::nullopt;
  LayoutAdvice a;
  const int chunks = static_cast<int>((in.samples + kHessianChunk - 1) / kHessianChunk);
  if (in.fp_propagation) {
    a.ranks_per_stage = fitting.front();
    a.stages = in.world / a.ranks_per_stage;
    a.why = "fp propagation: every stage works at once, so the most stages keep every rank busy from the start";
  } else {
    a.ranks_per_stage = fitting.back();
    a.stages = in.world / a.ranks_per_stage;
    a.why = "quantized propagation: the stages run one after another, so the widest stage group keeps the most "
            "ranks busy (" + std::to_string(a.ranks_per_stage) + " of " + std::to_string(in.world) + " at a time; " +
            std::to_string(chunks) + " Hessian chunks of samples allow at most " + std::to_string(chunks) +
            " per stage)";
  }
  return a;
}

int run_plan(const PlanOptions& o, std::ostream& os) {
  const io::ModelConfig config = io::ModelConfig::load(o.model_dir);
  config.check_seq_len(o.seq_len);
  const io::Checkpoint ckpt = io::Checkpoint::open(o.model_dir);  // headers only
  validate_checkpoint(ckpt, config);
  const Plan plan = make_plan(plan_inputs(o, config, ckpt));
  // planning reads headers: a checkpoint larger than memory (or a sparse one) plans in a second
  PQ_ASSERT(ckpt.mapped_files().empty(), "plan mapped tensor data of ", ckpt.mapped_files().front());
  const std::string refusal = plan_refusal(plan);
  if (world_rank() == 0) {
    if (o.json) {
      os << plan_json(plan).dump() << "\n";
    } else {
      os << "pipequant plan: " << o.model_dir << ", " << config.num_layers << " blocks, " << o.nsamples << " samples x "
         << o.seq_len << " tokens, micro-batch " << o.run.micro_batch << ", propagation " << name(o.propagation)
         << "\n";
      print_plan(os, plan, o.verbose);
      print_fit(os, plan);
      if (const auto a = recommend_layout(plan.inputs))
        os << "layout: recommended " << a->stages << " stages x " << a->ranks_per_stage
           << " ranks per stage (--ranks-per-stage " << a->ranks_per_stage << "): " << a->why << "\n";
      else
        os << "layout: no split of " << plan.world << " ranks fits\n";
    }
    os.flush();
  }
  return refusal.empty() ? 0 : 1;
}

}  // namespace pipequant
