// The planner: contiguous blocks per stage balanced by bytes (minimizing the largest stage), given per stage,
// the stage groups of ranks, the memory estimate, and one clear error for each impossible layout.
#include <gtest/gtest.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.hpp"
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
  in.config.num_layers = static_cast<int64_t>(block_bytes.size());
  in.block_bytes = std::move(block_bytes);
  in.embedding_bytes = 1000;
  in.head_bytes = 10;
  in.world = world;
  in.ranks_per_stage = ranks_per_stage;
  in.samples = 8;
  in.seq_len = 128;
  in.micro_batch = 2;
  return in;
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

TEST(Planner, FpPropagationHoldsTheStageBlocksInHostMemory) {
  auto in = inputs(std::vector<uint64_t>(6, 1000000), 2);
  const Plan quantized = make_plan(in);
  in.fp_propagation = true;
  in.fp_resident_bytes = uint64_t{1} << 40;
  const Plan fp = make_plan(in);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(fp.stages[s].host_bytes - quantized.stages[s].host_bytes, 2u * 3u * 1000000u)
        << "fp32 copies of the stage's three blocks";
    EXPECT_EQ(fp.stages[s].device_bytes, quantized.stages[s].device_bytes);
    EXPECT_GT(quantized.stages[s].host_bytes, 2u * 1000000u) << "at least two blocks' weights in fp32";
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
  const Plan quantized = make_plan(in);
  in.fp_propagation = true;
  in.fp_resident_bytes = 2u * 3u * 1000000u - 1;  // one byte short of the stage's three blocks in fp32
  const Plan fp = make_plan(in);
  for (size_t s = 0; s < 2; ++s) {
    EXPECT_EQ(fp.stages[s].fp_blocks, "streamed");
    EXPECT_EQ(fp.stages[s].host_bytes, quantized.stages[s].host_bytes) << "one block at a time, as quantized mode";
  }
  in.fp_resident_bytes += 1;
  EXPECT_EQ(make_plan(in).stages[0].fp_blocks, "resident");
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
