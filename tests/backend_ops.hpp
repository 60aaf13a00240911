#pragma once
// The table of backend operations, after ggml's tests/test-backend-ops.cpp: a case is a row (op x shape x data x
// parameters) whose reference outputs carry a named tolerance with its one-line reason. The same table checks
// every backend against the readable CPU reference -- plain double loops in backend_ops.cpp, and
// kernels/cpu/gptq_reference.hpp for the GPTQ column loop and the Cholesky factor -- in test_backend_ops.cpp
// (the CPU backend) and test_kernels_cuda.cpp (the CUDA backend), and times every row as a benchmark when
// PIPEQUANT_BENCH_OPS is set. Adding an op is one OpCase subclass plus its rows in backend_op_cases().

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.hpp"

namespace pipequant::test {

// |got - want| <= atol + rtol * magnitude, elementwise, for at least min_fraction of the elements. The magnitude is
// |want| unless the reference gives its own (e.g. sum |terms| of a dot product, the scale its rounding error has).
// min_fraction < 1 only for GPTQ, where one code that rounds the other way moves the rest of its row.
struct Tolerance {
  double atol = 0.0;
  double rtol = 0.0;
  double min_fraction = 1.0;
  const char* why = "";  // one line: why this bound holds and why it is tight enough
};

// One output of a case, as doubles. On the reference side it carries the tolerance (and optionally magnitudes).
struct Output {
  std::string name;
  std::vector<double> values;
  Tolerance tol;
  std::vector<double> magnitude;  // empty: |values|
};
using Outputs = std::vector<Output>;

// What one call does, for the benchmark's rate: flops (GFLOP/s) or bytes moved (GB/s), with the formula.
struct Work {
  double amount = 0.0;
  bool flops = true;
  const char* formula = "";
};

// A case keeps its backend buffers from setup() on: the backend must outlive the case.
class OpCase {
 public:
  virtual ~OpCase() = default;
  virtual std::string op() const = 0;     // the Backend member the row exercises
  virtual std::string vars() const = 0;   // shape, data and parameters, e.g. "m=37,n=53,k=71,ta=N,tb=T,data=int"
  virtual void init() = 0;                // the host inputs (deterministic)
  virtual Outputs reference() const = 0;  // plain loops on the host, with tolerances
  virtual void setup(kernels::Backend& backend) = 0;        // backend buffers holding the inputs
  virtual void run(kernels::Backend& backend) = 0;          // the op, once
  virtual Outputs outputs(kernels::Backend& backend) = 0;   // its results, downloaded
  virtual bool overwrites_inputs() const { return false; }  // run() writes an input: setup() before each run
  virtual Work work() const = 0;
  std::string name() const { return op() + " " + vars(); }
};

// The table. Constructing it is cheap: inputs are made by init().
std::vector<std::unique_ptr<OpCase>> backend_op_cases();
// A GoogleTest parameter name for row info.param of the table.
std::string case_param_name(const ::testing::TestParamInfo<size_t>& info);

// init, setup, run, outputs: one call of the row's op on the backend.
Outputs run_case(OpCase& c, kernels::Backend& backend);
// Runs row c on the backend and compares every output with the reference (GoogleTest failures on a mismatch).
void check_case(OpCase& c, kernels::Backend& backend);

// With PIPEQUANT_BENCH_OPS set, registers the test BackendOpsBench.<backend_name>, which checks and times every row
// on the backend that make_backend returns (null: skipped, no such device) and prints the table. Returns whether
// it registered; call it during static initialization.
bool register_bench(const std::string& backend_name, std::function<std::unique_ptr<kernels::Backend>()> make_backend);

}  // namespace pipequant::test
