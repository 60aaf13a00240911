#include "src/inspect.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/shard.hpp"
#include "base/error.hpp"

namespace pipequant {

namespace {

template <typename... Args>
std::string format(const char* fmt, Args... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string s(static_cast<size_t>(std::max(n, 0)) + 1, '\0');
  std::snprintf(s.data(), s.size(), fmt, args...);
  s.resize(static_cast<size_t>(std::max(n, 0)));
  return s;
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

const char* yes_no(bool b) { return b ? "yes" : "no"; }

// verify_block's findings, split into those of each linear ("<module>/<dataset>[ (why)]") and the rest.
struct Findings {
  std::map<std::string, std::vector<std::string>> by_linear;  // module -> datasets
  std::vector<std::string> other;
};

Findings split_findings(const std::vector<std::string>& bad, const std::vector<std::string>& linears) {
  Findings f;
  for (const auto& b : bad) {
    const auto slash = b.find('/');
    const std::string module = slash == std::string::npos ? std::string() : b.substr(0, slash);
    if (!module.empty() && std::find(linears.begin(), linears.end(), module) != linears.end())
      f.by_linear[module].push_back(b.substr(slash + 1));
    else
      f.other.push_back(b);
  }
  return f;
}

}  // namespace

int run_inspect(const std::string& out_dir, std::ostream& os) {
  const io::ModelIndex index = io::read_model_index(out_dir);
  bool ok = true;
  os << out_dir << ": format " << index.format << ", " << index.shard_files.size() << " shard(s), "
     << index.block_shard.size() << " block(s), fingerprint " << index.fingerprint << "\n";
  if (!index.complete) {
    os << "model.h5: the run did not finish (complete = 0)\n";
    ok = false;
  }

  // shards open once each; one that cannot be opened fails its blocks, not the listing
  std::vector<std::unique_ptr<io::ShardReader>> shards(index.shard_files.size());
  std::vector<std::string> shard_errors(index.shard_files.size());
  for (size_t s = 0; s < shards.size(); ++s) {
    try {
      shards[s] = std::make_unique<io::ShardReader>(out_dir + "/" + index.shard_files[s]);
    } catch (const UserError& e) {
      shard_errors[s] = e.what();
      os << e.what() << "\n";
      ok = false;
    }
  }

  // the module column fits the longest name
  size_t module_width = 6;
  for (const auto& [b, s] : index.block_shard) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    try {
      if (shard)
        for (const auto& m : shard->linears(b)) module_width = std::max(module_width, m.size());
    } catch (const UserError&) {
      // reported below, with the block
    }
  }
  const int mw = static_cast<int>(module_width);

  os << format("%5s  %-*s  %13s  %4s  %5s  %3s  %9s  %6s  %8s  %8s  %10s  %10s  %s\n", "block", mw, "module",
               "shape [N x K]", "bits", "group", "sym", "act_order", "groups", "damp", "fallback", "rel.error",
               "rtn error", "checksum");

  int64_t blocks_complete = 0, linear_count = 0;
  uint64_t packed = 0;
  double error_sum = 0.0, error_max = 0.0;
  for (const auto& [b, s] : index.block_shard) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    if (!shard) {
      os << format("%5lld  shard %s cannot be read\n", static_cast<long long>(b),
                   index.shard_files[static_cast<size_t>(s)].c_str());
      ok = false;
      continue;
    }
    try {
      const auto present = shard->blocks();
      if (!std::binary_search(present.begin(), present.end(), b)) {
        os << format("%5lld  MISSING from %s\n", static_cast<long long>(b), shard->path().c_str());
        ok = false;
        continue;
      }
      const bool complete = shard->block_complete(b);
      if (complete) {
        ++blocks_complete;
      } else {
        os << format("%5lld  NOT COMPLETE (the run stopped inside this block)\n", static_cast<long long>(b));
        ok = false;
      }
      const auto linears = shard->linears(b);
      const Findings findings = split_findings(shard->verify_block(b), linears);
      for (const auto& module : linears) {
        const io::PackedLinear l = shard->read_linear_info(b, module);
        const auto bad = findings.by_linear.find(module);
        const std::string status = bad == findings.by_linear.end() ? "ok" : "MISMATCH " + join(bad->second, ",");
        if (bad != findings.by_linear.end()) ok = false;
        const std::string shape =
            format("%lld x %lld", static_cast<long long>(l.out_features), static_cast<long long>(l.in_features));
        os << format("%5lld  %-*s  %13s  %4d  %5lld  %3s  %9s  %6lld  %8.4f  %8s  %10.3e  %10.3e  %s\n",
                     static_cast<long long>(b), mw, module.c_str(), shape.c_str(), l.bits,
                     static_cast<long long>(l.group_size), yes_no(l.sym), yes_no(l.act_order),
                     static_cast<long long>(l.groups), l.damp, l.fallback.c_str(), l.relative_error,
                     l.rtn_relative_error, status.c_str());
        ++linear_count;
        packed += io::packed_bytes(l);
        error_sum += l.relative_error;
        error_max = std::max(error_max, l.relative_error);
      }
      if (!findings.other.empty()) {
        os << format("%5lld  MISMATCH %s\n", static_cast<long long>(b), join(findings.other, ", ").c_str());
        ok = false;
      }
    } catch (const UserError& e) {
      os << format("%5lld  ERROR %s\n", static_cast<long long>(b), e.what());
      ok = false;
    }
  }

  // model tensors, grouped by shard
  std::map<int64_t, std::vector<std::string>> tensors_of;
  for (const auto& [name, s] : index.tensor_shard) tensors_of[s].push_back(name);
  for (const auto& [s, names] : tensors_of) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    if (!shard) {
      ok = false;
      continue;
    }
    try {
      std::vector<std::string> missing;
      for (const auto& n : names)
        if (!shard->has_tensor(n)) missing.push_back(n);
      const auto bad = shard->verify_tensors();
      std::vector<std::string> problems;
      if (!bad.empty()) problems.push_back("MISMATCH " + join(bad, ", "));
      if (!missing.empty()) problems.push_back("MISSING " + join(missing, ", "));
      if (!problems.empty()) ok = false;
      const std::string status = problems.empty() ? "ok" : join(problems, "; ");
      os << "tensors in " << index.shard_files[static_cast<size_t>(s)] << ": " << join(names, ", ") << ": " << status
         << "\n";
    } catch (const UserError& e) {
      os << "tensors in " << index.shard_files[static_cast<size_t>(s)] << ": ERROR " << e.what() << "\n";
      ok = false;
    }
  }

  const double error_mean = linear_count > 0 ? error_sum / static_cast<double>(linear_count) : 0.0;
  os << format(
      "summary: blocks complete %lld/%lld, linears %lld, relative error mean %.3e max %.3e, packed bytes "
      "%llu (%.3f GB), %s\n",
      static_cast<long long>(blocks_complete), static_cast<long long>(index.block_shard.size()),
      static_cast<long long>(linear_count), error_mean, error_max, static_cast<unsigned long long>(packed),
      static_cast<double>(packed) / 1e9, ok ? "all checksums ok" : "PROBLEMS FOUND");
  return ok ? 0 : 1;
}

}  // namespace pipequant
