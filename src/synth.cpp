// Synthetic Llama checkpoints and token files (pipequant synth, synth-tokens).
#include "src/synth.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <random>
#include <vector>

#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "src/model.hpp"
#include "base/error.hpp"
#include "base/numeric.hpp"

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

// Every tensor with its distribution, in file order: tensor i draws from the random stream mix_seed(seed, i).
std::vector<SynthTensor> synth_tensors(const SynthOptions& o, const io::ModelConfig& c, const DTypeChoice& dt) {
  const int64_t head_dim = c.head_dim;
  // Shapes are [out, in] as in nn.Linear; a linear's std 1/sqrt(in) keeps its outputs O(1) for O(1) inputs.
  const int64_t h = o.hidden_size, inter = o.intermediate_size;
  const int64_t q_out = o.num_heads * head_dim, kv_out = o.num_kv_heads * head_dim;
  const double lin_h = 1.0 / std::sqrt(static_cast<double>(h));
  std::vector<SynthTensor> tensors;
  auto add = [&](std::string name, std::vector<int64_t> shape, double mean, double std) {
    tensors.push_back({{std::move(name), dt.dtype, std::move(shape)}, mean, std});
  };
  add("model.embed_tokens.weight", {o.vocab_size, h}, 0.0, 0.02);
  for (int64_t b = 0; b < o.num_layers; ++b) {
    const std::string p = "model.layers." + std::to_string(b) + ".";
    add(p + "input_layernorm.weight", {h}, 1.0, 0.02);
    add(p + "self_attn.q_proj.weight", {q_out, h}, 0.0, lin_h);
    add(p + "self_attn.k_proj.weight", {kv_out, h}, 0.0, lin_h);
    add(p + "self_attn.v_proj.weight", {kv_out, h}, 0.0, lin_h);
    add(p + "self_attn.o_proj.weight", {h, q_out}, 0.0, 1.0 / std::sqrt(static_cast<double>(q_out)));
    add(p + "post_attention_layernorm.weight", {h}, 1.0, 0.02);
    // Qwen3's per-head q/k norms; a std of 0.2 makes them matter to the attention scores
    if (c.qk_norm) {
      add(p + "self_attn.q_norm.weight", {head_dim}, 1.0, 0.2);
      add(p + "self_attn.k_norm.weight", {head_dim}, 1.0, 0.2);
    }
    add(p + "mlp.gate_proj.weight", {inter, h}, 0.0, lin_h);
    add(p + "mlp.up_proj.weight", {inter, h}, 0.0, lin_h);
    add(p + "mlp.down_proj.weight", {h, inter}, 0.0, 1.0 / std::sqrt(static_cast<double>(inter)));
  }
  add("model.norm.weight", {h}, 1.0, 0.02);
  if (!o.tie_word_embeddings) add("lm_head.weight", {o.vocab_size, h}, 0.0, lin_h);
  // Biases come last, so that each weight keeps its stream (the same weights as without biases for a seed); a std
  // of 0.1 against outputs of O(1) moves the model measurably.
  for (int64_t b = 0; b < o.num_layers; ++b)
    for (int i = 0; i < kLinearCount; ++i)
      if (has_bias(c, i))
        add(block_prefix(b) + kLinears[static_cast<size_t>(i)].module + ".bias", {linear_shape(c, i)[0]}, 0.0, 0.1);
  return tensors;
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
