// The table of backend operations (tests/backend_ops.hpp) on the CPU backend: its tiled and threaded kernels against
// the readable reference, row by row. PIPEQUANT_BENCH_OPS=1 adds BackendOpsBench.cpu, which times every row:
//   PIPEQUANT_BENCH_OPS=1 ./tests/test_backend_ops --gtest_filter='BackendOpsBench.*'
#include <gtest/gtest.h>

#include <cstring>
#include <memory>

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

// Every row's bits are a function of its inputs alone: 1 and 3 threads (a count that splits none of the tile grids
// evenly) give the same outputs. A threaded BLAS would not: it partitions a call by the thread count.
TEST_P(BackendOpsCpu, SameBitsForAnyThreadCount) {
  const auto one = kernels::make_cpu_backend(1);
  std::unique_ptr<kernels::Backend> three;  // made after the one-thread run: a backend sets OpenMP's default count
  const auto cases = backend_op_cases();
  OpCase& c = *cases[GetParam()];
  const Outputs a = run_case(c, *one);
  three = kernels::make_cpu_backend(3);
  const Outputs b = run_case(c, *three);
  ASSERT_EQ(a.size(), b.size());
  for (size_t o = 0; o < a.size(); ++o) {
    ASSERT_EQ(a[o].values.size(), b[o].values.size()) << a[o].name;
    size_t differ = 0, first = 0;
    for (size_t i = a[o].values.size(); i-- > 0;)
      if (std::memcmp(&a[o].values[i], &b[o].values[i], sizeof(double)) != 0) ++differ, first = i;
    EXPECT_EQ(differ, 0u) << c.name() << ": " << a[o].name << " differs in " << differ << " of " << a[o].values.size()
                          << " values, the first at " << first << " (" << a[o].values[first] << " with 1 thread, "
                          << b[o].values[first] << " with 3)";
  }
}

INSTANTIATE_TEST_SUITE_P(Table, BackendOpsCpu, ::testing::Range<size_t>(0, backend_op_cases().size()), case_param_name);

[[maybe_unused]] const bool kBenchRegistered = register_bench("cpu", [] { return kernels::make_cpu_backend(0); });

}  // namespace
}  // namespace pipequant::test
