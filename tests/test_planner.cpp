// The planner: contiguous blocks per stage balanced by bytes (minimizing the largest stage), given per stage,
// the stage groups of ranks, the memory estimate term by term and phase by phase, the budgets and what would make a
// plan fit them, the JSON of `pipequant plan`, and one clear error for each impossible layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "comm/stage_group.hpp"
#include "src/planner.hpp"

namespace pipequant {
namespace {

PlanInputs inputs(std::vector<uint64_t> block_bytes, int world, int ranks_per_stage = 1) {
  PlanInputs in;
  in.config.hidden_size = 256;
  in.config.intermediate_size = 688;
  in.config.num_heads = 8;
  in.config.num_kv_heads = 4;
  in.config.head_dim = 32;
  in.config.vocab_size = 1000;
  in.config.num_layers = static_cast<int64_t>(block_bytes.size());
  in.block_bytes = std::move(block_bytes);
  in.embedding_bytes = 1000;
  in.head_bytes = 10;
  in.world = world;
  in.ranks_per_stage = ranks_per_stage;
  in.samples = 16;
  in.seq_len = 128;
  in.micro_batch = 2;
  in.backend = BackendKind::kCpu;
  return in;
}

// The bytes of a stage's term, or nothing when the stage has no such term.
std::optional<uint64_t> term(const StagePlan& s, const std::string& name) {
  for (const auto& t : s.terms)
    if (t.name == name) return t.bytes;
  return std::nullopt;
}

const MemoryTerm* find_term(const StagePlan& s, const std::string& name) {
  for (const auto& t : s.terms)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<int64_t> counts(const Plan& p) {
  std::vector<int64_t> c;
  for (const auto& s : p.stages) c.push_back(s.blocks);
  return c;
}

std::string error_of(const PlanInputs& in) {
  try {
    make_plan(in);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Planner, EqualBlocksSplitEvenlyAndContiguously) {
  const Plan p = make_plan(inputs(std::vector<uint64_t>(12, 100), 3));
  EXPECT_EQ(counts(p), (std::vector<int64_t>{4, 4, 4}));
  int64_t next = 0;
  for (const auto& s : p.stages) {
    EXPECT_EQ(s.first_block, next);
    next += s.blocks;
  }
  EXPECT_TRUE(p.stages.front().has_embedding);
  EXPECT_FALSE(p.stages.front().has_head);
  EXPECT_TRUE(p.stages.back().has_head);
  EXPECT_EQ(p.stages[1].weight_bytes, 400u);
  EXPECT_EQ(p.stages[0].weight_bytes, 400u + 1000u);  // the embedding lives on the first stage
  EXPECT_EQ(p.stages[2].weight_bytes, 400u + 10u);    // the head on the last
}

TEST(Planner, UnequalBlocksMinimizeTheLargestStage) {
  // 9 | 1 1 1 1 1 1 1 1 1 | 9: two stages of 9 + the rest in the middle beats any even count split
  std::vector<uint64_t> bytes = {9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9};
  const Plan p = make_plan(inputs(bytes, 3));
  EXPECT_EQ(counts(p), (std::vector<int64_t>{1, 9, 1}));
  // a heavy block in the middle: the split keeps every stage at most the heavy block plus what it must take
  const Plan q = make_plan(inputs({1, 1, 1, 30, 1, 1, 1}, 3));
  uint64_t largest = 0;
  for (const auto& s : q.stages)
    largest = std::max(largest, s.weight_bytes - (s.has_embedding ? 1000 : 0) - (s.has_head ? 10 : 0));
  EXPECT_EQ(largest, 30u);
}

TEST(Planner, StageGroupsOfRanks) {
  const Plan p = make_plan(inputs(std::vector<uint64_t>(5, 1), 6, 2));
  ASSERT_EQ(p.stages.size(), 3u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(p.stages[static_cast<size_t>(s)].first_rank, 2 * s);
    EXPECT_EQ(p.stages[static_cast<size_t>(s)].ranks, 2);
  }
  // the blocks go to the 3 stages, not the 6 ranks: each stage a non-empty run, in order, all 5 covered
  int64_t next = 0;
  for (const auto& s : p.stages) {
    EXPECT_EQ(s.first_block, next);
    EXPECT_GT(s.blocks, 0);
    next = s.first_block + s.blocks;
  }
  EXPECT_EQ(next, 5);
}

TEST(Planner, BlocksPerStageGivenByTheUser) {
  auto in = inputs(std::vector<uint64_t>(10, 1), 3);
  // (std::string temporaries: GCC 12 warns falsely, -Wrestrict, on assigning short literals to a std::string)
  in.blocks_per_stage = std::string("2,3,5");
  EXPECT_EQ(counts(make_plan(in)), (std::vector<int64_t>{2, 3, 5}));
  in.blocks_per_stage = std::string("3");  // 3 each, the last takes the rest
  EXPECT_EQ(counts(make_plan(in)), (std::vector<int64_t>{3, 3, 4}));
}

// The small config of inputs(): the seven linears' elements (q, o [256, 256]; k, v [128, 256]; gate, up [688, 256];
// down [256, 688]) and one block's tensors in fp32 (the linears and two norms of 256).
constexpr uint64_t kLinearElems = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 688 * 256;
constexpr uint64_t kBlockHeld = 2 * kLinearElems + 4 * 2 * 256;  // a 16-bit block as stored, norms in fp32
constexpr uint64_t kK = 688;  // the widest Hessian: down_proj's in_features

TEST(Planner, FpPropagationHoldsTheStageBlocksInHostMemory) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  const Plan quantized = make_plan(in);
  in.fp_propagation = true;
  in.fp_resident_bytes = uint64_t{1} << 40;
  const Plan fp = make_plan(in);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(term(fp.stages[s], "fp_resident_blocks"), 3 * kBlockHeld) << "the stage's 3 blocks as stored";
    EXPECT_EQ(term(fp.stages[s], "fp_sent"), term(fp.stages[s], "activations")) << "the outputs sent on";
    EXPECT_FALSE(term(fp.stages[s], "prefetched_block")) << "resident blocks are not read again";
    EXPECT_FALSE(term(quantized.stages[s], "fp_resident_blocks"));
    EXPECT_FALSE(term(quantized.stages[s], "fp_sent"));
    EXPECT_EQ(term(quantized.stages[s], "prefetched_block"), kBlockHeld);
    EXPECT_GT(fp.stages[s].host_bytes, quantized.stages[s].host_bytes);
    EXPECT_EQ(fp.stages[s].device_bytes, quantized.stages[s].device_bytes);
  }
  std::ostringstream os;
  print_plan(os, fp);
  EXPECT_NE(os.str().find("2 stages x 1 ranks per stage"), std::string::npos) << os.str();
  EXPECT_NE(os.str().find("fp-blocks-resident"), std::string::npos) << os.str();
  EXPECT_EQ(quantized.stages[0].fp_blocks, "");
  EXPECT_EQ(fp.stages[0].fp_blocks, "resident");
}

TEST(Planner, FpPropagationStreamsBlocksThatDoNotFit) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  in.fp_propagation = true;
  in.fp_resident_bytes = 2u * 3u * 1000000u - 1;  // one byte short of the stage's three blocks counted in fp32
  const Plan fp = make_plan(in);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(fp.stages[s].fp_blocks, "streamed");
    EXPECT_FALSE(term(fp.stages[s], "fp_resident_blocks"));
    EXPECT_EQ(term(fp.stages[s], "prefetched_block"), kBlockHeld) << "one block read ahead, as quantized mode";
  }
  EXPECT_TRUE(term(fp.stages[0], "fp_sent"));
  EXPECT_FALSE(term(fp.stages[1], "fp_sent")) << "the streamed last stage sends nothing";
  in.fp_resident_bytes += 1;
  EXPECT_EQ(make_plan(in).stages[0].fp_blocks, "resident");
}

// One solve tile's column loop on the backend (quant.cpp GptqBuffers): w, wc, res fp32, codes, the two tables,
// err2, param_of; groups of 128.
uint64_t loop_bytes(uint64_t rows, uint64_t cols) {
  const uint64_t groups = (cols + 127) / 128;
  return 12 * rows * cols + rows * cols + 8 * rows * groups + 4 * (rows + cols);
}

// A linear [out, cols] held as codes with fp32 tables (groups of 128) and g_idx.
uint64_t coded_bytes(uint64_t out, uint64_t cols) { return out * cols + 8 * out * ((cols + 127) / 128) + 4 * cols; }

TEST(PlannerMemory, EachTermIsSizedByItsFormula) {
  const Plan p = make_plan(inputs(std::vector<uint64_t>(6, 1000000), 2));  // 2 stages x 3 blocks, D = 1
  const StagePlan& s0 = p.stages[0];
  const StagePlan& s1 = p.stages[1];
  const uint64_t tokens = 16 * 128, mb_rows = 2 * 128;
  // 1e6 bytes for 725504 values: a 16-bit checkpoint
  const uint64_t block_held = 2 * kLinearElems + 4 * 2 * 256;
  // the heaviest group is down_proj's (H [688, 688]); q, k, v, o, gate and up are codes by then
  const uint64_t held_at_down = coded_bytes(256, 256) + 2 * coded_bytes(128, 256) + coded_bytes(256, 256) +
                                2 * coded_bytes(688, 256) + 2 * 256 * 688 + 4 * 2 * 256;
  for (const StagePlan* s : {&s0, &s1}) {
    EXPECT_EQ(term(*s, "activations"), 4 * tokens * 256) << "x [samples * seq, hidden] fp32";
    EXPECT_EQ(term(*s, "propagate_outputs"), 4 * tokens * 256);
    EXPECT_EQ(term(*s, "hessian"), 12 * kK * kK) << "16 samples are 2 chunks: the fp32 partial and the fp64 sum";
    EXPECT_EQ(term(*s, "gptq_factor_host"), 4 * kK * kK) << "R of the widest group, in H's own memory";
    EXPECT_EQ(term(*s, "block_weights_held"), held_at_down);
    EXPECT_EQ(term(*s, "prefetched_block"), block_held) << "the next block as stored";
    EXPECT_EQ(term(*s, "runner_scratch"), 4 * mb_rows * (3 * 256 + 2 * 256 + 2 * 128 + 2 * 688));
    EXPECT_EQ(term(*s, "runner_expand_tile"), 4 * 688 * 256u) << "one tile of rows in fp32 (here a whole linear)";
    // down_proj's [256, 688] rows fit one tile
    EXPECT_EQ(term(*s, "solve_working_set"), loop_bytes(256, kK));
    EXPECT_EQ(term(*s, "solve_tile_host"), 6 * 256 * kK) << "the tile's fp32 rows and two copies of its codes";
    EXPECT_EQ(term(*s, "linear_results"), 256 * kK + 256 * kK / 2) << "the codes and the packed words";
    EXPECT_TRUE(term(*s, "error_terms"));
    for (const char* absent : {"group_sum_piece_fp64", "fp_sent", "fp_resident_blocks", "solve_working_set_host",
                               "runner_weights", "gptq_factor", "hessian_partial_fp32", "process"})
      EXPECT_FALSE(term(*s, absent)) << absent;
  }
  EXPECT_EQ(term(s0, "embedding_fp32"), 4 * 1000 * 256u + 1000) << "the first stage embeds: fp32 table, mapped pages";
  EXPECT_FALSE(term(s1, "embedding_fp32"));
  // where the terms live
  EXPECT_TRUE(find_term(s0, "solve_working_set")->backend);
  EXPECT_FALSE(find_term(s0, "hessian")->backend);
  EXPECT_FALSE(find_term(s0, "hessian")->live_in(Phase::kSolve));
  EXPECT_TRUE(find_term(s0, "gptq_factor_host")->live_in(Phase::kSolve));
  EXPECT_TRUE(find_term(s0, "embedding_fp32")->live_in(Phase::kEmbed));
  EXPECT_FALSE(find_term(s0, "embedding_fp32")->live_in(Phase::kInputs));
  // one chunk on one rank: H is the fp32 partial alone; the process's own memory is a term when measured
  auto one = inputs(std::vector<uint64_t>(6, 1000000), 2);
  one.samples = 8;
  one.process_bytes = 123456789;
  const Plan q = make_plan(one);
  EXPECT_EQ(term(q.stages[0], "hessian"), 4 * kK * kK);
  EXPECT_EQ(term(q.stages[0], "process"), 123456789u);
  EXPECT_TRUE(find_term(q.stages[0], "process")->live_in(Phase::kEmbed));
}

TEST(PlannerMemory, PhasePeaksSumTheLiveTermsAndTheCpuBackendIsHostMemory) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  for (const BackendKind backend : {BackendKind::kCpu, BackendKind::kCuda}) {
    in.backend = backend;
    const Plan p = make_plan(in);
    EXPECT_EQ(p.backend, backend);
    for (const auto& s : p.stages) {
      ASSERT_EQ(s.phases.size(), kPhases.size());
      uint64_t host_peak = 0, device_peak = 0;
      for (const auto& peak : s.phases) {
        uint64_t host = 0, device = 0;
        for (const auto& t : s.terms) {
          if (!t.live_in(peak.phase)) continue;
          (t.backend ? device : host) += t.bytes;
        }
        if (backend == BackendKind::kCpu) host += device;
        EXPECT_EQ(peak.host_bytes, host) << name(peak.phase);
        EXPECT_EQ(peak.device_bytes, device) << name(peak.phase);
        host_peak = std::max(host_peak, host);
        device_peak = std::max(device_peak, device);
      }
      EXPECT_EQ(s.host_bytes, host_peak);
      EXPECT_EQ(s.device_bytes, device_peak);
      EXPECT_GT(s.host_bytes, 0u);
      EXPECT_GT(s.device_bytes, 0u);
    }
  }
  in.backend = BackendKind::kCpu;
  const Plan cpu = make_plan(in);
  in.backend = BackendKind::kCuda;
  const Plan cuda = make_plan(in);
  EXPECT_FALSE(term(cpu.stages[0], "runner_weights")) << "the CPU backend expands tiles of the held weights";
  EXPECT_EQ(term(cuda.stages[0], "runner_weights"), 4 * kLinearElems + 4 * 2 * 256 + 4 * 16);
  EXPECT_LT(cpu.stages[0].device_bytes, cuda.stages[0].device_bytes);
}

TEST(PlannerMemory, CudaHoldsTheForwardWeightsIn16BitsForA16BitCheckpoint) {
  auto in = inputs(std::vector<uint64_t>(4, 1000), 1);
  in.config.torch_dtype = "bfloat16";
  in.backend = BackendKind::kCuda;
  EXPECT_EQ(term(make_plan(in).stages[0], "runner_weights"), 2 * kLinearElems + 4 * 2 * 256 + 4 * 16);
  in.compute_dtype = ComputeDtype::kFp32;
  EXPECT_EQ(term(make_plan(in).stages[0], "runner_weights"), 4 * kLinearElems + 4 * 2 * 256 + 4 * 16);
  in.backend = BackendKind::kCpu;  // the CPU backend is the fp32 reference (auto): tiles expanded per GEMM ...
  in.compute_dtype = ComputeDtype::kAuto;
  EXPECT_FALSE(term(make_plan(in).stages[0], "runner_weights"));
  in.compute_dtype = ComputeDtype::kBf16;  // ... and holds rounded 16-bit weights, widened for each GEMM, when asked
  const Plan half_cpu = make_plan(in);
  EXPECT_EQ(term(half_cpu.stages[0], "runner_weights"), 2 * kLinearElems + 4 * 2 * 256 + 4 * 16);
  EXPECT_EQ(term(half_cpu.stages[0], "half_gemm_widening"), 4 * (688 * 256 + 2 * 128 * 688u));
}

TEST(PlannerMemory, StageGroupsSplitSamplesAndRowsAndSumInPieces) {
  EXPECT_EQ(samples_per_rank(16, 1), 16);
  EXPECT_EQ(samples_per_rank(16, 2), 8);
  EXPECT_EQ(samples_per_rank(20, 2), 12) << "3 chunks of 8: 8 + 12";
  EXPECT_EQ(samples_per_rank(17, 3), 8);
  const Plan p = make_plan(inputs(std::vector<uint64_t>(6, 1000000), 4, 2));  // 2 stages x 2 ranks
  const StagePlan& s = p.stages[0];
  EXPECT_EQ(term(s, "activations"), 4 * 8 * 128 * 256u) << "8 of the 16 samples";
  EXPECT_EQ(term(s, "group_sum_piece_fp64"), 8 * kK * kK) << "H fits one piece";
  EXPECT_EQ(term(s, "solve_working_set"), loop_bytes(128, kK)) << "half of down_proj's rows";
  EXPECT_EQ(term(s, "linear_results"), (128 + 256 + 128) * kK) << "this rank's codes, the gathered ones, packed";
  auto wide = inputs(std::vector<uint64_t>(2, 1), 2, 2);
  wide.config.intermediate_size = 5000;  // 5000^2 elements: more than one piece
  EXPECT_EQ(term(make_plan(wide).stages[0], "group_sum_piece_fp64"), 8 * static_cast<uint64_t>(comm::kDefaultMaxCount));
}

TEST(PlannerMemory, AGpuBudgetSendsTheSolvesThatDoNotFitToTheHost) {
  auto in = inputs(std::vector<uint64_t>(4, 1000), 1);
  in.backend = BackendKind::kCuda;
  const Plan unbounded = make_plan(in);
  EXPECT_FALSE(term(unbounded.stages[0], "gptq_factor_host"));
  // beside the runner (about 5.9 MB) 10 MB leave no room for down_proj's factor and solve (6.8 MB): they go to the
  // host fallback
  in.budgets.device_gb = 0.01;
  const Plan p = make_plan(in);
  const StagePlan& s = p.stages[0];
  EXPECT_EQ(term(s, "gptq_factor_host"), 4 * kK * kK);
  EXPECT_FALSE(term(s, "gptq_factor"));
  EXPECT_EQ(term(s, "solve_working_set_host"), loop_bytes(256, kK));
  EXPECT_FALSE(term(s, "solve_working_set"));
  EXPECT_LT(s.device_bytes, unbounded.stages[0].device_bytes);
  const auto solve = static_cast<size_t>(Phase::kSolve);
  EXPECT_GT(s.phases[solve].host_bytes, unbounded.stages[0].phases[solve].host_bytes);
}

std::string refusal_of(const PlanInputs& in) { return plan_refusal(make_plan(in)); }

uint64_t host_peak(const PlanInputs& in) {
  uint64_t most = 0;
  for (const auto& s : make_plan(in).stages) most = std::max(most, s.host_bytes);
  return most;
}

TEST(PlannerBudgets, ARefusalNamesTheStageTheNeedTheBudgetAndWhatWouldFit) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  EXPECT_EQ(refusal_of(in), "") << "no budget: nothing to refuse";
  in.budgets.host_gb = 1000;
  EXPECT_EQ(refusal_of(in), "");
  in.budgets.device_gb = 1e-6;  // the CPU backend's memory is host memory: --gpu-mem is not checked
  EXPECT_EQ(refusal_of(in), "");

  // the scratch of long micro-batches dominates: a smaller micro-batch fits
  auto mb = inputs(std::vector<uint64_t>(6, 1000000), 2);
  mb.seq_len = 2048;
  mb.micro_batch = 8;
  auto smaller = mb;
  smaller.micro_batch = 3;
  auto larger = mb;
  larger.micro_batch = 4;
  mb.budgets.host_gb = static_cast<double>(host_peak(smaller) + host_peak(larger)) / 2e9;
  const std::string r = refusal_of(mb);
  EXPECT_EQ(r.find("stage 0 needs "), 0u) << r;
  EXPECT_NE(r.find(" GB of host memory, --host-mem is "), std::string::npos) << r;
  EXPECT_NE(r.find(": use --micro-batch 3"), std::string::npos) << r;

  // the activations dominate: more ranks per stage split them
  auto acts = inputs(std::vector<uint64_t>(6, 1000000), 2);
  acts.samples = 256;
  acts.seq_len = 2048;
  acts.micro_batch = 1;
  auto split = acts;
  split.ranks_per_stage = 2;
  split.world = 4;
  acts.budgets.host_gb = static_cast<double>(host_peak(acts) + host_peak(split)) / 2e9;
  EXPECT_NE(refusal_of(acts).find(": use --ranks-per-stage 2 (2 stages x 2 = 4 ranks)"), std::string::npos)
      << refusal_of(acts);

  // the device: a cuda budget below one block's runner and Hessian fits no layout
  auto dev = inputs(std::vector<uint64_t>(6, 1000000), 2);
  dev.backend = BackendKind::kCuda;
  dev.budgets.device_gb = 0.001;
  const std::string d = refusal_of(dev);
  EXPECT_NE(d.find(" GB of device memory, --gpu-mem is 0.001: no layout fits: even --micro-batch 1"), std::string::npos)
      << d;
}

TEST(PlanJson, TheDocumentedShape) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 4, 2);
  const Plan p = make_plan(in);
  const nlohmann::json j = plan_json(p);
  EXPECT_EQ(j.at("world"), 4);
  EXPECT_EQ(j.at("ranks_per_stage"), 2);
  EXPECT_EQ(j.at("fits"), true);
  EXPECT_FALSE(j.contains("refusal"));
  ASSERT_EQ(j.at("stages").size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const auto& st = j["stages"][i];
    const StagePlan& s = p.stages[i];
    EXPECT_EQ(st.at("stage"), s.stage);
    EXPECT_EQ(st.at("ranks"), 2);
    EXPECT_EQ(st.at("blocks"), nlohmann::json::array({s.first_block, s.first_block + s.blocks - 1})) << "inclusive";
    EXPECT_EQ(st.at("host_peak_gb"), static_cast<double>(s.host_bytes) / 1e9);
    EXPECT_EQ(st.at("device_peak_gb"), static_cast<double>(s.device_bytes) / 1e9);
    EXPECT_EQ(st.at("host_terms_gb").at("hessian"), 12.0 * kK * kK / 1e9);
    EXPECT_EQ(st.at("host_terms_gb").at("runner_scratch"), st.at("device_terms_gb").at("runner_scratch"))
        << "the CPU backend's terms are host memory";
    EXPECT_EQ(st.at("phases").size(), kPhases.size());
  }
  EXPECT_EQ(j["stages"][0]["blocks"], nlohmann::json::array({0, 2}));
  in.budgets.host_gb = 1e-6;
  const nlohmann::json refused = plan_json(make_plan(in));
  EXPECT_EQ(refused.at("fits"), false);
  EXPECT_NE(refused.at("refusal").get<std::string>().find("--host-mem is 1e-06"), std::string::npos);
  EXPECT_EQ(nlohmann::json::parse(refused.dump()), refused) << "one JSON object, as printed";
}

TEST(PlanTable, TheTableThenThePhasesTheBackendAndTheBudgets) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  std::ostringstream plain, verbose, budget;
  print_plan(plain, make_plan(in));
  print_plan(verbose, make_plan(in), true);
  in.budgets.host_gb = 1000;
  print_plan(budget, make_plan(in));
  print_fit(budget, make_plan(in));
  const std::string t = plain.str();
  EXPECT_EQ(t.find("plan: 2 ranks = 2 stages x 1 ranks per stage (GB = 1e9 bytes)\nstage  ranks     blocks"), 0u) << t;
  EXPECT_LT(t.find("0      0-0       0-2 "), t.find("peak per rank by phase")) << "the phases below the table";
  EXPECT_NE(t.find("backend cpu: its memory is host memory"), std::string::npos);
  EXPECT_EQ(t.find("fits:"), std::string::npos) << "the table alone has no verdict";
  EXPECT_EQ(t.find("block_weights_held"), std::string::npos);
  EXPECT_NE(verbose.str().find("block_weights_held"), std::string::npos);
  EXPECT_NE(budget.str().find("fits: yes: host peaks within --host-mem 1000"), std::string::npos) << budget.str();
}

TEST(PlanLayout, QuantizedTakesTheWidestGroupsFpTheMostStages) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 4);  // 16 samples: 2 Hessian chunks, so D <= 2
  const auto q = recommend_layout(in);
  ASSERT_TRUE(q);
  EXPECT_EQ(q->stages, 2);
  EXPECT_EQ(q->ranks_per_stage, 2);
  EXPECT_NE(q->why.find("one after another"), std::string::npos) << q->why;
  in.fp_propagation = true;
  const auto fp = recommend_layout(in);
  ASSERT_TRUE(fp);
  EXPECT_EQ(fp->stages, 4);
  EXPECT_EQ(fp->ranks_per_stage, 1);
  // 8 ranks on 6 blocks: 8 x 1 cannot be made; fp takes 4 x 2
  in.world = 8;
  EXPECT_EQ(recommend_layout(in)->ranks_per_stage, 2);
  // a host budget nothing fits: no advice
  in.budgets.host_gb = 1e-6;
  EXPECT_FALSE(recommend_layout(in));
  const nlohmann::json j = plan_json(make_plan(inputs(std::vector<uint64_t>(6, 1000000), 4)));
  EXPECT_EQ(j.at("recommended").at("ranks_per_stage"), 2);
}

TEST(Planner, ImpossibleLayoutsAreOneClearError) {
  EXPECT_NE(error_of(inputs(std::vector<uint64_t>(5, 1), 6, 4)).find("not a multiple of --ranks-per-stage 4"),
            std::string::npos);
  EXPECT_NE(error_of(inputs(std::vector<uint64_t>(5, 1), 6)).find("the model has only 5 blocks"), std::string::npos);
  auto in = inputs(std::vector<uint64_t>(10, 1), 3);
  in.blocks_per_stage = std::string("2,3");
  EXPECT_NE(error_of(in).find("2 counts given for 3 stages"), std::string::npos);
  in.blocks_per_stage = std::string("2,3,4");
  EXPECT_NE(error_of(in).find("add up to 9, the model has 10"), std::string::npos);
  in.blocks_per_stage = std::string("5");
  EXPECT_NE(error_of(in).find("need more than the model's 10 blocks"), std::string::npos);
  in.blocks_per_stage = std::string("2,x,3");
  EXPECT_NE(error_of(in).find("expected positive integers"), std::string::npos);
  auto few = inputs(std::vector<uint64_t>(4, 1), 4, 4);
  few.samples = 3;
  EXPECT_NE(error_of(few).find("needs at least one calibration sample"), std::string::npos);
}

}  // namespace
}  // namespace pipequant
