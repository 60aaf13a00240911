#pragma once
// What a run measured (docs/design.md section 9): per stage, seconds per phase, bytes moved and written, peak
// memory, and the quantization error summary; printed as a table and written as JSON lines. Each field's JSON
// name is written once, in report.cpp, and both directions (to_json, *_from_json) go by it.

#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

namespace pipequant {

struct LinearRecord {
  int64_t block = 0;
  std::string module;
  int64_t out_features = 0;
  int64_t in_features = 0;
  double relative_error = 0.0;
  double rtn_relative_error = 0.0;
  std::string fallback = "none";
  double damp = 0.0;
  double solve_seconds = 0.0;
  double awq_alpha = -1.0;  // AWQ: the scale exponent chosen for its group (-1: no AWQ scales)
  double awq_clip = 1.0;    // AWQ: the mean clip ratio over its (row, group) pairs (1: nothing clipped)
  int64_t expert_tokens = -1;  // an expert's linear: calibration tokens routed to the expert (-1: not an expert's)
  std::string expert_hessian;  // ... and what its Hessian saw: routed, all, all (low tokens) (io::PackedLinear)

  bool operator==(const LinearRecord&) const = default;
};

struct StageMetrics {
  int stage = 0;
  int ranks = 1;
  int64_t first_block = 0;
  int64_t blocks = 0;
  int64_t blocks_resumed = 0;
  double load_seconds = 0.0;
  double forward_seconds = 0.0;  // forward + Hessian accumulation
  double solve_seconds = 0.0;
  double write_seconds = 0.0;  // pack + HDF5 write
  double wait_seconds = 0.0;   // waiting for activations
  double total_seconds = 0.0;
  // when this stage worked (from its first input to the end of its last block), seconds after the job-wide start
  // barrier: stages that overlap in time show overlapping spans
  double busy_from_seconds = 0.0;
  double busy_until_seconds = 0.0;
  uint64_t transport_bytes = 0;
  double transport_seconds = 0.0;
  uint64_t hdf5_bytes = 0;
  std::vector<uint64_t> hdf5_rank_bytes;  // what each rank of the stage group wrote of them, in member order
  uint64_t peak_host_bytes = 0;
  uint64_t planned_host_peak_bytes = 0;  // the planner's estimate of peak_host_bytes (src/planner.hpp)
  uint64_t peak_device_bytes = 0;
  // the backend's high-water marks in the forward + Hessian phase and in the solve (GPTQ/RTN, errors)
  uint64_t peak_device_forward_bytes = 0;
  uint64_t peak_device_solve_bytes = 0;
  std::vector<LinearRecord> linears;

  bool operator==(const StageMetrics&) const = default;
};

// A linear's figures, every field by name (the keys of its record in the metrics file, less "record" and "stage").
nlohmann::json to_json(const LinearRecord& l);
LinearRecord linear_record_from_json(const nlohmann::json& j);
// A stage's figures, every field by name, with its linears as an array under "linears" (how rank 0 gathers them).
nlohmann::json to_json(const StageMetrics& m);
StageMetrics stage_metrics_from_json(const nlohmann::json& j);

// Peak resident set size of this process (getrusage), bytes.
// The resident set of this process now, in bytes (/proc/self/statm).
uint64_t resident_host_bytes();
uint64_t peak_host_bytes();

void print_report(std::ostream& os, const std::vector<StageMetrics>& stages, const std::string& method,
                  const std::string& propagation, const std::string& backend);
// The experts of Mixture-of-Experts blocks: each one's routed calibration tokens, and those given the all-token
// Hessian (print_report ends with it; nothing for a dense model).
void print_expert_tokens(std::ostream& os, const std::vector<StageMetrics>& stages);
// One JSON object per line: a "stage" record per stage and a "linear" record per quantized linear.
void write_metrics(const std::string& path, const std::vector<StageMetrics>& stages);

}  // namespace pipequant
