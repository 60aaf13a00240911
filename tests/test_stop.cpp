// The stop line a SIGTERM or SIGINT prints (base/stop.hpp): its wording, and the blocks it names as complete,
// which are those an earlier run kept and those ShardWriter::mark_complete has flushed since.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>

#include "base/stop.hpp"
#include "io/shard.hpp"
#include "tests/testdata.hpp"

namespace pipequant {
namespace {

constexpr const char* kResume = "; rerun the same command without --overwrite to resume";

TEST(Stop, BlockRanges) {
  EXPECT_EQ(block_ranges({}), "");
  EXPECT_EQ(block_ranges({4}), "4");
  EXPECT_EQ(block_ranges({1, 3}), "1, 3");
  EXPECT_EQ(block_ranges({1, 2, 3, 5, 7, 8}), "1-3, 5, 7-8");
}

TEST(Stop, StageReportSaysWhichBlocksAreComplete) {
  const std::string f = "shard-00001-of-00003.h5";
  EXPECT_EQ(stage_stop_report(1, f, 2, 4, {2, 3}), "stage 1 (" + f + "): blocks 2-3 complete, 4-5 not" + kResume);
  EXPECT_EQ(stage_stop_report(1, f, 2, 4, {3}), "stage 1 (" + f + "): block 3 complete, 2, 4-5 not" + kResume);
  EXPECT_EQ(stage_stop_report(1, f, 2, 4, {}), "stage 1 (" + f + "): blocks 2-5 not complete" + kResume);
  EXPECT_EQ(stage_stop_report(1, f, 2, 1, {}), "stage 1 (" + f + "): block 2 not complete" + kResume);
  EXPECT_EQ(stage_stop_report(1, f, 2, 2, {2, 3}), "stage 1 (" + f + "): blocks 2-3 complete" + kResume);
  // a block outside the stage's range is not this stage's to report
  EXPECT_EQ(stage_stop_report(0, f, 0, 2, {1, 7}), "stage 0 (" + f + "): block 1 complete, 0 not" + kResume);
}

// One process: the stage's root. Block 0 kept from an earlier run, block 1 marked complete by the writer, block 2
// begun but not marked.
TEST(Stop, LineNamesKeptAndMarkedBlocks) {
  const std::string dir = testing::scratch_dir("stop");
  const std::string path = dir + "/shard-00000-of-00001.h5";
  note_stage(0, path, 0, 3, true, {0});
  EXPECT_EQ(stop_line(SIGTERM),
            "pipequant: stopped by SIGTERM: stage 0 (shard-00000-of-00001.h5): block 0 complete, "
            "1-2 not" +
                std::string(kResume));
  {
    io::ShardWriter w(path, MPI_COMM_SELF, false);
    w.begin_block(1);
    w.mark_complete(1);
    w.begin_block(2);
    // another shard's marker (a test or a tool writing a second file) is not this stage's
    io::ShardWriter other(dir + "/other.h5", MPI_COMM_SELF, false);
    other.begin_block(2);
    other.mark_complete(2);
  }
  EXPECT_EQ(stop_line(SIGINT),
            "pipequant: stopped by SIGINT: stage 0 (shard-00000-of-00001.h5): blocks 0-1 complete, "
            "2 not" +
                std::string(kResume));
  // a member of a stage group that is not its root says nothing: the root speaks for the stage
  note_stage(0, path, 0, 3, false, {0});
  EXPECT_EQ(stop_line(SIGTERM), "");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace pipequant
