#include "src/inspect.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "io/shard.hpp"

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

// What the listing found: ok until something is missing, incomplete or damaged, and the summary's totals.
struct Tally {
  bool ok = true;
  int64_t blocks_complete = 0;
  int64_t linears = 0;
  uint64_t packed_bytes = 0;
  double error_sum = 0.0;
  double error_max = 0.0;
};

using Shards = std::vector<std::unique_ptr<io::ShardReader>>;  // by index into shard_files; null: cannot be read

void print_index(const std::string& out_dir, const io::ModelIndex& index, std::ostream& os, Tally& tally) {
  os << out_dir << ": format " << index.format << ", " << index.shard_files.size() << " shard(s), "
     << index.block_shard.size() << " block(s), fingerprint " << index.fingerprint << "\n";
  if (!index.complete) {
    os << "model.h5: the run did not finish (complete = 0)\n";
    tally.ok = false;
  }
}

// Opens each shard once; one that cannot be opened is reported and fails its blocks, not the listing.
Shards open_shards(const std::string& out_dir, const io::ModelIndex& index, std::ostream& os, Tally& tally) {
  Shards shards(index.shard_files.size());
  for (size_t s = 0; s < shards.size(); ++s) {
    try {
      shards[s] = std::make_unique<io::ShardReader>(out_dir + "/" + index.shard_files[s]);
    } catch (const UserError& e) {
      os << e.what() << "\n";
      tally.ok = false;
    }
  }
  return shards;
}

// The width of the module column: the longest module name, at least that of the heading.
int module_width(const io::ModelIndex& index, const Shards& shards) {
  size_t width = 6;
  for (const auto& [b, s] : index.block_shard) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    try {
      if (shard)
        for (const auto& m : shard->linears(b)) width = std::max(width, m.size());
    } catch (const UserError&) {
      // reported with the block
    }
  }
  return static_cast<int>(width);
}

void print_heading(std::ostream& os, int mw) {
  os << format("%5s  %-*s  %13s  %4s  %5s  %3s  %9s  %6s  %8s  %8s  %10s  %10s  %s\n", "block", mw, "module",
               "shape [N x K]", "bits", "group", "sym", "act_order", "groups", "damp", "fallback", "rel.error",
               "rtn error", "checksum");
}

// An expert's linear: "  expert tokens 1234 (routed)", the calibration tokens routed to the expert and what its
// Hessian saw; empty for any other linear.
std::string expert_note(const io::PackedLinear& l) {
  if (l.expert_tokens < 0) return "";
  return format("  expert tokens %lld (%s)", static_cast<long long>(l.expert_tokens), l.expert_hessian.c_str());
}

void print_linear(std::ostream& os, int64_t b, int mw, const std::string& module, const io::PackedLinear& l,
                  const std::string& status) {
  const std::string shape =
      format("%lld x %lld", static_cast<long long>(l.out_features), static_cast<long long>(l.in_features));
  os << format("%5lld  %-*s  %13s  %4d  %5lld  %3s  %9s  %6lld  %8.4f  %8s  %10.3e  %10.3e  %s\n",
               static_cast<long long>(b), mw, module.c_str(), shape.c_str(), l.bits,
               static_cast<long long>(l.group_size), yes_no(l.sym), yes_no(l.act_order),
               static_cast<long long>(l.groups), l.damp, l.fallback.c_str(), l.relative_error, l.rtn_relative_error,
               (status + expert_note(l)).c_str());
}

// One row per linear of block b, each with the checksums that do not match; then the block's other mismatches.
void inspect_linears(const io::ShardReader& shard, int64_t b, int mw, std::ostream& os, Tally& tally) {
  const auto linears = shard.linears(b);
  const Findings findings = split_findings(shard.verify_block(b), linears);
  for (const auto& module : linears) {
    const io::PackedLinear l = shard.read_linear_info(b, module);
    const auto bad = findings.by_linear.find(module);
    if (bad != findings.by_linear.end()) tally.ok = false;
    print_linear(os, b, mw, module, l, bad == findings.by_linear.end() ? "ok" : "MISMATCH " + join(bad->second, ","));
    ++tally.linears;
    tally.packed_bytes += io::packed_bytes(l);
    tally.error_sum += l.relative_error;
    tally.error_max = std::max(tally.error_max, l.relative_error);
  }
  if (!findings.other.empty()) {
    os << format("%5lld  MISMATCH %s\n", static_cast<long long>(b), join(findings.other, ", ").c_str());
    tally.ok = false;
  }
}

// Block b as its shard has it: missing, not complete, its linears; an error reading it ends its rows.
void inspect_block(const io::ShardReader& shard, int64_t b, int mw, std::ostream& os, Tally& tally) {
  try {
    const auto present = shard.blocks();
    if (!std::binary_search(present.begin(), present.end(), b)) {
      os << format("%5lld  MISSING from %s\n", static_cast<long long>(b), shard.path().c_str());
      tally.ok = false;
      return;
    }
    if (shard.block_complete(b)) {
      ++tally.blocks_complete;
    } else {
      os << format("%5lld  NOT COMPLETE (the run stopped inside this block)\n", static_cast<long long>(b));
      tally.ok = false;
    }
    inspect_linears(shard, b, mw, os, tally);
  } catch (const UserError& e) {
    os << format("%5lld  ERROR %s\n", static_cast<long long>(b), e.what());
    tally.ok = false;
  }
}

void inspect_blocks(const io::ModelIndex& index, const Shards& shards, std::ostream& os, Tally& tally) {
  const int mw = module_width(index, shards);
  print_heading(os, mw);
  for (const auto& [b, s] : index.block_shard) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    if (shard) {
      inspect_block(*shard, b, mw, os, tally);
    } else {
      os << format("%5lld  shard %s cannot be read\n", static_cast<long long>(b),
                   index.shard_files[static_cast<size_t>(s)].c_str());
      tally.ok = false;
    }
  }
}

// "ok", or what is wrong with the model tensors `names` of a shard (checksums, missing ones).
std::string tensors_status(const io::ShardReader& shard, const std::vector<std::string>& names) {
  std::vector<std::string> missing;
  for (const auto& n : names)
    if (!shard.has_tensor(n)) missing.push_back(n);
  const auto bad = shard.verify_tensors();
  std::vector<std::string> problems;
  if (!bad.empty()) problems.push_back("MISMATCH " + join(bad, ", "));
  if (!missing.empty()) problems.push_back("MISSING " + join(missing, ", "));
  return problems.empty() ? "ok" : join(problems, "; ");
}

// A line per shard with model tensors (embedding, final norm, head).
void inspect_tensors(const io::ModelIndex& index, const Shards& shards, std::ostream& os, Tally& tally) {
  std::map<int64_t, std::vector<std::string>> tensors_of;
  for (const auto& [name, s] : index.tensor_shard) tensors_of[s].push_back(name);
  for (const auto& [s, names] : tensors_of) {
    const io::ShardReader* shard = shards[static_cast<size_t>(s)].get();
    if (!shard) {
      tally.ok = false;
      continue;
    }
    const std::string& file = index.shard_files[static_cast<size_t>(s)];
    try {
      const std::string status = tensors_status(*shard, names);
      if (status != "ok") tally.ok = false;
      os << "tensors in " << file << ": " << join(names, ", ") << ": " << status << "\n";
    } catch (const UserError& e) {
      os << "tensors in " << file << ": ERROR " << e.what() << "\n";
      tally.ok = false;
    }
  }
}

void print_summary(const io::ModelIndex& index, const Tally& tally, std::ostream& os) {
  const double error_mean = tally.linears > 0 ? tally.error_sum / static_cast<double>(tally.linears) : 0.0;
  os << format(
      "summary: blocks complete %lld/%lld, linears %lld, relative error mean %.3e max %.3e, packed bytes "
      "%llu (%.3f GB), %s\n",
      static_cast<long long>(tally.blocks_complete), static_cast<long long>(index.block_shard.size()),
      static_cast<long long>(tally.linears), error_mean, tally.error_max,
      static_cast<unsigned long long>(tally.packed_bytes), static_cast<double>(tally.packed_bytes) / 1e9,
      tally.ok ? "all checksums ok" : "PROBLEMS FOUND");
}

}  // namespace

int run_inspect(const std::string& out_dir, std::ostream& os) {
  const io::ModelIndex index = io::read_model_index(out_dir);
  Tally tally;
  print_index(out_dir, index, os, tally);
  const Shards shards = open_shards(out_dir, index, os, tally);
  inspect_blocks(index, shards, os, tally);
  inspect_tensors(index, shards, os, tally);
  print_summary(index, tally, os);
  return tally.ok ? 0 : 1;
}

}  // namespace pipequant
