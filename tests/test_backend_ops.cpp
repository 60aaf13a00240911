// The table of backend operations (tests/backend_ops.hpp) on the CPU backend: its tiled and threaded kernels against
// the readable reference, row by row. PIPEQUANT_BENCH_OPS=1 adds BackendOpsBench.cpu, which times every row:
//   PIPEQUANT_BENCH_OPS=1 ./tests/test_backend_ops --gtest_filter='BackendOpsBench.*'
#include <gtest/gtest.h>

#include "kernels/backend.hpp"
#include "tests/backend_ops.hpp"

namespace pipequant::test {
namespace {

class BackendOpsCpu : public ::testing::TestWithParam<size_t> {};

TEST_P(BackendOpsCpu, MatchesReference) {
  const auto backend = kernels::make_cpu_backend(2);  // first: the cases hold buffers of it
  const auto cases = backend_op_cases();
  check_case(*cases[GetParam()], *backend);
}

INSTANTIATE_TEST_SUITE_P(Table, BackendOpsCpu, ::testing::Range<size_t>(0, backend_op_cases().size()), case_param_name);

[[maybe_unused]] const bool kBenchRegistered = register_bench("cpu", [] { return kernels::make_cpu_backend(0); });

}  // namespace
}  // namespace pipequant::test
