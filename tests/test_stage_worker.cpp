// The stage worker driven phase by phase and block by block on a real checkpoint (stories260K, 5 blocks): each
// quantize_block(b) leaves block b complete in the shard and no later block; the result equals run_quantize's,
// dataset by dataset; and a worker over an output whose blocks verify replays them instead of solving.
#include <gtest/gtest.h>

#include <filesystem>

#include "io/shard.hpp"
#include "src/pipeline.hpp"
#include "src/stage_worker.hpp"
#include "testdata.hpp"

namespace pipequant {
namespace {

QuantizeOptions stories_options(const std::string& out) {
  QuantizeOptions o;
  o.model_dir = testing::testdata("stories260K");
  o.calib_path = testing::testdata("text/tinystories_calib.tok512.npy");
  o.out_dir = out;
  o.seq_len = 64;
  o.nsamples = 12;
  o.quant.bits = 4;
  o.quant.group_size = 32;
  o.quant.act_order = true;
  o.run.backend = BackendKind::kCpu;
  o.run.threads = 1;
  o.run.micro_batch = 5;
  o.args_json = R"({"bits":4})";
  o.fingerprint_args_json = R"({"bits":4})";
  return o;
}

std::string shard_of(const std::string& out) { return out + "/shard-00000-of-00001.h5"; }

void expect_same_linears(const std::string& a, const std::string& b, int64_t blocks) {
  io::ShardReader ra(shard_of(a)), rb(shard_of(b));
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (const auto& linear : kLinears) {
      const io::PackedLinear pa = ra.read_linear(blk, linear.module), pb = rb.read_linear(blk, linear.module);
      EXPECT_EQ(pa.qweight, pb.qweight) << blk << " " << linear.module;
      EXPECT_EQ(pa.qzeros, pb.qzeros) << blk << " " << linear.module;
      EXPECT_EQ(pa.scales, pb.scales) << blk << " " << linear.module;
      EXPECT_EQ(pa.g_idx, pb.g_idx) << blk << " " << linear.module;
      EXPECT_GT(pa.relative_error, 0.0) << blk << " " << linear.module;
    }
}

TEST(StageWorker, BlockByBlockEqualsRunQuantize) {
  const std::string dir = testing::scratch_dir("stage-worker");
  const QuantizeOptions stepped = stories_options(dir + "/stepped");
  StageWorker worker(stepped);
  ASSERT_TRUE(worker.prepare());
  ASSERT_EQ(worker.first_block(), 0);
  ASSERT_EQ(worker.end_block(), 5);
  worker.obtain_inputs();
  for (int64_t b = 0; b < worker.end_block(); ++b) {
    worker.quantize_block(b);
    io::ShardReader reader(shard_of(stepped.out_dir));
    EXPECT_TRUE(reader.block_complete(b)) << "block " << b;
    EXPECT_TRUE(reader.verify_block(b).empty()) << "block " << b;
    if (b + 1 < worker.end_block()) {
      EXPECT_FALSE(reader.block_complete(b + 1)) << "block " << b + 1;
    }
  }
  const std::vector<StageMetrics> metrics = worker.finish();
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0].linears.size(), 5u * kLinears.size());
  EXPECT_EQ(metrics[0].blocks_resumed, 0);
  EXPECT_TRUE(io::read_model_index(stepped.out_dir).complete);

  const QuantizeOptions whole = stories_options(dir + "/whole");
  run_quantize(whole);
  expect_same_linears(stepped.out_dir, whole.out_dir, 5);

  // the same command over a complete output: every block verifies and is replayed, nothing is solved again
  const std::vector<StageMetrics> again = run_quantize(stepped);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].blocks_resumed, 5);
  EXPECT_EQ(again[0].solve_seconds, 0.0);
  expect_same_linears(stepped.out_dir, whole.out_dir, 5);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace pipequant
