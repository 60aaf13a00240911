#include "src/resume.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/stop.hpp"
#include "src/driver_util.hpp"
#include "src/quant.hpp"

namespace pipequant {

namespace {

void add_model_layout(Fingerprint& fp, const io::ModelConfig& config, const io::Checkpoint& ckpt) {
  fp.add(config.raw.dump());
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    fp.add(name + io::dtype_name(info.dtype));
    fp.add(info.shape.data(), info.shape.size() * sizeof(int64_t));
    fp.add(&info.nbytes, sizeof(info.nbytes));
  }
}

// A cheap digest of the weights themselves: 8 evenly spaced runs of 512 bytes of every tensor, read from the
// files (not mapped), so that a checkpoint replaced by another of the same shapes is a different model.
void add_weight_samples(Fingerprint& fp, const io::Checkpoint& ckpt) {
  constexpr uint64_t kRuns = 8, kRun = 512;
  std::map<std::string, std::ifstream> files;
  std::vector<char> buf(kRun);
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    auto [it, fresh] = files.try_emplace(info.file);
    if (fresh) it->second.open(info.file, std::ios::binary);
    std::ifstream& f = it->second;
    PQ_REQUIRE(f.good(), info.file, ": cannot be read (tensor ", name, ")");
    const uint64_t run = std::min(kRun, info.nbytes);
    for (uint64_t r = 0; r < kRuns && run > 0; ++r) {
      const uint64_t at = info.offset + (info.nbytes - run) * r / (kRuns - 1);
      f.seekg(static_cast<std::streamoff>(at));
      f.read(buf.data(), static_cast<std::streamsize>(run));
      PQ_REQUIRE(f.good(), info.file, ": tensor ", name, ": cannot read bytes at offset ", at);
      fp.add(buf.data(), run);
    }
  }
}

// The part `key` ("model", "calib" or "args") of a fingerprint string.
std::string fingerprint_part(const std::string& f, const std::string& key) {
  const size_t at = f.find(key + "-");
  if (at == std::string::npos) return std::string();
  const size_t begin = at + key.size() + 1;
  const size_t end = f.find('-', begin);
  return f.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
}

// " (--bits --group-size)": the result-changing options whose values differ between the previous run's recorded
// arguments and this run's; empty when that cannot be told.
std::string changed_options(const std::string& previous_args, const QuantizeOptions& opt) {
  try {
    const auto previous = nlohmann::json::parse(previous_args);
    const auto now = nlohmann::json::parse(opt.fingerprint_args_json);
    const auto recorded = nlohmann::json::parse(opt.args_json);
    std::string keys;
    const auto note = [&keys](const std::string& k) {
      if (!keys.empty()) keys += ' ';
      keys += "--";
      keys += k;
    };
    for (const auto& [k, v] : now.items())
      if (!previous.contains(k) || previous[k] != v) note(k);
    for (const auto& [k, v] : previous.items())
      if (!recorded.contains(k)) note(k);
    return keys.empty() ? std::string() : " (" + keys + ")";
  } catch (const std::exception&) {
    return std::string();
  }
}

// Which parts of two fingerprints differ, in words.
std::string fingerprint_difference(const std::string& previous, const std::string& now,
                                   const std::string& previous_args, const QuantizeOptions& opt) {
  std::string what;
  const auto say = [&what](const std::string& s) {
    if (!what.empty()) what += ", ";
    what += s;
  };
  const auto differs = [&](const char* key) {
    const std::string a = fingerprint_part(previous, key);
    return a.empty() || a != fingerprint_part(now, key);
  };
  if (differs("model")) say("the model differs (config, tensors or weights)");
  if (differs("calib")) say("the calibration tokens differ");
  if (differs("args")) say("the arguments differ" + changed_options(previous_args, opt));
  return what.empty() ? "fingerprint " + previous + ", this run " + now : what;
}

// Removes the shards of an earlier run, then its model.h5: a run killed in between leaves model.h5 with some of
// its shards (resumed or refused as before), never shards without a model.h5, which the same command refuses.
void clear_earlier_output(const std::string& out_dir) {
  std::vector<std::filesystem::path> shards;
  for (const auto& entry : std::filesystem::directory_iterator(out_dir)) {
    const std::string n = entry.path().filename().string();
    if (n.rfind("shard-", 0) == 0 && entry.path().extension() == ".h5") shards.push_back(entry.path());
  }
  for (const auto& p : shards) std::filesystem::remove(p);
  std::filesystem::remove(out_dir + "/model.h5");
}

// Reads the attributes load_resumed_blocks reads besides the checksummed data (every linear's, the norms' dtype):
// throws UserError where they cannot be read.
void read_block_attributes(const io::ShardReader& reader, const io::ModelConfig& config, int64_t b) {
  for (const auto& module : block_modules(config, b)) reader.read_linear_info(b, module);
  for (const char* norm : {"input_layernorm.weight", "post_attention_layernorm.weight"})
    reader.read_block_tensor_info(b, norm);
}

// A finding of verify_block that is damaged metadata (an object HDF5 cannot read), not a data checksum.
bool damaged_metadata(const std::vector<std::string>& findings) {
  const std::string kUnreadable = "(unreadable)";
  for (const auto& f : findings)
    if (f.size() >= kUnreadable.size() &&
        f.compare(f.size() - kUnreadable.size(), kUnreadable.size(), kUnreadable) == 0)
      return true;
  return false;
}

// The blocks of an existing shard whose complete marker, checksums and attributes verify (read by the group root,
// which says why a block is redone or the shard is started over). A block is redone in place only when its data
// fails a checksum; damaged metadata starts the shard over, since replacing the block would edit the damaged
// objects.
ShardState verified_blocks(const io::ModelConfig& config, const std::string& path, int64_t first, int64_t count) {
  ShardState state;
  if (!std::filesystem::exists(path)) {
    std::printf("resume: %s is missing; the stage starts over\n", path.c_str());
    return state;
  }
  try {
    io::ShardReader reader(path);
    state.readable = true;
    for (int64_t b = first; b < first + count; ++b) {
      if (!reader.block_complete(b)) continue;
      const auto bad = reader.verify_block(b);
      if (bad.empty()) {
        read_block_attributes(reader, config, b);
        state.done.insert(b);
        continue;
      }
      std::string names;
      for (const auto& n : bad) names += " " + n;
      if (damaged_metadata(bad)) {
        std::printf("resume: %s block %lld has damaged metadata (%s ); the stage starts over\n", path.c_str(),
                    static_cast<long long>(b), names.c_str());
        return ShardState{};
      }
      std::printf("resume: %s block %lld fails its checksums (%s ); it is redone\n", path.c_str(),
                  static_cast<long long>(b), names.c_str());
    }
  } catch (const UserError& e) {
    std::printf("resume: %s cannot be read (%s); the stage starts over\n", path.c_str(), e.what());
    state = ShardState{};
  }
  if (!state.readable) return state;
  // an interrupted run may have left a block or a tensor half written; one that cannot be removed cleanly
  // would make every resume fail where the run rewrites it
  try {
    io::remove_unfinished(path, state.done);
  } catch (const UserError& e) {
    std::printf("resume: %s: what an interrupted run left unfinished cannot be removed (%s); the stage starts over\n",
                path.c_str(), e.what());
    state = ShardState{};
  }
  return state;
}

}  // namespace

RunFingerprint fingerprint_run(const io::ModelConfig& config, const io::Checkpoint& ckpt, const Samples& calib,
                               const std::string& fingerprint_args_json, bool sample_weights) {
  Fingerprint model, tokens, args;
  add_model_layout(model, config, ckpt);
  if (sample_weights) add_weight_samples(model, ckpt);
  tokens.add(calib.tokens.data(), calib.tokens.size() * sizeof(int32_t));
  args.add(fingerprint_args_json);
  return {model.hex(), tokens.hex(), args.hex()};
}

bool decide_resume(const QuantizeOptions& opt, io::ModelIndex& index) {
  prepare_out_dir(opt.out_dir);
  bool resume = false;
  if (io::model_index_exists(opt.out_dir)) {
    std::string previous, previous_args;
    try {
      const io::ModelIndex old = io::read_model_index(opt.out_dir);
      previous = old.fingerprint;
      previous_args = old.args_json;
    } catch (const UserError&) {
      previous = "(unreadable)";
    }
    resume = previous == index.fingerprint && !opt.overwrite;
    PQ_REQUIRE(resume || opt.overwrite, "--out ", opt.out_dir, ": holds the output of a different run (",
               fingerprint_difference(previous, index.fingerprint, previous_args, opt),
               "); use --overwrite to replace it");
    if (resume)
      std::printf("resume: %s/model.h5 has this run's fingerprint %s; verified blocks are skipped\n",
                  opt.out_dir.c_str(), index.fingerprint.c_str());
  } else {
    PQ_REQUIRE(opt.overwrite || !std::filesystem::exists(opt.out_dir + "/" + index.shard_files[0]) ||
                   std::filesystem::exists(opt.out_dir + "/model.h5"),
               "--out ", opt.out_dir, ": holds shards without a model.h5; use --overwrite to replace them");
  }
  if (!resume) clear_earlier_output(opt.out_dir);
  // complete again only when this run finishes: a resume may redo a block that fails its checksums, and a run
  // killed meanwhile must not leave a model.h5 that calls the output whole
  index.complete = false;
  io::write_model_index(opt.out_dir, index);
  return resume;
}

ShardState agree_on_shard_state(const comm::StageGroup& group, const io::ModelConfig& config,
                                const std::string& shard_path, int64_t first_block,
                                int64_t blocks, bool resume) {
  ShardState state;
  if (resume && group.root()) state = verified_blocks(config, shard_path, first_block, blocks);
  std::vector<int64_t> done(state.done.begin(), state.done.end());
  int readable = state.readable ? 1 : 0;
  group.broadcast(done);
  group.broadcast(readable);
  state = {std::set<int64_t>(done.begin(), done.end()), readable != 0};
  // what a stop by signal says from here on: the kept blocks, then each block marked complete
  note_stage(group.layout().stage, shard_path, first_block, blocks, group.root(), state.done);
  return state;
}

std::map<int64_t, ResumedBlock> load_resumed_blocks(const io::ModelConfig& config, const std::string& shard_path,
                                                    const std::set<int64_t>& blocks) {
  std::map<int64_t, ResumedBlock> resumed;
  if (blocks.empty()) return resumed;
  io::ShardReader reader(shard_path);
  for (int64_t b : blocks) {
    ResumedBlock& r = resumed[b];
    for (const auto& module : block_modules(config, b)) {
      const io::PackedLinear p = reader.read_linear(b, module);
      r.w.push_back(unpack(p).dequantize());
      r.records.push_back({b, module, p.out_features, p.in_features, p.relative_error, p.rtn_relative_error,
                           p.fallback, p.damp, 0.0, p.awq_scale_exponent, p.awq_clip, p.expert_tokens,
                           p.expert_hessian});
    }
    const std::string where = shard_path + ": /blocks/" + std::to_string(b);
    r.norms = {dense_to_f32(reader.read_block_tensor(b, "input_layernorm.weight"), where),
               dense_to_f32(reader.read_block_tensor(b, "post_attention_layernorm.weight"), where)};
  }
  return resumed;
}

}  // namespace pipequant
