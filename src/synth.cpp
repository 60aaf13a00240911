// Synthetic Llama checkpoints and token files (pipequant synth, synth-tokens).
#include "src/synth.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "src/model.hpp"

namespace pipequant {

namespace fs = std::filesystem;

namespace {

// splitmix64: turns (seed, tensor index) into well-spread engine seeds, so each tensor has its own stream
// and its values do not depend on which tensors come before it.
uint64_t mix_seed(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Normal and uniform variates computed from the engine's raw 64-bit output: std::normal_distribution is
// implementation-defined, and the synthetic checkpoint must be the same bytes with every standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  // in [0, 1)
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double normal() {  // Box-Muller, both values used
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform();  // (0, 1]: log stays finite
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    have_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }
  // in [0, n); the modulo bias is below 2^-40 for any vocabulary size
  uint64_t below(uint64_t n) { return engine_() % n; }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0.0;
  bool have_spare_ = false;
};

// How one tensor's values are drawn: value = mean + std * N(0, 1).
struct SynthTensor {
  io::TensorSpec spec;
  double mean = 0.0;
  double std = 0.0;
};

struct DTypeChoice {
  io::DType dtype;
  const char* torch_dtype;
};

DTypeChoice parse_synth_dtype(const std::string& s) {
  if (s == "bf16" || s == "bfloat16") return {io::DType::kBF16, "bfloat16"};
  if (s == "fp16" || s == "float16") return {io::DType::kF16, "float16"};
  if (s == "fp32" || s == "float32") return {io::DType::kF32, "float32"};
  fail("synth: --dtype '", s, "' is not supported; expected bf16, fp16 or fp32");
}

void require_positive(int64_t v, const char* flag) {
  PQ_REQUIRE(v > 0, "synth: ", flag, " must be a positive integer, got ", v);
}

}  // namespace

namespace {

// Checks the options; returns head_dim.
int64_t check_synth_options(const SynthOptions& o) {
  PQ_REQUIRE(!o.out_dir.empty(), "synth: --out (the output directory) is required");
  require_positive(o.hidden_size, "--hidden-size");
  require_positive(o.intermediate_size, "--intermediate-size");
  require_positive(o.num_layers, "--num-layers");
  require_positive(o.num_heads, "--num-heads");
  require_positive(o.num_kv_heads, "--num-kv-heads");
  require_positive(o.vocab_size, "--vocab-size");
  PQ_REQUIRE(o.hidden_size % o.num_heads == 0, "synth: --hidden-size ", o.hidden_size,
             " must be a multiple of --num-heads ", o.num_heads);
  PQ_REQUIRE(o.num_heads % o.num_kv_heads == 0, "synth: --num-kv-heads ", o.num_kv_heads, " must divide --num-heads ",
             o.num_heads);
  const int64_t head_dim = o.hidden_size / o.num_heads;
  PQ_REQUIRE(head_dim % 2 == 0, "synth: head_dim = --hidden-size / --num-heads = ", head_dim,
             " must be even (RoPE rotates pairs of channels)");
  return head_dim;
}

// The experts of an MoE architecture into c, checked as the config reader checks them; refuses expert options for
// another architecture.
void set_synth_experts(const SynthOptions& o, io::ModelConfig& c) {
  const bool qwen = c.reads_qwen_moe_fields();
  PQ_REQUIRE(c.reads_experts() || (o.num_experts == 0 && o.experts_per_token == 0),
             "synth: --num-experts and --experts-per-token are for mixtral, qwen2_moe and qwen3_moe, not ",
             c.architecture);
  PQ_REQUIRE(qwen || (o.moe_intermediate_size == 0 && !o.norm_topk_prob && o.mlp_only_layers.empty() &&
                      o.decoder_sparse_step == 1),
             "synth: --moe-intermediate-size, --norm-topk-prob, --mlp-only-layers and --decoder-sparse-step are for "
             "qwen2_moe and qwen3_moe, not ",
             c.architecture);
  PQ_REQUIRE(c.reads_shared_expert() || o.shared_expert_intermediate_size == 0,
             "synth: --shared-expert-intermediate-size is for qwen2_moe, not ", c.architecture);
  if (!c.reads_experts()) return;
  require_positive(o.num_experts, "--num-experts");
  require_positive(o.experts_per_token, "--experts-per-token");
  PQ_REQUIRE(o.experts_per_token <= o.num_experts, "synth: --experts-per-token ", o.experts_per_token,
             " must be at most --num-experts ", o.num_experts);
  c.num_experts = o.num_experts;
  c.experts_per_token = o.experts_per_token;
  c.expert_intermediate_size = c.intermediate_size;
  if (!qwen) return;
  require_positive(o.moe_intermediate_size, "--moe-intermediate-size");
  require_positive(o.decoder_sparse_step, "--decoder-sparse-step");
  for (const int64_t b : o.mlp_only_layers)
    PQ_REQUIRE(b >= 0 && b < o.num_layers, "synth: --mlp-only-layers: ", b, " is not a block index in [0, ",
               o.num_layers, ")");
  c.expert_intermediate_size = o.moe_intermediate_size;
  c.norm_topk_prob = o.norm_topk_prob;
  c.mlp_only_layers = o.mlp_only_layers;
  c.decoder_sparse_step = o.decoder_sparse_step;
  if (!c.reads_shared_expert()) return;
  require_positive(o.shared_expert_intermediate_size, "--shared-expert-intermediate-size");
  c.shared_expert_intermediate_size = o.shared_expert_intermediate_size;
}

io::ModelConfig synth_config(const SynthOptions& o, int64_t head_dim, const DTypeChoice& dt) {
  io::ModelConfig c;
  c.hidden_size = o.hidden_size;
  c.intermediate_size = o.intermediate_size;
  c.num_layers = o.num_layers;
  c.num_heads = o.num_heads;
  c.num_kv_heads = o.num_kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = o.vocab_size;
  c.max_position_embeddings = 4096;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = o.tie_word_embeddings;
  c.set_architecture(o.architecture);
  // the bias flags are config fields only where the architecture reads them; the others fix their biases
  PQ_REQUIRE(c.reads_attention_bias() || !o.attention_bias, "synth: --attention-bias is not a config field of ",
             o.architecture, ", which fixes those biases itself");
  PQ_REQUIRE(c.reads_mlp_bias() || !o.mlp_bias, "synth: --mlp-bias is not a config field of ", o.architecture,
             ", which fixes those biases itself");
  c.attention_bias = o.attention_bias;
  c.mlp_bias = o.mlp_bias;
  set_synth_experts(o, c);
  c.torch_dtype = dt.torch_dtype;
  return c;
}

void write_config(const io::ModelConfig& c, const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  PQ_REQUIRE(!ec, "synth: cannot create the output directory ", dir, ": ", ec.message());
  PQ_REQUIRE(fs::is_directory(dir), "synth: --out ", dir, " exists and is not a directory");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  std::ofstream f(config_path, std::ios::trunc);
  PQ_REQUIRE(f.good(), "synth: cannot write ", config_path, ": ", std::strerror(errno));
  f << c.to_json().dump(2) << "\n";
  f.flush();
  PQ_REQUIRE(f.good(), "synth: write to ", config_path, " failed: ", std::strerror(errno));
}

// Tensors with their distributions, in file order: tensor i draws from the random stream mix_seed(seed, i).
class SynthTensors {
 public:
  explicit SynthTensors(io::DType dtype) : dtype_(dtype) {}
  void add(std::string name, std::vector<int64_t> shape, double mean, double std) {
    tensors_.push_back({{std::move(name), dtype_, std::move(shape)}, mean, std});
  }
  // A linear [out, in]: std 1/sqrt(in) keeps its outputs O(1) for O(1) inputs.
  void add_linear(std::string name, int64_t out, int64_t in) {
    add(std::move(name), {out, in}, 0.0, 1.0 / std::sqrt(static_cast<double>(in)));
  }
  // A SwiGLU MLP of width inter: the gate, up and down weights of `modules`.
  void add_swiglu(const std::array<std::string, 3>& modules, int64_t hidden, int64_t inter) {
    add_linear(modules[0] + ".weight", inter, hidden);
    add_linear(modules[1] + ".weight", inter, hidden);
    add_linear(modules[2] + ".weight", hidden, inter);
  }
  std::vector<SynthTensor> take() { return std::move(tensors_); }

 private:
  io::DType dtype_;
  std::vector<SynthTensor> tensors_;
};

// Block b's MLP under p: the dense one, or an MoE block's router, experts, shared expert and its gate (the router's
// std 1/sqrt(hidden) makes logits of O(1): the routing differs from token to token).
void add_block_mlp(SynthTensors& t, const io::ModelConfig& c, int64_t b, const std::string& p) {
  const int64_t h = c.hidden_size;
  if (!c.moe_block(b)) {
    t.add_swiglu({p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj"}, h, c.intermediate_size);
    return;
  }
  t.add_linear(p + router_module(c) + ".weight", c.num_experts, h);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    auto modules = expert_modules(c, e);
    for (auto& m : modules) m = p + m;
    t.add_swiglu(modules, h, c.expert_intermediate_size);
  }
  if (!c.shared_expert()) return;
  auto modules = shared_expert_modules(c);
  for (auto& m : modules) m = p + m;
  t.add_swiglu(modules, h, c.shared_expert_intermediate_size);
  if (!shared_expert_gate_module(c).empty()) t.add_linear(p + shared_expert_gate_module(c) + ".weight", 1, h);
}

// Every tensor with its distribution, in file order.
std::vector<SynthTensor> synth_tensors(const SynthOptions& o, const io::ModelConfig& c, const DTypeChoice& dt) {
  const int64_t head_dim = c.head_dim;
  const int64_t h = o.hidden_size;
  const int64_t q_out = o.num_heads * head_dim, kv_out = o.num_kv_heads * head_dim;
  SynthTensors t(dt.dtype);
  t.add("model.embed_tokens.weight", {o.vocab_size, h}, 0.0, 0.02);
  for (int64_t b = 0; b < o.num_layers; ++b) {
    const std::string p = block_prefix(b);
    t.add(p + "input_layernorm.weight", {h}, 1.0, 0.02);
    t.add_linear(p + "self_attn.q_proj.weight", q_out, h);
    t.add_linear(p + "self_attn.k_proj.weight", kv_out, h);
    t.add_linear(p + "self_attn.v_proj.weight", kv_out, h);
    t.add_linear(p + "self_attn.o_proj.weight", h, q_out);
    t.add(p + "post_attention_layernorm.weight", {h}, 1.0, 0.02);
    // Qwen3's per-head q/k norms; a std of 0.2 makes them matter to the attention scores
    if (c.qk_norm) {
      t.add(p + "self_attn.q_norm.weight", {head_dim}, 1.0, 0.2);
      t.add(p + "self_attn.k_norm.weight", {head_dim}, 1.0, 0.2);
    }
    add_block_mlp(t, c, b, p);
  }
  t.add("model.norm.weight", {h}, 1.0, 0.02);
  if (!o.tie_word_embeddings) t.add_linear("lm_head.weight", o.vocab_size, h);
  // Biases come last, so that each weight keeps its stream (the same weights as without biases for a seed); a std
  // of 0.1 against outputs of O(1) moves the model measurably.
  for (int64_t b = 0; b < o.num_layers; ++b)
    for (int i = 0; i < block_linear_count(c, b); ++i)
      if (has_bias(c, i))
        t.add(block_prefix(b) + kLinears[static_cast<size_t>(i)].module + ".bias", {linear_shape(c, i)[0]}, 0.0, 0.1);
  return t.take();
}

// One tensor at a time is generated and written, so memory stays at the largest tensor.
void write_synth_tensors(const std::string& path, const std::vector<SynthTensor>& tensors, uint64_t seed) {
  std::vector<io::TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back(t.spec);
  io::write_safetensors(path, specs,
                        [&](size_t i, std::span<std::byte> out) {
                          const SynthTensor& t = tensors[i];
                          Rng rng(mix_seed(seed, i));
                          const size_t item = io::dtype_size(t.spec.dtype);
                          const size_t n = out.size() / item;
                          for (size_t k = 0; k < n; ++k) {
                            const float v = static_cast<float>(t.mean + t.std * rng.normal());
                            std::byte* dst = out.data() + k * item;
                            if (t.spec.dtype == io::DType::kF32) {
                              std::memcpy(dst, &v, 4);
                            } else {
                              const uint16_t bits =
                                  t.spec.dtype == io::DType::kBF16 ? float_to_bf16(v) : float_to_fp16(v);
                              std::memcpy(dst, &bits, 2);
                            }
                          }
                        },
                        {{"format", "pt"}, {"generator", "pipequant synth"}, {"seed", std::to_string(seed)}});
}

}  // namespace

void write_synthetic_checkpoint(const SynthOptions& o) {
  const int64_t head_dim = check_synth_options(o);
  const DTypeChoice dt = parse_synth_dtype(o.dtype);
  const io::ModelConfig config = synth_config(o, head_dim, dt);
  write_config(config, o.out_dir);
  write_synth_tensors((fs::path(o.out_dir) / "model.safetensors").string(), synth_tensors(o, config, dt), o.seed);
}

void write_synthetic_tokens(const std::string& path, int64_t count, int64_t vocab, uint64_t seed) {
  PQ_REQUIRE(count > 0, "synth-tokens: --count must be positive, got ", count);
  PQ_REQUIRE(vocab > 1 && vocab <= static_cast<int64_t>(INT32_MAX) + 1,
             "synth-tokens: --vocab-size must be in [2, 2^31], got ", vocab);
  Rng rng(mix_seed(seed, 0x746f6b656e73ull));  // "tokens": a stream distinct from any checkpoint tensor's
  // rank r has weight 1/(r+1)^1.1 (Zipf's law with the exponent of natural text, about 1)
  std::vector<double> cdf(static_cast<size_t>(vocab));
  double total = 0.0;
  for (int64_t r = 0; r < vocab; ++r) {
    total += 1.0 / std::pow(static_cast<double>(r + 1), 1.1);
    cdf[static_cast<size_t>(r)] = total;
  }
  // which token id has which rank: a seeded shuffle, so the frequent ids are spread over the vocabulary
  std::vector<int32_t> id_of_rank(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < vocab; ++r) id_of_rank[static_cast<size_t>(r)] = static_cast<int32_t>(r);
  for (int64_t i = vocab - 1; i > 0; --i)
    std::swap(id_of_rank[static_cast<size_t>(i)], id_of_rank[rng.below(static_cast<uint64_t>(i + 1))]);

  std::vector<int32_t> ids(static_cast<size_t>(count));
  for (auto& id : ids) {
    const double u = rng.uniform() * total;
    size_t r = static_cast<size_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    r = std::min(r, cdf.size() - 1);
    id = id_of_rank[r];
  }
  io::write_npy(path, "<i4", {count}, ids.data());
}

}  // namespace pipequant
