// The metrics of a run as JSON: every field of a StageMetrics and of a LinearRecord goes to JSON by name and
// comes back equal (as rank 0 gathers them), and the metrics file keeps its records and keys.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "src/report.hpp"

namespace pipequant {
namespace {

// Every field away from its default, and no two alike, so that a field lost or swapped shows.
LinearRecord sample_linear(int64_t block) {
  LinearRecord l;
  l.block = block;
  l.module = "mlp.down_proj";
  l.out_features = 4096;
  l.in_features = 11008;
  l.relative_error = 1.0 / 3.0;
  l.rtn_relative_error = 0.7071067811865476;
  l.fallback = "rtn";
  l.damp = 0.1;
  l.solve_seconds = 12.5e-3;
  l.awq_alpha = 0.35;
  l.awq_clip = 0.925;
  l.expert_tokens = 1234;
  l.expert_hessian = "all (low tokens)";
  return l;
}

StageMetrics sample_stage() {
  StageMetrics m;
  m.stage = 2;
  m.ranks = 3;
  m.first_block = 40;
  m.blocks = 20;
  m.blocks_resumed = 7;
  m.load_seconds = 1.25;
  m.forward_seconds = 2.5;
  m.solve_seconds = 3.75;
  m.write_seconds = 0.5;
  m.wait_seconds = 0.125;
  m.total_seconds = 8.0;
  m.busy_from_seconds = 0.0625;
  m.busy_until_seconds = 7.9;
  m.transport_bytes = uint64_t{5} << 33;  // past 32 bits
  m.transport_seconds = 4.0;
  m.hdf5_bytes = 123456789012;
  m.hdf5_rank_bytes = {41152263004, 41152263004, 41152263004};
  m.peak_host_bytes = 987654321098;
  m.planned_host_peak_bytes = 876543210987;
  m.peak_device_bytes = 80000000001;
  m.peak_device_forward_bytes = 70000000002;
  m.peak_device_solve_bytes = 60000000003;
  m.linears = {sample_linear(40), sample_linear(41)};
  m.linears[1].module = "self_attn.q_proj";
  return m;
}

TEST(Report, SamplesSetEveryField) {
  const nlohmann::json sample = to_json(sample_stage()), fresh = to_json(StageMetrics{});
  for (const auto& [key, value] : fresh.items()) {
    if (key == "linears") continue;
    EXPECT_NE(sample.at(key), value) << key;
  }
  const nlohmann::json linear = to_json(sample_linear(1)), fresh_linear = to_json(LinearRecord{});
  for (const auto& [key, value] : fresh_linear.items()) EXPECT_NE(linear.at(key), value) << key;
}

TEST(Report, LinearRecordRoundTrip) {
  const LinearRecord l = sample_linear(3);
  EXPECT_EQ(linear_record_from_json(to_json(l)), l);
}

TEST(Report, StageMetricsRoundTripThroughText) {
  // as rank 0 gathers them: dumped to text on each stage root, parsed back
  const StageMetrics m = sample_stage();
  const StageMetrics back = stage_metrics_from_json(nlohmann::json::parse(to_json(m).dump()));
  EXPECT_EQ(back, m);
  EXPECT_EQ(back.linears.size(), 2u);
}

std::set<std::string> keys(const nlohmann::json& j) {
  std::set<std::string> k;
  for (const auto& [key, value] : j.items()) k.insert(key);
  return k;
}

// The keys of the metrics file's records, as scripts/quality_table.py and the e2e tests read them.
const std::set<std::string> kStageRecordKeys = {"record",
                                                "stage",
                                                "ranks",
                                                "first_block",
                                                "blocks",
                                                "blocks_resumed",
                                                "load_s",
                                                "forward_hessian_s",
                                                "solve_s",
                                                "pack_write_s",
                                                "wait_s",
                                                "total_s",
                                                "busy_from_s",
                                                "busy_until_s",
                                                "transport_bytes",
                                                "transport_GBps",
                                                "hdf5_bytes",
                                                "hdf5_rank_bytes",
                                                "hdf5_GBps",
                                                "peak_host_bytes",
                                                "planned_host_peak_bytes",
                                                "host_peak_gb",
                                                "planned_host_peak_gb",
                                                "peak_device_bytes",
                                                "peak_device_forward_bytes",
                                                "peak_device_solve_bytes"};
const std::set<std::string> kLinearRecordKeys = {"record",       "stage",       "block",          "module",
                                                 "out_features", "in_features", "relative_error", "rtn_relative_error",
                                                 "fallback",     "damp",        "solve_s",        "awq_alpha",
                                                 "awq_clip",     "expert_tokens", "expert_hessian"};

TEST(Report, MetricsFileKeepsItsRecordsAndKeys) {
  const std::string path = testing::TempDir() + "pipequant-test-report.jsonl";
  const StageMetrics m = sample_stage();
  write_metrics(path, {m});
  std::ifstream f(path);
  std::vector<nlohmann::json> records;
  for (std::string line; std::getline(f, line);) records.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(keys(records[0]), kStageRecordKeys);
  EXPECT_EQ(records[0]["record"], "stage");
  EXPECT_EQ(records[0]["transport_GBps"], m.transport_bytes / m.transport_seconds / 1e9);
  EXPECT_EQ(records[0]["hdf5_GBps"], m.hdf5_bytes / m.write_seconds / 1e9);
  EXPECT_EQ(records[0]["transport_bytes"], m.transport_bytes);
  // the plan beside the measured peak, in GB (1e9 bytes)
  EXPECT_EQ(records[0]["host_peak_gb"], m.peak_host_bytes / 1e9);
  EXPECT_EQ(records[0]["planned_host_peak_gb"], m.planned_host_peak_bytes / 1e9);
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_EQ(keys(records[i]), kLinearRecordKeys);
    EXPECT_EQ(records[i]["record"], "linear");
    EXPECT_EQ(records[i]["stage"], m.stage);
    EXPECT_EQ(records[i]["module"], m.linears[i - 1].module);
    EXPECT_EQ(records[i]["solve_s"], m.linears[i - 1].solve_seconds);
  }
  std::remove(path.c_str());
}

}  // namespace
}  // namespace pipequant
