// The quantize driver: P pipeline stages x D ranks per stage (DESIGN.md sections 2, 5, 7, 8).
// Each stage owns contiguous blocks; activations arrive from the previous stage in micro-batches over the
// transport; the stage group splits the calibration samples (whole Hessian chunks) and the rows of every
// solve; each stage writes its own shard; rank 0 writes model.h5 and the report. A rerun of the same
// command skips blocks whose complete marker and checksums verify.

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "comm/mpi_env.hpp"
#include "comm/stage.hpp"
#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "base/error.hpp"
#include "src/calibration.hpp"
#include "src/driver_util.hpp"
#include "src/hessian.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"
#include "src/planner.hpp"

namespace pipequant {

namespace {

std::string shard_file(int stage, int stages) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "shard-%05d-of-%05d.h5", stage, stages);
  return buf;
}

uint64_t block_source_bytes(const io::Checkpoint& ckpt, int64_t block) {
  uint64_t bytes = 0;
  const std::string prefix = block_prefix(block);
  for (const auto& name : ckpt.names())
    if (name.rfind(prefix, 0) == 0) bytes += ckpt.info(name).nbytes;
  return bytes;
}

// One progress line per block on rank 0: rank 0 prints its own stage's lines and the other stage roots send theirs,
// which rank 0 prints as they come (checked after each of its blocks, then waited for at the end of its work).
class ProgressRelay {
 public:
  ProgressRelay() { MPI_Comm_rank(MPI_COMM_WORLD, &rank_); }
  // while an error unwinds the stack, rank 0 may never receive: do not wait (the job is about to be aborted)
  ~ProgressRelay() {
    if (std::uncaught_exceptions() == 0) finish_sends();
  }
  ProgressRelay(const ProgressRelay&) = delete;
  ProgressRelay& operator=(const ProgressRelay&) = delete;

  // A block's line, from a stage root.
  void post(const std::string& line) {
    if (rank_ == 0) {
      print(line);
      poll();
      return;
    }
    pending_.push_back(line);
    requests_.emplace_back();
    MPI_Isend(pending_.back().data(), static_cast<int>(pending_.back().size()), MPI_CHAR, 0, kTag, MPI_COMM_WORLD,
              &requests_.back());
  }
  // Rank 0: prints lines until `total` (every block's) have been printed; other ranks: completes their sends.
  void drain(int64_t total) {
    while (rank_ == 0 && printed_ < total) receive_one();
    finish_sends();
  }

 private:
  static constexpr int kTag = 7201;
  void print(const std::string& line) {
    std::fputs(line.c_str(), stdout);
    std::fflush(stdout);
    ++printed_;
  }
  void poll() {
    int arrived = 1;
    while (arrived) {
      MPI_Iprobe(MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, &arrived, MPI_STATUS_IGNORE);
      if (arrived) receive_one();
    }
  }
  void receive_one() {
    MPI_Status status;
    MPI_Probe(MPI_ANY_SOURCE, kTag, MPI_COMM_WORLD, &status);
    int count = 0;
    MPI_Get_count(&status, MPI_CHAR, &count);
    std::string line(static_cast<size_t>(count), '\0');
    MPI_Recv(line.data(), count, MPI_CHAR, status.MPI_SOURCE, kTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    print(line);
  }
  void finish_sends() {
    if (!requests_.empty()) MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
    requests_.clear();
    pending_.clear();
  }

  int rank_ = 0;
  int64_t printed_ = 0;
  std::deque<std::string> pending_;  // buffers of the sends in flight (a deque keeps them in place)
  std::vector<MPI_Request> requests_;
};

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

// The arguments that change the result, as fingerprinted: the command line without the input paths (their
// contents are fingerprinted instead).
std::string result_args(const std::string& args_json) {
  nlohmann::json a = nlohmann::json::parse(args_json);
  a.erase("model");
  a.erase("calib");
  return a.dump();
}

// Which parts of two fingerprints "model-<hex>-calib-<hex>-args-<hex>" differ, and the arguments that changed.
std::string fingerprint_difference(const std::string& previous, const std::string& now,
                                   const std::string& previous_args, const std::string& now_args) {
  const auto part = [](const std::string& f, const std::string& key) {
    const size_t at = f.find(key + "-");
    if (at == std::string::npos) return std::string();
    const size_t end = f.find('-', at + key.size() + 1);
    return f.substr(at + key.size() + 1, end == std::string::npos ? std::string::npos : end - at - key.size() - 1);
  };
  std::string what;
  for (const char* key : {"model", "calib", "args"}) {
    const std::string a = part(previous, key), b = part(now, key);
    if (!a.empty() && a == b) continue;
    if (!what.empty()) what += ", ";
    if (std::string(key) == "model") what += "the model differs (config, tensors or weights)";
    if (std::string(key) == "calib") what += "the calibration tokens differ";
    if (std::string(key) == "args") {
      what += "the arguments differ";
      try {
        const auto pa = nlohmann::json::parse(result_args(previous_args));
        const auto na = nlohmann::json::parse(result_args(now_args));
        std::string keys;
        for (const auto& [k, v] : na.items())
          if (!pa.contains(k) || pa[k] != v) keys += (keys.empty() ? "" : " ") + ("--" + k);
        for (const auto& [k, v] : pa.items())
          if (!na.contains(k)) keys += (keys.empty() ? "" : " ") + ("--" + k);
        if (!keys.empty()) what += " (" + keys + ")";
      } catch (const std::exception&) {
      }
    }
  }
  if (what.empty()) what = "fingerprint " + previous + ", this run " + now;
  return what;
}

// Gathers the row slices [r0, r1) of each stage-group member into the full quantized linear on every member.
QuantizedLinear gather_rows(const QuantizedLinear& part, int64_t rows, MPI_Comm comm) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  QuantizedLinear full = part;
  full.rows = rows;
  std::vector<int> counts(static_cast<size_t>(size)), displs(static_cast<size_t>(size));
  for (int d = 0; d < size; ++d) {
    const int64_t r0 = rows * d / size, r1 = rows * (d + 1) / size;
    counts[static_cast<size_t>(d)] = static_cast<int>((r1 - r0) * part.cols);
    displs[static_cast<size_t>(d)] = static_cast<int>(r0 * part.cols);
  }
  full.q.resize(static_cast<size_t>(rows * part.cols));
  MPI_Allgatherv(part.q.data(), static_cast<int>(part.q.size()), MPI_UINT8_T, full.q.data(), counts.data(),
                 displs.data(), MPI_UINT8_T, comm);
  // scales/zeros are [groups, rows]: gather each group row
  full.scales.resize(static_cast<size_t>(part.groups * rows));
  full.zeros.resize(static_cast<size_t>(part.groups * rows));
  for (int d = 0; d < size; ++d) {
    counts[static_cast<size_t>(d)] = static_cast<int>(rows * (d + 1) / size - rows * d / size);
    displs[static_cast<size_t>(d)] = static_cast<int>(rows * d / size);
  }
  const int64_t mine = part.rows;
  for (int64_t g = 0; g < part.groups; ++g) {
    MPI_Allgatherv(part.scales.data() + g * mine, static_cast<int>(mine), MPI_FLOAT, full.scales.data() + g * rows,
                   counts.data(), displs.data(), MPI_FLOAT, comm);
    MPI_Allgatherv(part.zeros.data() + g * mine, static_cast<int>(mine), MPI_FLOAT, full.zeros.data() + g * rows,
                   counts.data(), displs.data(), MPI_FLOAT, comm);
  }
  return full;
}

// The blocks of an existing shard whose complete marker and checksums verify (read by the stage root).
std::set<int64_t> verified_blocks(const std::string& path, int64_t first, int64_t count, bool root_prints,
                                  bool& readable) {
  std::set<int64_t> good;
  readable = false;
  if (!std::filesystem::exists(path)) return good;
  try {
    io::ShardReader reader(path);
    readable = true;
    for (int64_t b = first; b < first + count; ++b) {
      if (!reader.block_complete(b)) continue;
      const auto bad = reader.verify_block(b);
      if (bad.empty()) {
        good.insert(b);
      } else if (root_prints) {
        std::string names;
        for (const auto& n : bad) names += " " + n;
        std::printf("resume: %s block %lld fails its checksums (%s ); it is redone\n", path.c_str(),
                    static_cast<long long>(b), names.c_str());
      }
    }
  } catch (const UserError& e) {
    if (root_prints) std::printf("resume: %s cannot be read (%s); the stage starts over\n", path.c_str(), e.what());
    good.clear();
    readable = false;
  }
  return good;
}

// StageMetrics to and from JSON, to gather them on rank 0.
std::string metrics_to_string(const StageMetrics& m) {
  nlohmann::json j = m.to_json();
  nlohmann::json lin = nlohmann::json::array();
  for (const auto& l : m.linears)
    lin.push_back({l.block, l.module, l.out_features, l.in_features, l.relative_error, l.rtn_relative_error, l.fallback,
                   l.damp, l.solve_seconds});
  j["linears"] = lin;
  j["transport_s"] = m.transport_seconds;
  return j.dump();
}

StageMetrics metrics_from_string(const std::string& s) {
  const auto j = nlohmann::json::parse(s);
  StageMetrics m;
  m.stage = j["stage"];
  m.ranks = j["ranks"];
  m.first_block = j["first_block"];
  m.blocks = j["blocks"];
  m.blocks_resumed = j["blocks_resumed"];
  m.load_seconds = j["load_s"];
  m.forward_seconds = j["forward_hessian_s"];
  m.solve_seconds = j["solve_s"];
  m.write_seconds = j["pack_write_s"];
  m.wait_seconds = j["wait_s"];
  m.total_seconds = j["total_s"];
  m.busy_from_seconds = j["busy_from_s"];
  m.busy_until_seconds = j["busy_until_s"];
  m.transport_bytes = j["transport_bytes"];
  m.transport_seconds = j["transport_s"];
  m.hdf5_bytes = j["hdf5_bytes"];
  m.peak_host_bytes = j["peak_host_bytes"];
  m.peak_device_bytes = j["peak_device_bytes"];
  m.peak_device_forward_bytes = j["peak_device_forward_bytes"];
  m.peak_device_solve_bytes = j["peak_device_solve_bytes"];
  for (const auto& l : j["linears"]) m.linears.push_back({l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8]});
  return m;
}

// The backend's high-water mark since the last call into one phase's slot and the stage's overall peak; the
// next phase starts counting from what is live now.
void note_peak(kernels::Backend& backend, uint64_t& phase, StageMetrics& m) {
  const uint64_t peak = backend.peak_bytes();
  phase = std::max(phase, peak);
  m.peak_device_bytes = std::max(m.peak_device_bytes, peak);
  backend.reset_peak();
}

}  // namespace

std::vector<StageMetrics> run_quantize(const QuantizeOptions& opt) {
  const auto t_start = Clock::now();
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  const bool root = world_rank == 0;
  validate(opt.quant);
  PQ_REQUIRE(opt.run.micro_batch > 0, "--micro-batch must be positive");

  // inputs, validated the same way on every rank (headers only: data is mapped when first read)
  const io::ModelConfig config = io::ModelConfig::load(opt.model_dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(opt.model_dir);
  validate_checkpoint(ckpt, config);
  const io::TokenFile calib_file = io::read_tokens(opt.calib_path);
  check_vocab(calib_file, config.vocab_size, config.path);
  const Samples calib = calibration_samples(calib_file, opt.seq_len, opt.nsamples, 128);
  const int64_t chunks = (calib.count + kHessianChunk - 1) / kHessianChunk;
  PQ_REQUIRE(chunks >= opt.ranks_per_stage, "--ranks-per-stage ", opt.ranks_per_stage, ": the ", calib.count,
             " calibration samples form ", chunks, " Hessian chunk(s) of up to ", kHessianChunk,
             " samples and each rank of a stage needs one; use at least ",
             kHessianChunk * (opt.ranks_per_stage - 1) + 1, " samples (--nsamples) or fewer ranks per stage");

  // the plan
  PlanInputs pin;
  pin.config = config;
  for (int64_t b = 0; b < config.num_layers; ++b) pin.block_bytes.push_back(block_source_bytes(ckpt, b));
  pin.embedding_bytes = ckpt.info("model.embed_tokens.weight").nbytes;
  pin.head_bytes = ckpt.info("model.norm.weight").nbytes +
                   (ckpt.has("lm_head.weight") && !config.tie_word_embeddings ? ckpt.info("lm_head.weight").nbytes : 0);
  pin.world = world_size;
  pin.ranks_per_stage = opt.ranks_per_stage;
  pin.blocks_per_stage = opt.blocks_per_stage;
  pin.samples = calib.count;
  pin.seq_len = calib.seq;
  pin.micro_batch = opt.run.micro_batch;
  pin.fp_propagation = opt.propagation == Propagation::kFp;
  pin.fp_resident_bytes = opt.fp_resident_bytes;
  const Plan plan = make_plan(pin);
  // where the results go, checked before any work (and before the plan is printed, so that an error is the only
  // thing said about it)
  if (root && !opt.dry_run) {
    prepare_out_dir(opt.out_dir);
    if (!opt.metrics_path.empty()) {
      std::ofstream f(opt.metrics_path, std::ios::app);
      PQ_REQUIRE(f.good(), "--metrics ", opt.metrics_path, ": cannot open for writing");
    }
  }
  if (root) {
    std::ostringstream os;
    print_plan(os, plan);
    std::fputs(os.str().c_str(), stdout);
    std::fflush(stdout);
  }
  if (opt.dry_run) return {};

  comm::StageLayout layout = comm::make_stage_layout(opt.ranks_per_stage);
  const StagePlan& sp = plan.stages[static_cast<size_t>(layout.stage)];
  const int stages = layout.stages;
  const bool stage_root = layout.index == 0;

  // fingerprint of model, calibration data and arguments
  // three parts, so that a refusal can say which input changed: the model (config, tensor names, dtypes and
  // shapes, and samples of the weights themselves, read by rank 0, which alone decides), the calibration
  // tokens, and the arguments that change the result (not the paths: the same files under another spelling,
  // or from another working directory, are the same run)
  Fingerprint fp_model, fp_calib, fp_args;
  fp_model.add(config.raw.dump());
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    fp_model.add(name + io::dtype_name(info.dtype));
    fp_model.add(info.shape.data(), info.shape.size() * sizeof(int64_t));
    fp_model.add(&info.nbytes, sizeof(info.nbytes));
  }
  if (root) add_weight_samples(fp_model, ckpt);
  fp_calib.add(calib.tokens.data(), calib.tokens.size() * sizeof(int32_t));
  fp_args.add(opt.fingerprint_args_json);

  io::ModelIndex index;
  index.config_json = config.raw.dump();
  index.args_json = opt.args_json;
  index.fingerprint = "model-" + fp_model.hex() + "-calib-" + fp_calib.hex() + "-args-" + fp_args.hex();
  for (int s = 0; s < stages; ++s) index.shard_files.push_back(shard_file(s, stages));
  for (const auto& st : plan.stages)
    for (int64_t b = st.first_block; b < st.first_block + st.blocks; ++b) index.block_shard[b] = st.stage;
  index.tensor_shard["model.embed_tokens.weight"] = 0;
  index.tensor_shard["model.norm.weight"] = stages - 1;
  if (!config.tie_word_embeddings && ckpt.has("lm_head.weight")) index.tensor_shard["lm_head.weight"] = stages - 1;

  // output directory and resume decision, by rank 0 for everybody
  int resume = 0;
  if (root) {
    prepare_out_dir(opt.out_dir);
    if (io::model_index_exists(opt.out_dir)) {
      std::string previous, previous_args;
      try {
        const io::ModelIndex old = io::read_model_index(opt.out_dir);
        previous = old.fingerprint;
        previous_args = old.args_json;
      } catch (const UserError&) {
        previous = "(unreadable)";
      }
      if (previous == index.fingerprint && !opt.overwrite) {
        resume = 1;
        std::printf("resume: %s/model.h5 has this run's fingerprint %s; verified blocks are skipped\n",
                    opt.out_dir.c_str(), index.fingerprint.c_str());
      } else {
        PQ_REQUIRE(opt.overwrite, "--out ", opt.out_dir, ": holds the output of a different run (",
                   fingerprint_difference(previous, index.fingerprint, previous_args, opt.args_json),
                   "); use --overwrite to replace it");
      }
    } else {
      PQ_REQUIRE(opt.overwrite || !std::filesystem::exists(opt.out_dir + "/" + index.shard_files[0]) ||
                     std::filesystem::exists(opt.out_dir + "/model.h5"),
                 "--out ", opt.out_dir, ": holds shards without a model.h5; use --overwrite to replace them");
    }
    if (!resume) {
      // a fresh start: remove what an earlier run left, then record the fingerprint (complete = 0)
      for (const auto& entry : std::filesystem::directory_iterator(opt.out_dir)) {
        const std::string n = entry.path().filename().string();
        if (n == "model.h5" || (n.rfind("shard-", 0) == 0 && entry.path().extension() == ".h5"))
          std::filesystem::remove(entry.path());
      }
      index.complete = false;
      io::write_model_index(opt.out_dir, index);
    }
    std::printf(
        "pipequant quantize: %s, %lld blocks, %s %d-bit group %lld%s%s, %lld samples x %lld tokens, "
        "propagation %s, transport mpi\n",
        opt.model_dir.c_str(), static_cast<long long>(config.num_layers), name(opt.quant.method), opt.quant.bits,
        static_cast<long long>(opt.quant.group_size), opt.quant.sym ? " sym" : "",
        opt.quant.act_order ? " act-order" : "", static_cast<long long>(calib.count), static_cast<long long>(calib.seq),
        name(opt.propagation));
    std::fflush(stdout);
  }
  MPI_Bcast(&resume, 1, MPI_INT, 0, MPI_COMM_WORLD);

  const std::string shard_path = opt.out_dir + "/" + index.shard_files[static_cast<size_t>(layout.stage)];
  // which of this stage's blocks an earlier run completed and verified
  std::vector<int64_t> done;
  int shard_readable = 0;
  if (resume && stage_root) {
    bool readable = false;
    const auto good = verified_blocks(shard_path, sp.first_block, sp.blocks, true, readable);
    done.assign(good.begin(), good.end());
    shard_readable = readable ? 1 : 0;
  }
  {
    int64_t n = static_cast<int64_t>(done.size());
    MPI_Bcast(&n, 1, MPI_INT64_T, 0, layout.stage_comm);
    done.resize(static_cast<size_t>(n));
    MPI_Bcast(done.data(), static_cast<int>(n), MPI_INT64_T, 0, layout.stage_comm);
    MPI_Bcast(&shard_readable, 1, MPI_INT, 0, layout.stage_comm);
  }
  const std::set<int64_t> skip(done.begin(), done.end());
  // dequantized weights of the skipped blocks (quantized propagation needs them)
  struct ResumedBlock {
    std::array<std::vector<float>, 7> w;  // dequantized weights [out, in]
    std::array<LinearRecord, 7> records;  // what the earlier run measured
  };
  std::map<int64_t, ResumedBlock> resumed;
  if (!skip.empty()) {
    io::ShardReader reader(shard_path);
    for (int64_t b : skip) {
      ResumedBlock r;
      for (size_t i = 0; i < 7; ++i) {
        const io::PackedLinear p = reader.read_linear(b, kLinearModules[i]);
        r.w[i] = unpack(p).dequantize();
        r.records[i] = {b,
                        kLinearModules[i],
                        p.out_features,
                        p.in_features,
                        p.relative_error,
                        p.rtn_relative_error,
                        p.fallback,
                        p.damp,
                        0.0};
      }
      resumed[b] = std::move(r);
    }
  }
  MPI_Barrier(layout.stage_comm);
  io::ShardWriter shard(shard_path, layout.stage_comm, resume && shard_readable);

  auto backend = make_backend(opt.run);
  auto source = checkpoint_source(ckpt, config);
  auto transport = comm::make_mpi_transport(layout);
  const int64_t hidden = config.hidden_size;
  const int64_t seq = calib.seq;
  const auto [s_begin, s_end] = owned_samples(calib.count, layout.index, layout.ranks_per_stage);
  const int64_t my_samples = s_end - s_begin;
  const int64_t mb = std::min(opt.run.micro_batch, my_samples);
  const int64_t micro_batches = (my_samples + mb - 1) / mb;
  // micro-batch i: samples [first, first + count) of this rank's
  const auto micro_batch = [&](int64_t i) {
    return std::pair<int64_t, int64_t>{i * mb, std::min(mb, my_samples - i * mb)};
  };
  const bool fp_mode = opt.propagation == Propagation::kFp;

  StageMetrics m;
  m.stage = layout.stage;
  m.ranks = layout.ranks_per_stage;
  m.first_block = sp.first_block;
  m.blocks = sp.blocks;

  const auto half = forward_format(opt.run, *backend, config);
  BlockRunner runner(*backend, config, seq, mb, half);
  ProgressRelay progress;
  // the common origin of the busy spans: every rank leaves this barrier at (nearly) the same moment
  MPI_Barrier(MPI_COMM_WORLD);
  const auto t_sync = Clock::now();
  std::vector<float> x(static_cast<size_t>(my_samples * seq * hidden));
  auto t0 = Clock::now();
  if (layout.first()) {
    const auto table = source->embed_tokens();
    embed(table, hidden, calib.tokens.data() + s_begin * seq, my_samples * seq, x.data());
    m.load_seconds += seconds_since(t0);
  }

  // fp propagation: every stage forwards its micro-batches through its unquantized blocks and passes them on, so
  // all stages work together. When the stage's blocks fit --fp-resident-gb they stay in host memory and each
  // micro-batch goes through all of them as soon as it arrives; otherwise they stream through one at a time
  // (and are read again for the quantization below), each over all micro-batches, and the last block's outputs
  // leave micro-batch by micro-batch. Quantized propagation: a stage waits for the previous stage's quantized
  // outputs.
  const int64_t end_block = sp.first_block + sp.blocks;
  const bool fp_resident = sp.fp_blocks == "resident";  // decided by the planner, which printed it
  // Streamed weights are read (and converted to fp32) on a helper thread while the previous block computes; the
  // first block's while this stage waits for its inputs. At most two blocks' weights are in host memory at once;
  // `load` counts only the time spent waiting for them.
  std::future<BlockWeights> next_weights;
  const auto prefetch = [&](int64_t b) {
    if (!fp_resident && b < end_block)
      next_weights = std::async(std::launch::async, [&source, b] { return source->load_block(b); });
  };
  const auto receive = [&](float* xi, int64_t n, int64_t i) {
    if (!layout.first()) transport->recv_prev(xi, n * seq * hidden, static_cast<int>(i));
    if (i == 0) m.busy_from_seconds = seconds_since(t_sync);  // fp: busy from the first micro-batch on
  };
  std::vector<float> sent;  // outputs in flight (must live until wait_sends)
  std::vector<BlockWeights> fp_blocks;
  if (fp_resident) {
    t0 = Clock::now();
    for (int64_t b = sp.first_block; b < end_block; ++b) fp_blocks.push_back(source->load_block(b));
    m.load_seconds += seconds_since(t0);
    sent.resize(x.size());
    for (int64_t i = 0; i < micro_batches; ++i) {
      const auto [s0, n] = micro_batch(i);
      float* xi = x.data() + s0 * seq * hidden;
      receive(xi, n, i);
      if (!layout.last()) {
        t0 = Clock::now();
        float* si = sent.data() + s0 * seq * hidden;
        std::copy_n(xi, n * seq * hidden, si);
        for (const auto& blk : fp_blocks) {
          runner.set_block(blk);
          const float* out = runner.forward(si, n, Until::kOutput);
          backend->download(si, out, static_cast<size_t>(n * seq * hidden) * sizeof(float));
        }
        m.forward_seconds += seconds_since(t0);
        transport->send_next(si, n * seq * hidden, static_cast<int>(i));
      }
    }
  } else if (fp_mode && layout.last()) {
    for (int64_t i = 0; i < micro_batches; ++i) {
      const auto [s0, n] = micro_batch(i);
      receive(x.data() + s0 * seq * hidden, n, i);
    }
  } else if (fp_mode) {
    sent.resize(x.size());
    prefetch(sp.first_block);
    for (int64_t b = sp.first_block; b < end_block; ++b) {
      t0 = Clock::now();
      const BlockWeights weights = next_weights.get();
      prefetch(b + 1);
      runner.set_block(weights);
      m.load_seconds += seconds_since(t0);
      for (int64_t i = 0; i < micro_batches; ++i) {
        const auto [s0, n] = micro_batch(i);
        float* si = sent.data() + s0 * seq * hidden;
        if (b == sp.first_block) {
          float* xi = x.data() + s0 * seq * hidden;
          receive(xi, n, i);
          std::copy_n(xi, n * seq * hidden, si);
        }
        t0 = Clock::now();
        const float* out = runner.forward(si, n, Until::kOutput);
        backend->download(si, out, static_cast<size_t>(n * seq * hidden) * sizeof(float));
        m.forward_seconds += seconds_since(t0);
        if (b + 1 == end_block) transport->send_next(si, n * seq * hidden, static_cast<int>(i));
      }
    }
  }
  prefetch(sp.first_block);  // the quantization's first block
  if (!fp_mode && !layout.first()) {
    for (int64_t i = 0; i < micro_batches; ++i) {
      const auto [s0, n] = micro_batch(i);
      transport->recv_prev(x.data() + s0 * seq * hidden, n * seq * hidden, static_cast<int>(i));
    }
  }

  if (!fp_mode) m.busy_from_seconds = seconds_since(t_sync);  // quantized: busy once all inputs are here
  note_peak(*backend, m.peak_device_forward_bytes, m);        // embedding, fp-mode forward
  for (int64_t b = sp.first_block; b < end_block; ++b) {
    const auto t_block = Clock::now();
    t0 = Clock::now();
    BlockWeights weights = fp_resident ? fp_blocks[static_cast<size_t>(b - sp.first_block)] : next_weights.get();
    prefetch(b + 1);
    runner.set_block(weights);
    m.load_seconds += seconds_since(t0);
    std::array<double, kLinearGroups> group_error{};
    if (skip.count(b)) {
      const ResumedBlock& r = resumed.at(b);
      for (size_t i = 0; i < 7; ++i) {
        m.linears.push_back(r.records[i]);
        auto& e = group_error[static_cast<size_t>(kLinearGroup[i])];
        e = std::max(e, r.records[i].relative_error);
        if (!fp_mode) runner.set_linear(static_cast<int>(i), r.w[i]);
      }
      ++m.blocks_resumed;
    } else {
      shard.begin_block(b);
      for (int g = 0; g < kLinearGroups; ++g) {
        t0 = Clock::now();
        const Until until = static_cast<Until>(g);
        const int64_t width = runner.width(until);
        HessianAccumulator acc(*backend, width);
        for_each_micro_batch(runner, x.data(), my_samples, hidden, until,
                             [&](int64_t s0, int64_t n, const float* acts) {
                               for (int64_t s = 0; s < n; ++s)
                                 acc.add_sample(acts + s * seq * width, seq, s_begin + s0 + s);
                             });
        const std::vector<float> h = acc.finish(layout.stage_comm, calib.count * seq);
        m.forward_seconds += seconds_since(t0);
        note_peak(*backend, m.peak_device_forward_bytes, m);
        for (int i = 0; i < 7; ++i) {
          if (kLinearGroup[static_cast<size_t>(i)] != g) continue;
          const auto& lin = weights.linears[static_cast<size_t>(i)];
          const std::string module = kLinearModules[static_cast<size_t>(i)];
          const std::string name = block_prefix(b) + module;
          t0 = Clock::now();
          // the stage group splits the rows of the solve; GPTQ rows are independent given H
          const int64_t r0 = lin.out * layout.index / layout.ranks_per_stage;
          const int64_t r1 = lin.out * (layout.index + 1) / layout.ranks_per_stage;
          const float* w_rows = lin.w.data() + r0 * lin.in;
          QuantizedLinear ql = opt.quant.method == Method::kGptq
                                   ? gptq_quantize(*backend, w_rows, r1 - r0, lin.in, h.data(), opt.quant, name)
                                   : rtn_quantize(*backend, w_rows, r1 - r0, lin.in, h.data(), opt.quant);
          QuantizedLinear rtn = opt.quant.method == Method::kGptq
                                    ? rtn_quantize(*backend, w_rows, r1 - r0, lin.in, h.data(), opt.quant)
                                    : ql;
          const double solve_s = ql.solve_seconds;
          if (layout.ranks_per_stage > 1) {
            ql = gather_rows(ql, lin.out, layout.stage_comm);
            rtn = gather_rows(rtn, lin.out, layout.stage_comm);
          }
          const std::vector<float> deq = ql.dequantize();
          if (layout.ranks_per_stage > 1) {
            ql.relative_error = relative_output_error(*backend, lin.w.data(), deq.data(), lin.out, lin.in, h.data());
            rtn.relative_error =
                relative_output_error(*backend, lin.w.data(), rtn.dequantize().data(), lin.out, lin.in, h.data());
          }
          m.solve_seconds += seconds_since(t0);
          note_peak(*backend, m.peak_device_solve_bytes, m);
          if (root)
            for (const auto& line : ql.log) std::printf("  warning: %s\n", line.c_str());
          t0 = Clock::now();
          io::PackedLinear p = pack(ql, module, opt.quant);
          p.rtn_relative_error = rtn.relative_error;
          shard.write_linear(b, p);
          m.write_seconds += seconds_since(t0);
          m.linears.push_back(
              {b, module, lin.out, lin.in, ql.relative_error, rtn.relative_error, ql.fallback, ql.damp_used, solve_s});
          group_error[static_cast<size_t>(g)] = std::max(group_error[static_cast<size_t>(g)], ql.relative_error);
          // quantized propagation: later linears of this block, and the next block, see the quantized weights
          if (!fp_mode) runner.set_linear(i, deq);
        }
      }
      t0 = Clock::now();
      const std::string prefix = block_prefix(b);
      shard.write_block_tensor(
          b, dense_from_checkpoint(ckpt, prefix + "input_layernorm.weight", "input_layernorm.weight"));
      shard.write_block_tensor(b, dense_from_checkpoint(ckpt, prefix + "post_attention_layernorm.weight",
                                                        "post_attention_layernorm.weight"));
      for (int i = 0; i < 7; ++i) {
        const std::string module = kLinearModules[static_cast<size_t>(i)];
        if (ckpt.has(prefix + module + ".bias"))
          shard.write_block_tensor(b, dense_from_checkpoint(ckpt, prefix + module + ".bias", module + ".bias"));
      }
      shard.mark_complete(b);
      m.write_seconds += seconds_since(t0);
    }
    // the block's outputs are the next block's inputs
    t0 = Clock::now();
    propagate(runner, x, my_samples, hidden);
    m.forward_seconds += seconds_since(t0);
    note_peak(*backend, m.peak_device_forward_bytes, m);
    char line[256];
    std::snprintf(
        line, sizeof(line), "block %3lld/%lld  %7.2f s  %s max rel. error  qkv %.3e  o %.3e  gate_up %.3e  down %.3e\n",
        static_cast<long long>(b + 1), static_cast<long long>(config.num_layers), seconds_since(t_block),
        skip.count(b) ? "resumed" : "       ", group_error[0], group_error[1], group_error[2], group_error[3]);
    if (stage_root) progress.post(line);
  }

  m.busy_until_seconds = seconds_since(t_sync);
  if (!fp_mode && !layout.last()) {
    for (int64_t i = 0; i < micro_batches; ++i) {
      const auto [s0, n] = micro_batch(i);
      transport->send_next(x.data() + s0 * seq * hidden, n * seq * hidden, static_cast<int>(i));
    }
  }
  t0 = Clock::now();
  transport->wait_sends();
  m.wait_seconds += seconds_since(t0) + transport->recv_wait_seconds();
  m.transport_bytes = transport->bytes_sent() + transport->bytes_received();
  m.transport_seconds = transport->recv_wait_seconds();

  // unquantized model tensors: embedding on the first stage, final norm and lm_head on the last
  t0 = Clock::now();
  if (layout.first())
    shard.write_tensor(dense_from_checkpoint(ckpt, "model.embed_tokens.weight", "model.embed_tokens.weight"));
  if (layout.last()) {
    shard.write_tensor(dense_from_checkpoint(ckpt, "model.norm.weight", "model.norm.weight"));
    if (index.tensor_shard.count("lm_head.weight"))
      shard.write_tensor(dense_from_checkpoint(ckpt, "lm_head.weight", "lm_head.weight"));
  }
  shard.close();
  m.hdf5_bytes = shard.bytes_written();
  m.write_seconds += seconds_since(t0);
  m.peak_device_bytes = std::max<uint64_t>(m.peak_device_bytes, backend->peak_bytes());
  m.peak_host_bytes = peak_host_bytes();
  m.total_seconds = seconds_since(t_start);

  progress.drain(config.num_layers);  // the other stages' block lines that rank 0 has not printed yet

  // every stage's metrics to rank 0 (from the stage roots), then model.h5 marked complete
  std::string mine = stage_root ? metrics_to_string(m) : std::string();
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(world_size));
  MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<int> displs(static_cast<size_t>(world_size), 0);
  int total = 0;
  for (int r = 0; r < world_size; ++r) {
    displs[static_cast<size_t>(r)] = total;
    total += lens[static_cast<size_t>(r)];
  }
  std::string all(static_cast<size_t>(root ? total : 0), '\0');
  MPI_Gatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  std::vector<StageMetrics> stages_metrics;
  if (root) {
    for (int r = 0; r < world_size; ++r)
      if (lens[static_cast<size_t>(r)] > 0)
        stages_metrics.push_back(metrics_from_string(all.substr(static_cast<size_t>(displs[static_cast<size_t>(r)]),
                                                                static_cast<size_t>(lens[static_cast<size_t>(r)]))));
    index.complete = true;
    io::write_model_index(opt.out_dir, index);
    std::ostringstream os;
    print_report(os, stages_metrics, name(opt.quant.method), name(opt.propagation),
                 backend->name() + ", forward GEMMs " + format_name(half));
    std::fputs(os.str().c_str(), stdout);
    std::printf("output: %s/model.h5 (complete)\n", opt.out_dir.c_str());
    std::fflush(stdout);
    if (!opt.metrics_path.empty()) write_metrics(opt.metrics_path, stages_metrics);
  }
  comm::free_stage_layout(layout);
  return stages_metrics;
}

}  // namespace pipequant
