// The CUDA backend: every row of the table of backend operations (tests/backend_ops.hpp) against the readable CPU
// reference with the row's named tolerance, and twice in a row for run-to-run determinism; then what only a device
// has: transfers through pinned staging, the memory budget, a bad device, recovery after a failed factorization.
// Every test skips (not passes) where no CUDA device is visible; CTest label `gpu`. PIPEQUANT_BENCH_OPS=1 adds
// BackendOpsBench.cuda, which times every row on the device.
#include <gtest/gtest.h>

#include "kernels/backend.hpp"

#ifdef PIPEQUANT_HAVE_CUDA

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "tests/backend_ops.hpp"
#include "tests/test_util.hpp"

namespace pipequant::test {
namespace {

using kernels::Backend;
using kernels::Buffer;

#define SKIP_WITHOUT_CUDA() \
  if (kernels::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device"

std::unique_ptr<Backend> gpu() { return kernels::make_cuda_backend(0, 0); }

// --- the table -----------------------------------------------------------------------------------------------------

class CudaBackendOps : public ::testing::TestWithParam<size_t> {};

TEST_P(CudaBackendOps, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const auto g = gpu();  // first: the cases hold buffers of it
  const auto cases = backend_op_cases();
  check_case(*cases[GetParam()], *g);
}

// No atomics, fixed reduction orders, deterministic library modes: the same inputs give the same bits.
TEST_P(CudaBackendOps, RunToRunBitIdentical) {
  SKIP_WITHOUT_CUDA();
  const auto g = gpu();
  const auto cases = backend_op_cases();
  OpCase& c = *cases[GetParam()];
  const Outputs first = run_case(c, *g);
  const Outputs second = run_case(c, *g);
  ASSERT_EQ(first.size(), second.size());
  for (size_t o = 0; o < first.size(); ++o)
    expect_identical(second[o].values, first[o].values, c.name() + " " + first[o].name);
}

INSTANTIATE_TEST_SUITE_P(Table, CudaBackendOps, ::testing::Range<size_t>(0, backend_op_cases().size()),
                         case_param_name);

[[maybe_unused]] const bool kBenchRegistered = register_bench(
    "cuda", []() -> std::unique_ptr<Backend> { return kernels::cuda_device_count() > 0 ? gpu() : nullptr; });

// --- memory ----------------------------------------------------------------------------------------------------------

TEST(CudaBackend, TransfersRoundTripThroughStaging) {
  SKIP_WITHOUT_CUDA();
  auto g = gpu();
  EXPECT_EQ(g->name(), "cuda");
  // 40 MiB: several staging chunks and a ragged last one; and a few bytes
  for (const size_t count : {size_t{10} * 1024 * 1024 + 3, size_t{7}}) {
    std::vector<float> host = normal(count, 1.0f, 11);
    Buffer<float> d(*g, static_cast<int64_t>(count));
    g->upload(d.data(), host.data(), count * sizeof(float));
    std::vector<float> back(count, 0.0f);
    g->download(back.data(), d.data(), count * sizeof(float));
    expect_identical(back, host, "round trip of " + std::to_string(count) + " floats");
  }
}

TEST(CudaBackend, BudgetIsEnforcedAndPeakTracked) {
  SKIP_WITHOUT_CUDA();
  const size_t budget = size_t{256} << 20;
  auto g = kernels::make_cuda_backend(0, budget);
  g->reset_peak();
  const size_t base = g->peak_bytes();  // library workspace and status word
  {
    Buffer<uint8_t> a(*g, int64_t{64} << 20);
    Buffer<uint8_t> b(*g, int64_t{32} << 20);
    EXPECT_EQ(g->peak_bytes(), base + (size_t{96} << 20));
  }
  EXPECT_EQ(g->peak_bytes(), base + (size_t{96} << 20));  // a high-water mark
  g->reset_peak();
  EXPECT_EQ(g->peak_bytes(), base);
  try {
    Buffer<uint8_t> too_big(*g, static_cast<int64_t>(budget));
    FAIL() << "allocating the whole budget on top of live memory must fail";
  } catch (const UserError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(std::to_string(budget)), std::string::npos) << message;  // names the budget
    EXPECT_NE(message.find("budget"), std::string::npos) << message;
  }
  EXPECT_EQ(g->peak_bytes(), base);  // the refused request left nothing behind
}

TEST(CudaBackend, BadDeviceIsAUserError) {
  SKIP_WITHOUT_CUDA();
  EXPECT_THROW(kernels::make_cuda_backend(kernels::cuda_device_count(), 0), UserError);
}

// The table checks that a failed factorization is reported; here the backend must stay usable after one (the
// status word is read and cleared).
TEST(CudaBackend, ReverseCholeskyRecoversAfterFailure) {
  SKIP_WITHOUT_CUDA();
  const int64_t n = 40;
  auto g = gpu();
  auto bad = spd_matrix(n, 7);
  bad[static_cast<size_t>(20 * n + 20)] = -5.0f;  // not positive definite
  auto dbad = to_backend(*g, bad);
  EXPECT_FALSE(g->reverse_cholesky(dbad.data(), n));
  auto dgood = to_backend(*g, spd_matrix(n, 8));
  EXPECT_TRUE(g->reverse_cholesky(dgood.data(), n));
}

}  // namespace
}  // namespace pipequant::test

#else  // no CUDA backend in this build

TEST(CudaBackend, NotBuilt) { GTEST_SKIP() << "this build has no CUDA backend"; }

#endif
