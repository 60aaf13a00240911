// The CUDA device decisions that need no device (kernels/device_policy.hpp): how the device count is read, which GPU
// a rank takes and what share of its memory, what a Cholesky status means. They run in every build, GPU or not.
#include <gtest/gtest.h>

#include <cstddef>
#include <string>

#include "base/error.hpp"
#include "kernels/device_policy.hpp"

namespace pipequant::test {
namespace {

using kernels::DeviceCountQuery;
using Result = DeviceCountQuery::Result;

constexpr size_t kGiB = size_t{1} << 30;

std::string error_of_count(const DeviceCountQuery& q) {
  try {
    kernels::usable_device_count(q);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(DevicePolicy, NoDriverAndNoDeviceMeanACpuNode) {
  EXPECT_EQ(kernels::usable_device_count({Result::kDevices, 4, ""}), 4);
  EXPECT_EQ(kernels::usable_device_count({Result::kNoDevice, 0, ""}), 0);
  EXPECT_EQ(kernels::usable_device_count({Result::kNoDriver, 0, ""}), 0);
}

TEST(DevicePolicy, AFailingDriverIsAnErrorNotZeroDevices) {
  // an old driver on a GPU node: every job would quietly run on the CPU and every GPU test skip
  const DeviceCountQuery old{Result::kFailed, 0,
                             "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
                             "version; the driver supports CUDA 12.2, this build's runtime is 13.0"};
  const std::string e = error_of_count(old);
  EXPECT_NE(e.find("driver is installed but cannot be used"), std::string::npos) << e;
  EXPECT_NE(e.find("cudaErrorInsufficientDriver"), std::string::npos) << e;
  EXPECT_NE(e.find("supports CUDA 12.2"), std::string::npos) << e;
  EXPECT_NE(e.find("--backend cpu"), std::string::npos) << e;
}

TEST(DevicePolicy, RanksTakeGpusRoundRobinAndKnowWhoShares) {
  // 8 ranks on 8 GPUs: one each
  for (int r = 0; r < 8; ++r) {
    EXPECT_EQ(kernels::device_share(r, 8, 8).device, r);
    EXPECT_EQ(kernels::device_share(r, 8, 8).sharing, 1);
  }
  // 5 ranks on 2 GPUs: ranks 0, 2, 4 on device 0, ranks 1, 3 on device 1
  EXPECT_EQ(kernels::device_share(0, 5, 2).device, 0);
  EXPECT_EQ(kernels::device_share(0, 5, 2).sharing, 3);
  EXPECT_EQ(kernels::device_share(4, 5, 2).sharing, 3);
  EXPECT_EQ(kernels::device_share(1, 5, 2).device, 1);
  EXPECT_EQ(kernels::device_share(3, 5, 2).sharing, 2);
  // 2 ranks on 4 GPUs: devices 2 and 3 unused
  EXPECT_EQ(kernels::device_share(1, 2, 4).device, 1);
  EXPECT_EQ(kernels::device_share(1, 2, 4).sharing, 1);
  // every rank of a node counted once over the devices
  for (int size = 1; size <= 9; ++size)
    for (int devices = 1; devices <= 4; ++devices) {
      int total = 0;
      for (int d = 0; d < devices && d < size; ++d) total += kernels::device_share(d, size, devices).sharing;
      EXPECT_EQ(total, size) << size << " ranks, " << devices << " devices";
    }
}

TEST(DevicePolicy, RanksSharingAGpuSplitItsMemory) {
  const size_t total = 141 * kGiB, free = 140 * kGiB;
  // alone: all that is free, less 1 GiB
  EXPECT_EQ(kernels::device_budget(0, free, total, 1, 0), free - kGiB);
  // two ranks: half the device each, less the margin; together within the device
  const size_t half = kernels::device_budget(0, free, total, 2, 0);
  EXPECT_EQ(half, total / 2 - kGiB);
  EXPECT_LE(2 * half, total);
  // a device already half taken by another process: never more than is free
  EXPECT_EQ(kernels::device_budget(0, 8 * kGiB, total, 2, 0), 8 * kGiB - kGiB);
  // small free memory: the margin is an eighth
  EXPECT_EQ(kernels::device_budget(0, 4 * kGiB, 4 * kGiB, 1, 0), 4 * kGiB - kGiB / 2);
  // an explicit per-rank budget is taken as given when the ranks fit the device together...
  EXPECT_EQ(kernels::device_budget(60 * kGiB, free, total, 2, 0), 60 * kGiB);
  // ... and refused when they would over-commit it
  try {
    kernels::device_budget(80 * kGiB, free, total, 2, 1);
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--gpu-mem"), std::string::npos) << m;
    EXPECT_NE(m.find("2 ranks of this node share CUDA device 1"), std::string::npos) << m;
  }
}

TEST(DevicePolicy, CholeskyInfoSaysFactoredOrNotPositiveDefinite) {
  EXPECT_TRUE(kernels::cholesky_succeeded(0, 128));
  EXPECT_FALSE(kernels::cholesky_succeeded(1, 128));
  EXPECT_FALSE(kernels::cholesky_succeeded(128, 128));
}

TEST(DevicePolicyDeathTest, ANegativeCholeskyInfoIsABugNotAFallback) {
  // an invalid argument to the factorization must end the job, not become a silent round-to-nearest
  EXPECT_DEATH(kernels::cholesky_succeeded(-4, 128), "invalid argument");
  EXPECT_DEATH(kernels::cholesky_succeeded(129, 128), "info 129");
}

}  // namespace
}  // namespace pipequant::test
