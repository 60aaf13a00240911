#include "src/pipeline.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "comm/mpi_env.hpp"
#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "kernels/error.hpp"
#include "src/calibration.hpp"
#include "src/hessian.hpp"
#include "src/model.hpp"

namespace pipequant {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::unique_ptr<kernels::Backend> make_backend(const RunOptions& run) {
  if (run.backend == "cpu" || run.backend == "auto") return kernels::make_cpu_backend(run.threads);
  PQ_REQUIRE(run.backend != "cuda", "--backend cuda: this build has no usable CUDA backend; use --backend cpu");
  fail("--backend: expected auto, cpu or cuda, got '", run.backend, "'");
}

const char* method_name(Method m) { return m == Method::kGptq ? "gptq" : "rtn"; }

// FNV-1a 64-bit over a sequence of byte ranges: the run's fingerprint.
class Fingerprint {
 public:
  void add(const void* data, size_t bytes) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; ++i) {
      h_ ^= p[i];
      h_ *= 1099511628211ull;
    }
  }
  void add(const std::string& s) { add(s.data(), s.size()); }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h_));
    return buf;
  }

 private:
  uint64_t h_ = 1469598103934665603ull;
};

// Checks that the output directory can be created and written, before any work is done.
void prepare_out_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  PQ_REQUIRE(!ec && std::filesystem::is_directory(dir), "--out ", dir, ": cannot create the output directory (",
             ec ? ec.message() : "not a directory", ")");
  const std::string probe = dir + "/.pipequant-write-test";
  {
    std::ofstream f(probe);
    PQ_REQUIRE(f.good(), "--out ", dir, ": the output directory is not writable");
  }
  std::filesystem::remove(probe, ec);
}

io::DenseTensor dense_from_checkpoint(const io::Checkpoint& ckpt, const std::string& name, const std::string& as) {
  const auto& info = ckpt.info(name);
  const auto raw = ckpt.raw(name);
  io::DenseTensor t;
  t.name = as;
  t.dtype = io::dtype_name(info.dtype);
  t.shape = info.shape;
  t.bytes.assign(reinterpret_cast<const char*>(raw.data()), reinterpret_cast<const char*>(raw.data()) + raw.size());
  return t;
}

// Runs `samples` through the runner in micro-batches until `until`, calling sink(sample0, count, acts) on each.
template <typename Sink>
void for_each_micro_batch(BlockRunner& runner, const std::vector<float>& x, int64_t samples, int64_t hidden,
                          Until until, Sink&& sink) {
  const int64_t seq = runner.seq();
  for (int64_t s0 = 0; s0 < samples; s0 += runner.micro_batch()) {
    const int64_t n = std::min(runner.micro_batch(), samples - s0);
    const float* acts = runner.forward(x.data() + s0 * seq * hidden, n, until);
    sink(s0, n, acts);
  }
}

}  // namespace

std::vector<StageMetrics> run_quantize(const QuantizeOptions& opt) {
  const auto t_start = Clock::now();
  const bool root = comm::world_rank() == 0;
  validate(opt.quant);
  PQ_REQUIRE(opt.propagation == "quantized" || opt.propagation == "fp",
             "--propagation: expected quantized or fp, got '", opt.propagation, "'");
  PQ_REQUIRE(opt.run.micro_batch > 0, "--micro-batch must be positive");
  const io::ModelConfig config = io::ModelConfig::load(opt.model_dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(opt.model_dir);
  validate_checkpoint(ckpt, config);
  const io::TokenFile calib_file = io::read_tokens(opt.calib_path);
  check_vocab(calib_file, config.vocab_size, config.path);
  const Samples calib = calibration_samples(calib_file, opt.seq_len, opt.nsamples, 128);
  prepare_out_dir(opt.out_dir);
  auto backend = make_backend(opt.run);
  auto source = checkpoint_source(ckpt, config);

  // fingerprint of model, calibration data and arguments
  Fingerprint fp;
  fp.add(config.raw.dump());
  for (const auto& name : ckpt.names()) {
    const auto& info = ckpt.info(name);
    fp.add(name + io::dtype_name(info.dtype));
    fp.add(info.shape.data(), info.shape.size() * sizeof(int64_t));
    fp.add(&info.nbytes, sizeof(info.nbytes));
  }
  fp.add(calib.tokens.data(), calib.tokens.size() * sizeof(int32_t));
  fp.add(opt.args_json);

  const int64_t hidden = config.hidden_size;
  const int64_t nblocks = config.num_layers;
  const std::string shard_name = "shard-00000-of-00001.h5";
  io::ModelIndex index;
  index.config_json = config.raw.dump();
  index.args_json = opt.args_json;
  index.fingerprint = fp.hex();
  index.shard_files = {shard_name};
  for (int64_t b = 0; b < nblocks; ++b) index.block_shard[b] = 0;
  index.complete = false;
  if (root) std::filesystem::remove(opt.out_dir + "/model.h5");
  io::ShardWriter shard(opt.out_dir + "/" + shard_name, MPI_COMM_WORLD, false);

  StageMetrics m;
  m.stage = 0;
  m.ranks = comm::world_size();
  m.first_block = 0;
  m.blocks = nblocks;

  if (root)
    std::printf("pipequant quantize: %s, %lld blocks, %s %d-bit group %lld%s%s, %lld samples x %lld tokens, "
                "propagation %s, backend %s\n",
                opt.model_dir.c_str(), static_cast<long long>(nblocks), method_name(opt.quant.method), opt.quant.bits,
                static_cast<long long>(opt.quant.group_size), opt.quant.sym ? " sym" : "",
                opt.quant.act_order ? " act-order" : "", static_cast<long long>(calib.count),
                static_cast<long long>(calib.seq), opt.propagation.c_str(), backend->name().c_str());

  // stage input: embeddings of the calibration samples (host memory, [samples * seq, hidden])
  auto t0 = Clock::now();
  std::vector<float> x(static_cast<size_t>(calib.count * calib.seq * hidden));
  {
    const auto table = source->embed_tokens();
    embed(table, hidden, calib.tokens.data(), calib.count * calib.seq, x.data());
  }
  m.load_seconds += seconds_since(t0);
  BlockRunner runner(*backend, config, calib.seq, std::min(opt.run.micro_batch, calib.count));

  for (int64_t b = 0; b < nblocks; ++b) {
    const auto t_block = Clock::now();
    t0 = Clock::now();
    BlockWeights weights = source->load_block(b);
    runner.set_block(weights);
    m.load_seconds += seconds_since(t0);
    shard.begin_block(b);
    std::vector<io::PackedLinear> packed;
    std::array<double, kLinearGroups> group_error{};
    for (int g = 0; g < kLinearGroups; ++g) {
      // Hessian of the group's input: H = 2/n sum x x^T, accumulated one sample at a time in sample order
      t0 = Clock::now();
      const Until until = static_cast<Until>(g);
      const int64_t width = runner.width(until);
      HessianAccumulator acc(*backend, width);
      for_each_micro_batch(runner, x, calib.count, hidden, until, [&](int64_t s0, int64_t n, const float* acts) {
        for (int64_t s = 0; s < n; ++s) acc.add_sample(acts + s * calib.seq * width, calib.seq, s0 + s);
      });
      const std::vector<float> h = acc.finish(MPI_COMM_NULL, calib.count * calib.seq);
      m.forward_seconds += seconds_since(t0);

      for (int i = 0; i < 7; ++i) {
        if (kLinearGroup[static_cast<size_t>(i)] != g) continue;
        auto& lin = weights.linears[static_cast<size_t>(i)];
        const std::string module = kLinearModules[static_cast<size_t>(i)];
        const std::string name = block_prefix(b) + module;
        t0 = Clock::now();
        QuantizedLinear ql;
        double rtn_error = 0.0;
        if (opt.quant.method == Method::kGptq) {
          ql = gptq_quantize(*backend, lin.w.data(), lin.out, lin.in, h.data(), opt.quant, name);
          rtn_error = rtn_quantize(*backend, lin.w.data(), lin.out, lin.in, h.data(), opt.quant).relative_error;
        } else {
          ql = rtn_quantize(*backend, lin.w.data(), lin.out, lin.in, h.data(), opt.quant);
          rtn_error = ql.relative_error;
        }
        m.solve_seconds += seconds_since(t0);
        if (root)
          for (const auto& line : ql.log) std::printf("  warning: %s\n", line.c_str());
        t0 = Clock::now();
        io::PackedLinear p = pack(ql, module, opt.quant);
        p.rtn_relative_error = rtn_error;
        shard.write_linear(b, p);
        m.write_seconds += seconds_since(t0);
        m.linears.push_back({b, module, lin.out, lin.in, ql.relative_error, rtn_error, ql.fallback, ql.damp_used,
                             ql.solve_seconds});
        group_error[static_cast<size_t>(g)] = std::max(group_error[static_cast<size_t>(g)], ql.relative_error);
        // quantized propagation: later linears of this block, and the next block, see the quantized weights
        if (opt.propagation == "quantized") runner.set_linear(i, ql.dequantize());
      }
    }
    t0 = Clock::now();
    const std::string p = block_prefix(b);
    shard.write_block_tensor(b, dense_from_checkpoint(ckpt, p + "input_layernorm.weight", "input_layernorm.weight"));
    shard.write_block_tensor(
        b, dense_from_checkpoint(ckpt, p + "post_attention_layernorm.weight", "post_attention_layernorm.weight"));
    for (int i = 0; i < 7; ++i) {
      const std::string bias = p + kLinearModules[static_cast<size_t>(i)] + ".bias";
      if (ckpt.has(bias))
        shard.write_block_tensor(b, dense_from_checkpoint(ckpt, bias, std::string(kLinearModules[static_cast<size_t>(i)]) + ".bias"));
    }
    shard.mark_complete(b);
    m.write_seconds += seconds_since(t0);

    // the block's outputs are the next block's inputs
    t0 = Clock::now();
    std::vector<float> next(x.size());
    for_each_micro_batch(runner, x, calib.count, hidden, Until::kOutput, [&](int64_t s0, int64_t n, const float* acts) {
      backend->download(next.data() + s0 * calib.seq * hidden, acts, static_cast<size_t>(n * calib.seq * hidden) * 4);
    });
    x.swap(next);
    m.forward_seconds += seconds_since(t0);
    if (root)
      std::printf("block %3lld/%lld  %7.2f s  max rel. error  qkv %.3e  o %.3e  gate_up %.3e  down %.3e\n",
                  static_cast<long long>(b + 1), static_cast<long long>(nblocks), seconds_since(t_block),
                  group_error[0], group_error[1], group_error[2], group_error[3]);
    std::fflush(stdout);
  }

  // unquantized model tensors: embedding (first stage), final norm and lm_head (last stage)
  const auto t_tensors = Clock::now();
  shard.write_tensor(dense_from_checkpoint(ckpt, "model.embed_tokens.weight", "model.embed_tokens.weight"));
  shard.write_tensor(dense_from_checkpoint(ckpt, "model.norm.weight", "model.norm.weight"));
  index.tensor_shard["model.embed_tokens.weight"] = 0;
  index.tensor_shard["model.norm.weight"] = 0;
  if (!config.tie_word_embeddings && ckpt.has("lm_head.weight")) {
    shard.write_tensor(dense_from_checkpoint(ckpt, "lm_head.weight", "lm_head.weight"));
    index.tensor_shard["lm_head.weight"] = 0;
  }
  m.hdf5_bytes = shard.bytes_written();
  shard.close();
  index.complete = true;
  if (root) io::write_model_index(opt.out_dir, index);
  m.write_seconds += seconds_since(t_tensors);
  m.peak_device_bytes = backend->peak_bytes();
  m.peak_host_bytes = peak_host_bytes();
  m.total_seconds = seconds_since(t_start);
  std::vector<StageMetrics> stages = {m};
  if (root) {
    std::ostringstream os;
    print_report(os, stages, method_name(opt.quant.method), opt.propagation, backend->name());
    std::fputs(os.str().c_str(), stdout);
    std::printf("output: %s/model.h5 (complete)\n", opt.out_dir.c_str());
    if (!opt.metrics_path.empty()) write_metrics(opt.metrics_path, stages);
  }
  return stages;
}

EvalResult run_eval(const EvalOptions& opt) {
  const auto t_start = Clock::now();
  const bool root = comm::world_rank() == 0;
  const io::ModelConfig config = io::ModelConfig::load(opt.model_dir);
  std::unique_ptr<io::Checkpoint> ckpt;
  std::unique_ptr<WeightSource> source;
  if (opt.quantized_dir.empty()) {
    ckpt = std::make_unique<io::Checkpoint>(io::Checkpoint::open(opt.model_dir));
    validate_checkpoint(*ckpt, config);
    source = checkpoint_source(*ckpt, config);
  } else {
    source = quantized_source(opt.quantized_dir, config);
  }
  const io::TokenFile file = io::read_tokens(opt.tokens_path);
  check_vocab(file, config.vocab_size, config.path);
  const Samples windows = eval_windows(file, opt.seq_len, opt.max_windows);
  auto backend = make_backend(opt.run);
  const int64_t hidden = config.hidden_size;
  const int64_t seq = windows.seq;
  // windows are evaluated in chunks so that activations stay bounded for long token files
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(windows.count, std::max<int64_t>(1, (1ll << 26) / (seq * hidden))));
  BlockRunner runner(*backend, config, seq, std::min(opt.run.micro_batch, chunk));
  Head head(*backend, config, *source, seq);
  const auto table = source->embed_tokens();
  EvalResult r;
  r.windows = windows.count;
  for (int64_t w0 = 0; w0 < windows.count; w0 += chunk) {
    const int64_t n = std::min(chunk, windows.count - w0);
    std::vector<float> x(static_cast<size_t>(n * seq * hidden));
    embed(table, hidden, windows.tokens.data() + w0 * seq, n * seq, x.data());
    for (int64_t b = 0; b < config.num_layers; ++b) {
      runner.set_block(source->load_block(b));
      std::vector<float> next(x.size());
      for_each_micro_batch(runner, x, n, hidden, Until::kOutput, [&](int64_t s0, int64_t cnt, const float* acts) {
        backend->download(next.data() + s0 * seq * hidden, acts, static_cast<size_t>(cnt * seq * hidden) * 4);
      });
      x.swap(next);
    }
    // loss over positions 0..seq-2 predicting tokens 1..seq-1 of each window
    for (int64_t w = 0; w < n; ++w) {
      const int32_t* tok = windows.tokens.data() + (w0 + w) * seq;
      r.nll_sum += head.nll(x.data() + w * seq * hidden, tok + 1, seq - 1);
      r.predicted += seq - 1;
    }
  }
  r.perplexity = std::exp(r.nll_sum / static_cast<double>(r.predicted));
  r.seconds = seconds_since(t_start);
  if (root) {
    std::printf("eval: %s on %s, %lld windows of %lld tokens, %lld predictions, %.2f s\n", source->describe().c_str(),
                opt.tokens_path.c_str(), static_cast<long long>(r.windows), static_cast<long long>(seq),
                static_cast<long long>(r.predicted), r.seconds);
    std::printf("perplexity: %.6f\n", r.perplexity);
  }
  return r;
}

std::vector<float> sequence_logits(const std::string& model_dir, const std::vector<int32_t>& tokens,
                                   const RunOptions& run) {
  const io::ModelConfig config = io::ModelConfig::load(model_dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(model_dir);
  validate_checkpoint(ckpt, config);
  auto source = checkpoint_source(ckpt, config);
  auto backend = make_backend(run);
  const int64_t seq = static_cast<int64_t>(tokens.size());
  const int64_t hidden = config.hidden_size;
  std::vector<float> x(static_cast<size_t>(seq * hidden));
  embed(source->embed_tokens(), hidden, tokens.data(), seq, x.data());
  BlockRunner runner(*backend, config, seq, 1);
  for (int64_t b = 0; b < config.num_layers; ++b) {
    runner.set_block(source->load_block(b));
    backend->download(x.data(), runner.forward(x.data(), 1, Until::kOutput), x.size() * 4);
  }
  Head head(*backend, config, *source, seq);
  std::vector<float> logits(static_cast<size_t>(seq * config.vocab_size));
  head.logits(x.data(), seq, logits.data());
  return logits;
}

}  // namespace pipequant
