#include "src/report.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>
#include <tuple>

#include "base/error.hpp"

namespace pipequant {

uint64_t peak_host_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<uint64_t>(usage.ru_maxrss) * 1024u;  // Linux reports KiB
}

uint64_t resident_host_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0;
  return resident * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

namespace {

// The fields of a LinearRecord (or a const one) and their JSON names: f(name, member) for each. The one list that
// to_json and linear_record_from_json both go through.
template <typename Record, typename F>
void linear_fields(Record& l, F&& f) {
  f("block", l.block);
  f("module", l.module);
  f("out_features", l.out_features);
  f("in_features", l.in_features);
  f("relative_error", l.relative_error);
  f("rtn_relative_error", l.rtn_relative_error);
  f("fallback", l.fallback);
  f("damp", l.damp);
  f("solve_s", l.solve_seconds);
  f("awq_alpha", l.awq_alpha);
  f("awq_clip", l.awq_clip);
  f("expert_tokens", l.expert_tokens);
  f("expert_hessian", l.expert_hessian);
}

// The fields of a StageMetrics but its linears, as linear_fields does for a LinearRecord.
template <typename Metrics, typename F>
void stage_fields(Metrics& m, F&& f) {
  f("stage", m.stage);
  f("ranks", m.ranks);
  f("first_block", m.first_block);
  f("blocks", m.blocks);
  f("blocks_resumed", m.blocks_resumed);
  f("load_s", m.load_seconds);
  f("forward_hessian_s", m.forward_seconds);
  f("solve_s", m.solve_seconds);
  f("pack_write_s", m.write_seconds);
  f("wait_s", m.wait_seconds);
  f("total_s", m.total_seconds);
  f("busy_from_s", m.busy_from_seconds);
  f("busy_until_s", m.busy_until_seconds);
  f("transport_bytes", m.transport_bytes);
  f("transport_s", m.transport_seconds);
  f("hdf5_bytes", m.hdf5_bytes);
  f("hdf5_rank_bytes", m.hdf5_rank_bytes);
  f("peak_host_bytes", m.peak_host_bytes);
  f("planned_host_peak_bytes", m.planned_host_peak_bytes);
  f("peak_device_bytes", m.peak_device_bytes);
  f("peak_device_forward_bytes", m.peak_device_forward_bytes);
  f("peak_device_solve_bytes", m.peak_device_solve_bytes);
}

double transport_gbps(const StageMetrics& s) {
  return s.transport_seconds > 0 ? s.transport_bytes / s.transport_seconds / 1e9 : 0.0;
}

double hdf5_gbps(const StageMetrics& s) { return s.write_seconds > 0 ? s.hdf5_bytes / s.write_seconds / 1e9 : 0.0; }

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

std::string sci(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3e", v);
  return buf;
}

// The metrics file's record of a stage: its figures with the transport and HDF5 rates; its linears have records
// of their own, and the rate stands for the transport seconds (as the file has always had it). The measured host peak
// and the plan's estimate of it also in GB, side by side.
nlohmann::json stage_record(const StageMetrics& s) {
  nlohmann::json j = to_json(s);
  j.erase("linears");
  j.erase("transport_s");
  j["record"] = "stage";
  j["transport_GBps"] = transport_gbps(s);
  j["hdf5_GBps"] = hdf5_gbps(s);
  j["host_peak_gb"] = s.peak_host_bytes / 1e9;
  j["planned_host_peak_gb"] = s.planned_host_peak_bytes / 1e9;
  return j;
}

nlohmann::json linear_record(const LinearRecord& l, int stage) {
  nlohmann::json j = to_json(l);
  j["record"] = "linear";
  j["stage"] = stage;
  return j;
}

}  // namespace

nlohmann::json to_json(const LinearRecord& l) {
  nlohmann::json j = nlohmann::json::object();
  linear_fields(l, [&](const char* key, const auto& value) { j[key] = value; });
  return j;
}

LinearRecord linear_record_from_json(const nlohmann::json& j) {
  LinearRecord l;
  linear_fields(l, [&](const char* key, auto& value) { j.at(key).get_to(value); });
  return l;
}

nlohmann::json to_json(const StageMetrics& m) {
  nlohmann::json j = nlohmann::json::object();
  stage_fields(m, [&](const char* key, const auto& value) { j[key] = value; });
  j["linears"] = nlohmann::json::array();
  for (const auto& l : m.linears) j["linears"].push_back(to_json(l));
  return j;
}

StageMetrics stage_metrics_from_json(const nlohmann::json& j) {
  StageMetrics m;
  stage_fields(m, [&](const char* key, auto& value) { j.at(key).get_to(value); });
  for (const auto& l : j.at("linears")) m.linears.push_back(linear_record_from_json(l));
  return m;
}

void print_report(std::ostream& os, const std::vector<StageMetrics>& stages, const std::string& method,
                  const std::string& propagation, const std::string& backend) {
  os << "\n== pipequant report: method " << method << ", propagation " << propagation << ", backend " << backend
     << " (seconds; GB = 1e9 bytes) ==\n";
  // one column per figure, each as wide as its widest cell
  const std::vector<std::string> head = {"stage",        "ranks",        "blocks",      "load",       "fwd+hess",
                                         "solve",        "pack+write",   "wait",        "total",      "busy from",
                                         "busy until",   "xport GB",     "xport GB/s",  "h5 GB",      "h5 GB/s",
                                         "host peak GB", "host plan GB", "dev peak GB", "dev fwd GB", "dev solve GB"};
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : stages) {
    const std::string blocks = s.blocks == 0
                                   ? std::string("-")
                                   : std::to_string(s.first_block) + "-" + std::to_string(s.first_block + s.blocks - 1);
    rows.push_back({std::to_string(s.stage),
                    std::to_string(s.ranks),
                    blocks,
                    fixed(s.load_seconds, 2),
                    fixed(s.forward_seconds, 2),
                    fixed(s.solve_seconds, 2),
                    fixed(s.write_seconds, 2),
                    fixed(s.wait_seconds, 2),
                    fixed(s.total_seconds, 2),
                    fixed(s.busy_from_seconds, 2),
                    fixed(s.busy_until_seconds, 2),
                    fixed(s.transport_bytes / 1e9, 4),
                    fixed(transport_gbps(s), 2),
                    fixed(s.hdf5_bytes / 1e9, 4),
                    fixed(hdf5_gbps(s), 3),
                    fixed(s.peak_host_bytes / 1e9, 3),
                    fixed(s.planned_host_peak_bytes / 1e9, 3),
                    fixed(s.peak_device_bytes / 1e9, 3),
                    fixed(s.peak_device_forward_bytes / 1e9, 3),
                    fixed(s.peak_device_solve_bytes / 1e9, 3)});
  }
  std::vector<size_t> width(head.size());
  for (size_t c = 0; c < head.size(); ++c) {
    width[c] = head[c].size();
    for (const auto& r : rows) width[c] = std::max(width[c], r[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    for (size_t c = 0; c < cells.size(); ++c) {
      if (c == 0)
        os << std::left << std::setw(static_cast<int>(width[c])) << cells[c] << std::right;
      else
        os << "  " << std::setw(static_cast<int>(width[c])) << cells[c];
    }
    os << "\n";
  };
  line(head);
  for (const auto& r : rows) line(r);
  // error summary over all linears, per module kind
  std::map<std::string, std::vector<const LinearRecord*>> by_module;
  size_t fallbacks = 0, count = 0;
  double sum = 0.0, worst = 0.0, sum_rtn = 0.0;
  std::string worst_name;
  for (const auto& s : stages)
    for (const auto& l : s.linears) {
      by_module[l.module].push_back(&l);
      ++count;
      sum += l.relative_error;
      sum_rtn += l.rtn_relative_error;
      if (l.fallback != "none") ++fallbacks;
      if (l.relative_error >= worst) {
        worst = l.relative_error;
        worst_name = "block " + std::to_string(l.block) + " " + l.module;
      }
    }
  if (count == 0) return;
  os << "relative output error ||WX-QX||^2/||WX||^2 per module (mean over blocks; RTN on the same inputs):\n";
  for (const auto& [module, recs] : by_module) {
    double m = 0.0, r = 0.0, alpha = 0.0, clip = 0.0;
    size_t awq = 0;
    for (const auto* l : recs) {
      m += l->relative_error;
      r += l->rtn_relative_error;
      if (l->awq_alpha < 0.0) continue;
      alpha += l->awq_alpha;
      clip += l->awq_clip;
      ++awq;
    }
    os << "  " << std::left << std::setw(18) << module << std::right << " " << sci(m / recs.size()) << "   rtn "
       << sci(r / recs.size());
    if (awq > 0)  // AWQ's choices: the scale exponent and the mean clip ratio, over the blocks that chose
      os << std::fixed << std::setprecision(3) << "   awq scale exponent " << alpha / awq << ", clip ratio "
         << clip / awq << std::defaultfloat;
    os << "\n";
  }
  os << "linears " << count << ", mean error " << sci(sum / count) << " (rtn " << sci(sum_rtn / count) << "), worst "
     << sci(worst) << " (" << worst_name << "), fallbacks " << fallbacks << "\n";
  print_expert_tokens(os, stages);
}

namespace {

// "block_sparse_moe.experts.3" of "block_sparse_moe.experts.3.w1": the expert a linear belongs to.
std::string expert_of(const std::string& module) { return module.substr(0, module.rfind('.')); }

// "3" of "block_sparse_moe.experts.3": the expert's number, its last name part.
std::string expert_number(const std::string& expert) { return expert.substr(expert.rfind('.') + 1); }

}  // namespace

void print_expert_tokens(std::ostream& os, const std::vector<StageMetrics>& stages) {
  // (block, expert) -> tokens and Hessian, in record order (block_modules order: experts by number)
  std::vector<std::tuple<int64_t, std::string, int64_t, std::string>> experts;
  for (const auto& s : stages)
    for (const auto& l : s.linears) {
      if (l.expert_tokens < 0) continue;
      const std::string expert = expert_of(l.module);
      if (!experts.empty() && std::get<0>(experts.back()) == l.block && std::get<1>(experts.back()) == expert)
        continue;
      experts.emplace_back(l.block, expert, l.expert_tokens, l.expert_hessian);
    }
  if (experts.empty()) return;
  os << "experts: calibration tokens routed to each (* its Hessians saw every token: fewer than --moe-min-tokens "
        "routed, or --moe-calibration all)\n";
  std::vector<std::string> low;
  for (size_t i = 0; i < experts.size(); ++i) {
    const auto& [block, expert, tokens, hessian] = experts[i];
    if (i == 0 || std::get<0>(experts[i - 1]) != block) os << (i == 0 ? "" : "\n") << "  block " << block << ":";
    os << " " << expert_number(expert) << ":" << tokens << (hessian == "routed" ? "" : "*");
    if (hessian == "all (low tokens)")
      low.push_back("block " + std::to_string(block) + " " + expert + " (" + std::to_string(tokens) + ")");
  }
  os << "\n";
  if (low.empty()) return;
  os << "experts with fewer than --moe-min-tokens routed tokens, given the all-token Hessian: " << low.size() << "\n";
  for (const auto& l : low) os << "  " << l << "\n";
}

void write_metrics(const std::string& path, const std::vector<StageMetrics>& stages) {
  std::ofstream f(path);
  PQ_REQUIRE(f.good(), "--metrics ", path, ": cannot open for writing");
  for (const auto& s : stages) {
    f << stage_record(s).dump() << "\n";
    for (const auto& l : s.linears) f << linear_record(l, s.stage).dump() << "\n";
  }
  PQ_REQUIRE(f.good(), "--metrics ", path, ": write failed");
}

}  // namespace pipequant
