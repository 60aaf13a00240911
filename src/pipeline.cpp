#include "src/pipeline.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "comm/world.hpp"
#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "src/calibration.hpp"
#include "src/driver_util.hpp"
#include "src/hf_source.hpp"
#include "src/model.hpp"

namespace pipequant {

EvalResult run_eval(const EvalOptions& opt) {
  const auto t_start = Clock::now();
  const bool root = world_rank() == 0;
  const io::ModelConfig config = io::ModelConfig::load(opt.model_dir);
  config.check_seq_len(opt.seq_len);
  std::unique_ptr<io::Checkpoint> ckpt;
  std::unique_ptr<WeightSource> source;
  if (opt.quantized_dir.empty()) {
    ckpt = std::make_unique<io::Checkpoint>(io::Checkpoint::open(opt.model_dir));
    source = model_source(*ckpt, opt.model_dir, config);  // unquantized, or GPTQ/AWQ per its quantization config
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
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>(windows.count, std::max<int64_t>(1, (1ll << 26) / (seq * hidden))));
  const auto half = forward_format(opt.run, *backend, config);
  BlockRunner runner(*backend, config, seq, std::min(opt.run.micro_batch, chunk), half);
  Head head(*backend, config, *source, seq);
  const auto table = source->embed_tokens();
  EvalResult r;
  r.windows = windows.count;
  // ranks split the windows; their loss sums are added up
  const int rank = world_rank(), size = world_size();
  const int64_t my_begin = windows.count * rank / size, my_end = windows.count * (rank + 1) / size;
  double nll = 0.0;
  int64_t predicted = 0;
  for (int64_t w0 = my_begin; w0 < my_end; w0 += chunk) {
    const int64_t n = std::min(chunk, my_end - w0);
    std::vector<float> x(static_cast<size_t>(n * seq * hidden));
    embed(table, hidden, windows.tokens.data() + w0 * seq, n * seq, x.data());
    for (int64_t b = 0; b < config.num_layers; ++b) {
      runner.set_block(source->load_block(b));
      propagate(runner, x, n, hidden);
      require_finite_activations(x, b, w0, seq, hidden, "eval window");
    }
    // loss over positions 0..seq-2 predicting tokens 1..seq-1 of each window
    for (int64_t w = 0; w < n; ++w) {
      const int32_t* tok = windows.tokens.data() + (w0 + w) * seq;
      nll += head.nll(x.data() + w * seq * hidden, tok + 1, seq - 1);
      predicted += seq - 1;
    }
  }
  r.nll_sum = comm::world_sum(nll);
  r.predicted = comm::world_sum(predicted);
  r.perplexity = std::exp(r.nll_sum / static_cast<double>(r.predicted));
  PQ_REQUIRE(std::isfinite(r.nll_sum), "eval: the loss is ", r.nll_sum, " although every block's output is finite: ",
             "the head's logits overflow float32 (model.norm / lm_head; every checkpoint value is finite)");
  r.seconds = seconds_since(t_start);
  if (root) {
    std::printf("eval: %s on %s, %lld windows of %lld tokens, %lld predictions, backend %s, forward GEMMs %s, %.2f s\n",
                source->describe().c_str(), opt.tokens_path.c_str(), static_cast<long long>(r.windows),
                static_cast<long long>(seq), static_cast<long long>(r.predicted), backend->name().c_str(),
                format_name(half).c_str(), r.seconds);
    std::printf("perplexity: %.6f\n", r.perplexity);
  }
  return r;
}

std::vector<float> sequence_logits(const std::string& model_dir, const std::vector<int32_t>& tokens,
                                   const RunOptions& run) {
  const io::ModelConfig config = io::ModelConfig::load(model_dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(model_dir);
  auto source = model_source(ckpt, model_dir, config);
  auto backend = make_backend(run);
  const int64_t seq = static_cast<int64_t>(tokens.size());
  const int64_t hidden = config.hidden_size;
  std::vector<float> x(static_cast<size_t>(seq * hidden));
  embed(source->embed_tokens(), hidden, tokens.data(), seq, x.data());
  BlockRunner runner(*backend, config, seq, 1, forward_format(run, *backend, config));
  for (int64_t b = 0; b < config.num_layers; ++b) {
    runner.set_block(source->load_block(b));
    propagate(runner, x, 1, hidden);
  }
  Head head(*backend, config, *source, seq);
  std::vector<float> logits(static_cast<size_t>(seq * config.vocab_size));
  head.logits(x.data(), seq, logits.data());
  return logits;
}

}  // namespace pipequant
