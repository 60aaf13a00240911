#include "src/report.hpp"

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>

#include "base/error.hpp"

namespace pipequant {

uint64_t peak_host_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<uint64_t>(usage.ru_maxrss) * 1024u;  // Linux reports KiB
}

nlohmann::json StageMetrics::to_json() const {
  return {{"record", "stage"},
          {"stage", stage},
          {"ranks", ranks},
          {"first_block", first_block},
          {"blocks", blocks},
          {"blocks_resumed", blocks_resumed},
          {"load_s", load_seconds},
          {"forward_hessian_s", forward_seconds},
          {"solve_s", solve_seconds},
          {"pack_write_s", write_seconds},
          {"wait_s", wait_seconds},
          {"total_s", total_seconds},
          {"busy_from_s", busy_from_seconds},
          {"busy_until_s", busy_until_seconds},
          {"transport_bytes", transport_bytes},
          {"transport_GBps", transport_seconds > 0 ? transport_bytes / transport_seconds / 1e9 : 0.0},
          {"hdf5_bytes", hdf5_bytes},
          {"hdf5_GBps", write_seconds > 0 ? hdf5_bytes / write_seconds / 1e9 : 0.0},
          {"peak_host_bytes", peak_host_bytes},
          {"peak_device_bytes", peak_device_bytes},
          {"peak_device_forward_bytes", peak_device_forward_bytes},
          {"peak_device_solve_bytes", peak_device_solve_bytes}};
}

namespace {
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
}  // namespace

void print_report(std::ostream& os, const std::vector<StageMetrics>& stages, const std::string& method,
                  const std::string& propagation, const std::string& backend) {
  os << "\n== pipequant report: method " << method << ", propagation " << propagation << ", backend " << backend
     << " (seconds; GB = 1e9 bytes) ==\n";
  // one column per figure, each as wide as its widest cell
  const std::vector<std::string> head = {"stage",        "ranks",       "blocks",     "load",        "fwd+hess",
                                         "solve",        "pack+write",  "wait",       "total",       "busy from",
                                         "busy until",   "xport GB",    "xport GB/s", "h5 GB",       "h5 GB/s",
                                         "host peak GB", "dev peak GB", "dev fwd GB", "dev solve GB"};
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : stages) {
    const std::string blocks = s.blocks == 0
                                   ? std::string("-")
                                   : std::to_string(s.first_block) + "-" + std::to_string(s.first_block + s.blocks - 1);
    rows.push_back({std::to_string(s.stage), std::to_string(s.ranks), blocks, fixed(s.load_seconds, 2),
                    fixed(s.forward_seconds, 2), fixed(s.solve_seconds, 2), fixed(s.write_seconds, 2),
                    fixed(s.wait_seconds, 2), fixed(s.total_seconds, 2), fixed(s.busy_from_seconds, 2),
                    fixed(s.busy_until_seconds, 2), fixed(s.transport_bytes / 1e9, 4),
                    fixed(s.transport_seconds > 0 ? s.transport_bytes / s.transport_seconds / 1e9 : 0.0, 2),
                    fixed(s.hdf5_bytes / 1e9, 4),
                    fixed(s.write_seconds > 0 ? s.hdf5_bytes / s.write_seconds / 1e9 : 0.0, 3),
                    fixed(s.peak_host_bytes / 1e9, 3), fixed(s.peak_device_bytes / 1e9, 3),
                    fixed(s.peak_device_forward_bytes / 1e9, 3), fixed(s.peak_device_solve_bytes / 1e9, 3)});
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
    double m = 0.0, r = 0.0;
    for (const auto* l : recs) {
      m += l->relative_error;
      r += l->rtn_relative_error;
    }
    os << "  " << std::left << std::setw(18) << module << std::right << " " << sci(m / recs.size()) << "   rtn "
       << sci(r / recs.size()) << "\n";
  }
  os << "linears " << count << ", mean error " << sci(sum / count) << " (rtn " << sci(sum_rtn / count) << "), worst "
     << sci(worst) << " (" << worst_name << "), fallbacks " << fallbacks << "\n";
}

void write_metrics(const std::string& path, const std::vector<StageMetrics>& stages) {
  std::ofstream f(path);
  PQ_REQUIRE(f.good(), "--metrics ", path, ": cannot open for writing");
  for (const auto& s : stages) {
    f << s.to_json().dump() << "\n";
    for (const auto& l : s.linears) {
      nlohmann::json j = {{"record", "linear"},
                          {"stage", s.stage},
                          {"block", l.block},
                          {"module", l.module},
                          {"out_features", l.out_features},
                          {"in_features", l.in_features},
                          {"relative_error", l.relative_error},
                          {"rtn_relative_error", l.rtn_relative_error},
                          {"fallback", l.fallback},
                          {"damp", l.damp},
                          {"solve_s", l.solve_seconds}};
      f << j.dump() << "\n";
    }
  }
  PQ_REQUIRE(f.good(), "--metrics ", path, ": write failed");
}

}  // namespace pipequant
