#include "src/planner.hpp"

#include <algorithm>
#include <iomanip>
#include <limits>
#include <sstream>

#include "base/error.hpp"

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

std::string gb(uint64_t b) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(3) << static_cast<double>(b) / 1e9;
  return os.str();
}

}  // namespace

Plan make_plan(const PlanInputs& in) {
  const int64_t blocks = static_cast<int64_t>(in.block_bytes.size());
  PQ_REQUIRE(in.ranks_per_stage > 0, "--ranks-per-stage must be positive, got ", in.ranks_per_stage);
  PQ_REQUIRE(in.world % in.ranks_per_stage == 0, "the job has ", in.world,
             " ranks, which is not a multiple of --ranks-per-stage ", in.ranks_per_stage);
  const int parts = in.world / in.ranks_per_stage;
  PQ_REQUIRE(parts <= blocks, "the job has ", parts, " pipeline stages (", in.world, " ranks / ", in.ranks_per_stage,
             " per stage) but the model has only ", blocks, " blocks: use fewer ranks or more --ranks-per-stage");
  PQ_REQUIRE(in.samples >= in.ranks_per_stage, "each of the ", in.ranks_per_stage,
             " ranks of a stage needs at least one calibration sample; there are ", in.samples);
  // balanced by the blocks' bytes alone: quantization time follows them, while the embedding (first stage) and
  // the head (last stage) cost memory, not solve time
  const std::vector<int64_t> counts = in.blocks_per_stage.empty() ? balanced_split(in.block_bytes, parts)
                                                                  : user_split(in.blocks_per_stage, parts, blocks);
  Plan plan;
  plan.world = in.world;
  plan.ranks_per_stage = in.ranks_per_stage;
  const auto& c = in.config;
  const int64_t samples_per_rank = (in.samples + in.ranks_per_stage - 1) / in.ranks_per_stage;
  const uint64_t act_bytes = static_cast<uint64_t>(samples_per_rank * in.seq_len * c.hidden_size) * 4u;
  const int64_t widest = std::max({c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim});
  const uint64_t hessian_bytes = static_cast<uint64_t>(widest * widest) * 4u;
  const uint64_t mb_rows = static_cast<uint64_t>(in.micro_batch * in.seq_len);
  const uint64_t scratch =
      mb_rows * static_cast<uint64_t>(4 * c.hidden_size + 2 * c.intermediate_size + 2 * c.num_heads * c.head_dim) * 4u;
  int64_t first = 0;
  for (int p = 0; p < parts; ++p) {
    StagePlan s;
    s.stage = p;
    s.first_rank = p * in.ranks_per_stage;
    s.ranks = in.ranks_per_stage;
    s.first_block = first;
    s.blocks = counts[static_cast<size_t>(p)];
    uint64_t largest_block = 0;
    for (int64_t b = first; b < first + s.blocks; ++b) {
      s.weight_bytes += in.block_bytes[static_cast<size_t>(b)];
      largest_block = std::max(largest_block, in.block_bytes[static_cast<size_t>(b)]);
    }
    s.has_embedding = p == 0;
    s.has_head = p == parts - 1;
    // fp32 copies of one block's weights (the source may be 16-bit: at most 2x), the Hessian and its
    // factor, the GPTQ work matrices of the largest linear, the stage's activations twice (in and out)
    const uint64_t block_f32 = largest_block * 2u;
    s.device_bytes = block_f32 + 2 * hessian_bytes + scratch + block_f32;
    if (in.fp_propagation)
      s.fp_blocks = fp_blocks_resident(s.weight_bytes, in.fp_resident_bytes) ? "resident" : "streamed";
    s.host_bytes = 2 * act_bytes + block_f32 * 2 + 2 * hessian_bytes + (s.has_embedding ? in.embedding_bytes * 2 : 0) +
                   (s.fp_blocks == "resident" ? s.weight_bytes * 2 : 0);  // fp mode: every block of the stage, fp32
    if (s.has_embedding) s.weight_bytes += in.embedding_bytes;
    if (s.has_head) s.weight_bytes += in.head_bytes;
    plan.stages.push_back(s);
    first += s.blocks;
  }
  return plan;
}

void print_plan(std::ostream& os, const Plan& plan) {
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
}

}  // namespace pipequant
