#include "src/model.hpp"

#include <cmath>
#include <cstring>
#include <numbers>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "base/error.hpp"
#include "base/shape.hpp"
#include "base/numeric.hpp"
#include "src/hf_source.hpp"
#include "src/moe.hpp"
#include "src/quant.hpp"

namespace pipequant {

bool has_bias(const io::ModelConfig& c, int module_index) {
  if (module_index < 3) return c.attention_bias || c.qkv_bias;  // q, k, v_proj
  if (module_index == 3) return c.attention_bias;              // o_proj
  return c.mlp_bias;
}

std::string block_prefix(int64_t block) { return "model.layers." + std::to_string(block) + "."; }

namespace {

// Mixtral's names (block_sparse_moe.*) rather than Qwen MoE's (mlp.*).
bool mixtral_names(const io::ModelConfig& c) { return c.architecture == "MixtralForCausalLM"; }

// A SwiGLU MLP's gate, up and down linears under `p`, as Llama names them.
std::array<std::string, 3> swiglu_modules(const std::string& p) {
  return {p + "gate_proj", p + "up_proj", p + "down_proj"};
}

}  // namespace

std::string router_module(const io::ModelConfig& c) { return mixtral_names(c) ? "block_sparse_moe.gate" : "mlp.gate"; }

std::array<std::string, 3> expert_modules(const io::ModelConfig& c, int64_t e) {
  if (!mixtral_names(c)) return swiglu_modules("mlp.experts." + std::to_string(e) + ".");
  const std::string p = "block_sparse_moe.experts." + std::to_string(e) + ".";
  return {p + "w1", p + "w3", p + "w2"};
}

std::array<std::string, 3> shared_expert_modules(const io::ModelConfig& c) {
  PQ_ASSERT(c.shared_expert(), "shared_expert_modules: ", c.architecture, " has no shared expert");
  return swiglu_modules("mlp.shared_expert.");
}

std::string shared_expert_gate_module(const io::ModelConfig& c) {
  return c.reads_shared_expert() ? "mlp.shared_expert_gate" : "";
}

int block_linear_count(const io::ModelConfig& c, int64_t block) { return c.moe_block(block) ? 4 : kLinearCount; }

std::vector<std::string> block_modules(const io::ModelConfig& c, int64_t block) {
  std::vector<std::string> modules;
  for (int i = 0; i < block_linear_count(c, block); ++i) modules.emplace_back(kLinears[static_cast<size_t>(i)].module);
  if (c.moe_block(block))
    for (int64_t e = 0; e < solved_experts(c); ++e)
      for (auto& m : solved_expert_modules(c, e)) modules.push_back(std::move(m));
  return modules;
}

int64_t solved_experts(const io::ModelConfig& c) { return c.num_experts + (c.shared_expert() ? 1 : 0); }

std::array<std::string, 3> solved_expert_modules(const io::ModelConfig& c, int64_t e) {
  return e == c.num_experts ? shared_expert_modules(c) : expert_modules(c, e);
}

namespace {

// The linears of an MoE block under model.layers.<i>., each with its [out, in]: the experts' and the shared expert's.
std::vector<std::pair<std::string, std::array<int64_t, 2>>> moe_linears(const io::ModelConfig& c) {
  const int64_t h = c.hidden_size;
  std::vector<std::pair<std::string, std::array<int64_t, 2>>> out;
  for (int64_t e = 0; e < solved_experts(c); ++e) {
    const auto modules = solved_expert_modules(c, e);
    const int64_t inter = e == c.num_experts ? c.shared_expert_intermediate_size : c.expert_intermediate_size;
    out.push_back({modules[0], {inter, h}});
    out.push_back({modules[1], {inter, h}});
    out.push_back({modules[2], {h, inter}});
  }
  return out;
}

// The other tensors of an MoE block, each with its shape: the router and the shared expert's gate (never quantized).
std::vector<std::pair<std::string, std::vector<int64_t>>> moe_dense_tensors(const io::ModelConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {
      {router_module(c) + ".weight", {c.num_experts, c.hidden_size}}};
  if (c.shared_expert() && !shared_expert_gate_module(c).empty())
    out.push_back({shared_expert_gate_module(c) + ".weight", {1, c.hidden_size}});
  return out;
}

}  // namespace

Linear Linear::of(int64_t out, int64_t in, WeightValues values) {
  Linear l;
  l.out = out;
  l.in = in;
  l.values = std::make_shared<const WeightValues>(std::move(values));
  return l;
}

namespace {

// Rows [r0, r1) of a quantized linear in fp32, as QuantizedLinear::dequantize computes them.
void dequantize_rows(const QuantizedLinear& ql, int64_t r0, int64_t r1, float* dst) {
  const int64_t cols = ql.cols;
#pragma omp parallel for schedule(static) if ((r1 - r0) * cols > (int64_t{1} << 16))
  for (int64_t n = r0; n < r1; ++n)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t t = static_cast<int64_t>(ql.g_idx[static_cast<size_t>(k)]) * ql.rows + n;
      const float code = static_cast<float>(ql.q[static_cast<size_t>(n * cols + k)]);
      dst[(n - r0) * cols + k] = ql.scales[static_cast<size_t>(t)] * (code - ql.zeros[static_cast<size_t>(t)]);
    }
}

void half_rows(const HalfValues& h, int64_t in, int64_t r0, int64_t r1, float* dst) {
  const uint16_t* src = h.bits.data() + r0 * in;
  const int64_t n = (r1 - r0) * in;
  const bool bf16 = h.format == kernels::HalfFormat::kBF16;
#pragma omp parallel for schedule(static) if (n > (int64_t{1} << 16))
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16 ? bf16_to_float(src[i]) : fp16_to_float(src[i]);
}

}  // namespace

void Linear::rows_f32(int64_t r0, int64_t r1, float* dst) const {
  PQ_ASSERT(values && 0 <= r0 && r0 <= r1 && r1 <= out, "Linear::rows_f32: rows [", r0, ", ", r1, ") of ", out);
  if (const auto* f = std::get_if<std::vector<float>>(values.get()))
    std::copy(f->data() + r0 * in, f->data() + r1 * in, dst);
  else if (const auto* h = std::get_if<HalfValues>(values.get()))
    half_rows(*h, in, r0, r1, dst);
  else
    dequantize_rows(std::get<QuantizedLinear>(*values), r0, r1, dst);
}

std::vector<float> Linear::to_f32() const {
  if (const float* f = f32()) return {f, f + out * in};
  std::vector<float> w(static_cast<size_t>(out * in));
  rows_f32(0, out, w.data());
  return w;
}

const float* Linear::f32() const {
  const auto* f = values ? std::get_if<std::vector<float>>(values.get()) : nullptr;
  return f ? f->data() : nullptr;
}

uint64_t Linear::held_bytes() const {
  if (!values) return 0;
  if (const auto* f = std::get_if<std::vector<float>>(values.get())) return f->size() * sizeof(float);
  if (const auto* h = std::get_if<HalfValues>(values.get())) return h->bits.size() * sizeof(uint16_t);
  const auto& q = std::get<QuantizedLinear>(*values);
  return q.q.size() + (q.scales.size() + q.zeros.size()) * sizeof(float) + q.g_idx.size() * sizeof(int32_t);
}

Linear& BlockWeights::linear(const std::string& module) {
  for (size_t i = 0; i < kLinears.size(); ++i)
    if (module == kLinears[i].module) return linears[i];
  fail("unknown linear module ", module);
}

std::vector<float> rope_inv_freq(const io::ModelConfig& config) {
  const int64_t half = config.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  const auto& rs = config.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(config.rope_theta, static_cast<double>(2 * i) / static_cast<double>(config.head_dim));
    if (rs.type == "linear") {
      f /= rs.factor;
    } else if (rs.type == "llama3") {
      // Llama 3.1: long wavelengths are scaled down by `factor`, short ones kept, a smooth ramp between.
      const double low_wavelen = static_cast<double>(rs.original_max_position_embeddings) / rs.low_freq_factor;
      const double high_wavelen = static_cast<double>(rs.original_max_position_embeddings) / rs.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= rs.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (static_cast<double>(rs.original_max_position_embeddings) / wavelen - rs.low_freq_factor) /
            (rs.high_freq_factor - rs.low_freq_factor);
        f = (1.0 - smooth) * f / rs.factor + smooth * f;
      }
    }
    inv[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return inv;
}

std::array<int64_t, 2> linear_shape(const io::ModelConfig& c, int module_index) {
  const int64_t q_out = c.num_heads * c.head_dim;
  const int64_t kv_out = c.num_kv_heads * c.head_dim;
  switch (module_index) {
    case 0:
      return {q_out, c.hidden_size};
    case 1:
    case 2:
      return {kv_out, c.hidden_size};
    case 3:
      return {c.hidden_size, q_out};
    case 4:
    case 5:
      return {c.intermediate_size, c.hidden_size};
    case 6:
      return {c.hidden_size, c.intermediate_size};
    default:
      PQ_ASSERT(false, "module index ", module_index);
  }
  return {0, 0};
}

namespace {

void expect_tensor(const io::Checkpoint& ckpt, const io::ModelConfig& config, const std::string& name,
                   const std::vector<int64_t>& shape) {
  PQ_REQUIRE(ckpt.has(name), ckpt.path(), ": tensor ", name, " is missing (", config.path, " needs it with shape ",
             shape_str(shape), ")");
  const auto& info = ckpt.info(name);
  PQ_REQUIRE(info.shape == shape, ckpt.path(), ": tensor ", name, " has shape ", shape_str(info.shape), ", expected ",
             shape_str(shape), " from ", config.path);
  PQ_REQUIRE(info.dtype == io::DType::kF32 || info.dtype == io::DType::kF16 || info.dtype == io::DType::kBF16,
             ckpt.path(), ": tensor ", name, " has dtype ", io::dtype_name(info.dtype), ", expected F32, F16 or BF16");
}

// An MoE block's MLP from its parts, the one assembly both sources use: `linear(module, out, in)` reads a linear,
// `dense(module, rows)` a [rows, hidden] tensor (the router, the shared expert's gate).
template <typename ReadLinear, typename ReadDense>
MoeWeights assemble_moe(const io::ModelConfig& c, ReadLinear&& linear, ReadDense&& dense) {
  const int64_t h = c.hidden_size;
  const auto swiglu = [&](const std::array<std::string, 3>& m, int64_t inter) {
    return ExpertWeights{linear(m[0], inter, h), linear(m[1], inter, h), linear(m[2], h, inter)};
  };
  MoeWeights w;
  w.router = dense(router_module(c), c.num_experts);
  for (int64_t e = 0; e < c.num_experts; ++e) w.experts.push_back(swiglu(expert_modules(c, e), c.expert_intermediate_size));
  if (c.shared_expert()) {
    w.shared = SharedExpertWeights{swiglu(shared_expert_modules(c), c.shared_expert_intermediate_size), {}};
    const std::string gate = shared_expert_gate_module(c);
    if (!gate.empty()) w.shared->gate = dense(gate, 1);
  }
  return w;
}

class CheckpointSource final : public WeightSource {
 public:
  CheckpointSource(const io::Checkpoint& ckpt, const io::ModelConfig& config, const io::HfQuantConfig* quant)
      : ckpt_(ckpt), config_(config) {
    if (quant) quant_ = *quant;
  }

  BlockWeights load_block(int64_t block) const override {
    BlockWeights b;
    b.index = block;
    const std::string p = block_prefix(block);
    b.input_norm = ckpt_.read_f32(p + "input_layernorm.weight");
    b.post_norm = ckpt_.read_f32(p + "post_attention_layernorm.weight");
    if (config_.qk_norm) {
      b.q_norm = ckpt_.read_f32(p + kQkNormTensors[0]);
      b.k_norm = ckpt_.read_f32(p + kQkNormTensors[1]);
    }
    if (config_.moe_block(block)) b.moe = read_moe(p);
    for (int i = 0; i < block_linear_count(config_, block); ++i) {
      const auto shape = linear_shape(config_, i);
      auto& l = b.linears[static_cast<size_t>(i)];
      l = read_linear(p + kLinears[static_cast<size_t>(i)].module, shape[0], shape[1]);
      if (has_bias(config_, i)) l.bias = ckpt_.read_f32(p + kLinears[static_cast<size_t>(i)].module + ".bias");
    }
    return b;
  }
  std::vector<float> embed_tokens() const override { return read_released("model.embed_tokens.weight"); }
  std::vector<float> final_norm() const override { return read_released("model.norm.weight"); }
  std::vector<float> lm_head() const override {
    if (config_.tie_word_embeddings || !ckpt_.has("lm_head.weight")) return embed_tokens();
    return read_released("lm_head.weight");
  }
  std::string describe() const override {
    if (!quant_) return "checkpoint " + ckpt_.path();
    return std::string(quant_->format == io::HfQuantFormat::kAwq ? "AWQ" : "GPTQ") + " checkpoint " + ckpt_.path() +
           " (" + std::to_string(quant_->bits) + "-bit, group_size " + std::to_string(quant_->group_size) + ", " +
           io::name(quant_->format) + ")";
  }

 private:
  std::vector<float> read_released(const std::string& name) const {
    std::vector<float> v = ckpt_.read_f32(name);
    ckpt_.release(name);
    return v;
  }
  MoeWeights read_moe(const std::string& p) const {
    return assemble_moe(
        config_, [&](const std::string& m, int64_t out, int64_t in) { return read_linear(p + m, out, in); },
        [&](const std::string& m, int64_t) { return ckpt_.read_f32(p + m + ".weight"); });
  }
  // Linear `module` [out, in]: its weight as stored, or its GPTQ/AWQ codes and tables.
  Linear read_linear(const std::string& module, int64_t out, int64_t in) const {
    return Linear::of(out, in, quant_ ? WeightValues{read_hf_quantized_linear(ckpt_, *quant_, module, out, in)}
                                      : read_values(module + ".weight"));
  }
  // A weight as stored (16-bit kept as it is), its mapped pages released once copied.
  WeightValues read_values(const std::string& name) const {
    const io::TensorInfo& t = ckpt_.info(name);
    WeightValues v;
    if (t.dtype == io::DType::kBF16 || t.dtype == io::DType::kF16)
      v = HalfValues{ckpt_.read_u16(name),
                     t.dtype == io::DType::kBF16 ? kernels::HalfFormat::kBF16 : kernels::HalfFormat::kF16};
    else
      v = ckpt_.read_f32(name);
    ckpt_.release(name);
    return v;
  }

  const io::Checkpoint& ckpt_;
  const io::ModelConfig& config_;
  std::optional<io::HfQuantConfig> quant_;
};

class QuantizedSource final : public WeightSource {
 public:
  QuantizedSource(const std::string& out_dir, const io::ModelConfig& config)
      : dir_(out_dir), config_(config), index_(io::read_model_index(out_dir)) {
    PQ_REQUIRE(index_.complete, out_dir, "/model.h5: the output is not complete (attribute complete = 0); ",
               "rerun the quantize command to finish it");
    for (const auto& f : index_.shard_files) shards_.push_back(std::make_unique<io::ShardReader>(dir_ + "/" + f));
    for (int64_t b = 0; b < config.num_layers; ++b)
      PQ_REQUIRE(index_.block_shard.count(b), out_dir, "/model.h5: block ", b, " is missing (the config has ",
                 config.num_layers, " layers)");
  }

  BlockWeights load_block(int64_t block) const override {
    const auto& shard = *shards_[static_cast<size_t>(index_.block_shard.at(block))];
    PQ_REQUIRE(shard.block_complete(block), shard.path(), ": block ", block, " is not complete");
    BlockWeights b;
    b.index = block;
    const std::string where = shard.path() + ": /blocks/" + std::to_string(block);
    b.input_norm = dense_to_f32(shard.read_block_tensor(block, "input_layernorm.weight"), where);
    b.post_norm = dense_to_f32(shard.read_block_tensor(block, "post_attention_layernorm.weight"), where);
    if (config_.qk_norm) {
      b.q_norm = dense_to_f32(shard.read_block_tensor(block, kQkNormTensors[0]), where);
      b.k_norm = dense_to_f32(shard.read_block_tensor(block, kQkNormTensors[1]), where);
    }
    for (int i = 0; i < block_linear_count(config_, block); ++i) {
      auto& l = b.linears[static_cast<size_t>(i)];
      const std::string module = kLinears[static_cast<size_t>(i)].module;
      l = read_linear(shard, block, module, linear_shape(config_, i), where);
      if (has_bias(config_, i)) l.bias = dense_to_f32(shard.read_block_tensor(block, module + ".bias"), where);
    }
    if (config_.moe_block(block)) b.moe = read_moe(shard, block, where);
    return b;
  }
  std::vector<float> embed_tokens() const override { return tensor("model.embed_tokens.weight"); }
  std::vector<float> final_norm() const override { return tensor("model.norm.weight"); }
  std::vector<float> lm_head() const override {
    if (index_.tensor_shard.count("lm_head.weight")) return tensor("lm_head.weight");
    return embed_tokens();
  }
  std::string describe() const override { return "quantized output " + dir_; }

 private:
  static Linear read_linear(const io::ShardReader& shard, int64_t block, const std::string& module,
                            const std::array<int64_t, 2>& shape, const std::string& where) {
    const io::PackedLinear packed = shard.read_linear(block, module);
    PQ_REQUIRE(packed.out_features == shape[0] && packed.in_features == shape[1], where, "/", module, ": shape [",
               packed.out_features, ", ", packed.in_features, "] does not match the config's [", shape[0], ", ",
               shape[1], "]");
    return Linear::of(shape[0], shape[1], unpack(packed));
  }
  MoeWeights read_moe(const io::ShardReader& shard, int64_t block, const std::string& where) const {
    return assemble_moe(
        config_,
        [&](const std::string& m, int64_t out, int64_t in) { return read_linear(shard, block, m, {out, in}, where); },
        [&](const std::string& m, int64_t rows) { return router_values(shard, block, m, rows, where); });
  }
  // A dense [rows, hidden] tensor of the block (the router, the shared expert's gate) as stored.
  std::vector<float> router_values(const io::ShardReader& shard, int64_t block, const std::string& module,
                                   int64_t rows, const std::string& where) const {
    std::vector<float> v = dense_to_f32(shard.read_block_tensor(block, module + ".weight"), where);
    PQ_REQUIRE(static_cast<int64_t>(v.size()) == rows * config_.hidden_size, where, "/", module, ".weight: ",
               v.size(), " values, expected ", rows, " x ", config_.hidden_size);
    return v;
  }
  std::vector<float> tensor(const std::string& name) const {
    auto it = index_.tensor_shard.find(name);
    PQ_REQUIRE(it != index_.tensor_shard.end(), dir_, "/model.h5: tensor ", name, " is missing");
    const auto& shard = *shards_[static_cast<size_t>(it->second)];
    return dense_to_f32(shard.read_tensor(name), shard.path());
  }

  std::string dir_;
  const io::ModelConfig& config_;
  io::ModelIndex index_;
  std::vector<std::unique_ptr<io::ShardReader>> shards_;
};

}  // namespace

std::vector<float> dense_to_f32(const io::DenseTensor& t, const std::string& where) {
  int64_t n = 1;
  for (auto d : t.shape) n *= d;
  std::vector<float> out(static_cast<size_t>(n));
  if (t.dtype == "F32") {
    PQ_REQUIRE(t.bytes.size() == static_cast<size_t>(n) * 4, where, ": tensor ", t.name, " has a wrong byte size");
    if (n > 0) std::memcpy(out.data(), t.bytes.data(), out.size() * 4);
  } else if (t.dtype == "F16" || t.dtype == "BF16") {
    PQ_REQUIRE(t.bytes.size() == static_cast<size_t>(n) * 2, where, ": tensor ", t.name, " has a wrong byte size");
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.bytes.data() + 2 * i, 2);
      out[static_cast<size_t>(i)] = t.dtype == "F16" ? fp16_to_float(h) : bf16_to_float(h);
    }
  } else {
    fail(where, ": tensor ", t.name, " has dtype ", t.dtype, ", expected F32, F16 or BF16");
  }
  const int64_t bad = first_non_finite(out.data(), n);
  PQ_REQUIRE(bad == n, where, ": tensor ", t.name, ": element ", bad, " (flat) is ", out[static_cast<size_t>(bad)],
             "; every stored value must be finite");
  return out;
}

namespace {

inline constexpr const char* kTopLevelTensors[] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
// A buffer old checkpoints carry: RoPE's inverse frequencies, which the forward computes from the config.
inline constexpr const char* kIgnoredBlockTensor = "self_attn.rotary_emb.inv_freq";

// "model.layers.<digits>.<rest>" -> (block, rest); nullopt for any other name.
std::optional<std::pair<int64_t, std::string>> split_block_name(const std::string& name) {
  constexpr std::string_view kLayers = "model.layers.";
  if (name.compare(0, kLayers.size(), kLayers) != 0) return std::nullopt;
  const size_t dot = name.find('.', kLayers.size());
  const size_t digits = dot == std::string::npos ? 0 : dot - kLayers.size();
  if (digits == 0 || digits > 18) return std::nullopt;
  int64_t block = 0;
  for (size_t i = kLayers.size(); i < dot; ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    block = block * 10 + (name[i] - '0');
  }
  return std::make_pair(block, name.substr(dot + 1));
}

// Refuses a tensor the forward would not read: a checkpoint holding one is of another model (Qwen3's q_norm and
// k_norm, biases the config does not announce, experts), which would otherwise be computed wrongly without a word.
// What an MoE block's MLP holds, for errors: "the router mlp.gate, experts mlp.experts.<0..7>.* and ...".
std::string moe_description(const io::ModelConfig& c) {
  std::string s = "the router " + router_module(c) + ", experts " + expert_modules(c, 0)[0] + " ... " +
                  expert_modules(c, c.num_experts - 1)[2];
  if (c.shared_expert()) s += ", the shared expert " + shared_expert_modules(c)[0] + " ...";
  if (!shared_expert_gate_module(c).empty()) s += " and its gate " + shared_expert_gate_module(c);
  return s;
}

// Refuses a tensor the forward would not read: a checkpoint holding one is of another model (Qwen3's q_norm and
// k_norm, biases the config does not announce, experts), which would otherwise be computed wrongly without a word.
// `split`: the block and the name under model.layers.<block>.
void refuse_unused_tensor(const io::Checkpoint& ckpt, const io::ModelConfig& c, const std::string& name,
                          const std::pair<int64_t, std::string>& split) {
  const std::string& file = ckpt.info(name).file;  // the .safetensors file holding it
  const auto& [block, block_tensor] = split;
  for (int i = 0; i < block_linear_count(c, block); ++i) {
    if (block_tensor != std::string(kLinears[static_cast<size_t>(i)].module) + ".bias") continue;
    const bool attention = i < 4;
    if (c.qkv_bias)
      fail(file, ": tensor ", name, " is a bias, but ", c.path, " names ", c.architecture,
           ", whose linears have biases on q, k and v_proj only");
    if (!(attention ? c.reads_attention_bias() : c.reads_mlp_bias()))
      fail(file, ": tensor ", name, " is a bias, but ", c.path, " names ", c.architecture, ", whose ",
           attention ? "attention" : "MLP", " linears have none (expected no such bias tensors)");
    fail(file, ": tensor ", name, " is a bias, but ", c.path, " field ", attention ? "attention_bias" : "mlp_bias",
         " is not true (expected true when the checkpoint has biases)");
  }
  fail(file, ": tensor ", name, " is not used by block ", block, " of ", c.path, " (", c.architecture,
       "; expected only input_layernorm, post_attention_layernorm",
       c.qk_norm ? ", self_attn.q_norm, self_attn.k_norm" : "", ", the q/k/v/o_proj weights",
       (c.attention_bias || c.mlp_bias || c.qkv_bias) ? " and biases" : "", " and ",
       c.moe_block(block) ? moe_description(c) : "the mlp gate/up/down_proj weights",
       "): the checkpoint is of another model");
}

// The names (under model.layers.<i>.) block b's tensors may have: its norms, its linears of kLinears (with quant,
// their GPTQ/AWQ tensors) and their biases, an MoE block's router and experts, and the harmless RoPE buffer.
std::set<std::string> block_tensor_names(const io::ModelConfig& c, int64_t b, const io::HfQuantConfig* quant) {
  std::set<std::string> names = {"input_layernorm.weight", "post_attention_layernorm.weight", kIgnoredBlockTensor};
  if (c.qk_norm) names.insert(kQkNormTensors.begin(), kQkNormTensors.end());
  const auto add_linear = [&](const std::string& module) {
    if (!quant) names.insert(module + ".weight");
    for (const auto& t : quant ? hf_linear_tensor_suffixes() : std::vector<std::string>{})
      names.insert(module + "." + t);
  };
  if (c.moe_block(b)) {
    for (const auto& t : moe_dense_tensors(c)) names.insert(t.first);
    for (const auto& l : moe_linears(c)) add_linear(l.first);
  }
  for (int i = 0; i < block_linear_count(c, b); ++i) {
    const std::string module = kLinears[static_cast<size_t>(i)].module;
    add_linear(module);
    if (has_bias(c, i)) names.insert(module + ".bias");
  }
  return names;
}

}  // namespace

void validate_checkpoint(const io::Checkpoint& ckpt, const io::ModelConfig& c, const io::HfQuantConfig* quant) {
  const std::vector<std::string> names = ckpt.names();
  const std::string first_qweight = block_prefix(0) + kLinears[0].module + ".qweight";
  PQ_REQUIRE(quant || !ckpt.has(first_qweight), ckpt.info(first_qweight).file, ": tensor ", first_qweight,
             " is a quantized linear: expected unquantized <module>.weight tensors here (only eval --model reads ",
             "GPTQ/AWQ checkpoints, by the quantization_config of ", c.path, ")");
  // blocks the config does not know of mean the config is not this checkpoint's
  for (const auto& name : names) {
    const auto split = split_block_name(name);
    if (!split) continue;
    PQ_REQUIRE(split->first < c.num_layers, ckpt.path(), ": tensor ", name, " belongs to block ", split->first,
               ", but ", c.path, " field num_hidden_layers says ", c.num_layers, " blocks");
  }
  expect_tensor(ckpt, c, "model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  expect_tensor(ckpt, c, "model.norm.weight", {c.hidden_size});
  if (!c.tie_word_embeddings) expect_tensor(ckpt, c, "lm_head.weight", {c.vocab_size, c.hidden_size});
  std::vector<std::set<std::string>> block_tensors;  // per block
  for (int64_t b = 0; b < c.num_layers; ++b) block_tensors.push_back(block_tensor_names(c, b, quant));
  for (int64_t b = 0; b < c.num_layers; ++b) {
    const std::string p = block_prefix(b);
    expect_tensor(ckpt, c, p + "input_layernorm.weight", {c.hidden_size});
    expect_tensor(ckpt, c, p + "post_attention_layernorm.weight", {c.hidden_size});
    if (c.qk_norm)
      for (const char* t : kQkNormTensors) expect_tensor(ckpt, c, p + t, {c.head_dim});
    const auto expect_linear = [&](const std::string& name, const std::array<int64_t, 2>& shape) {
      if (quant)
        expect_hf_quantized_linear(ckpt, c, *quant, name, shape[0], shape[1]);
      else
        expect_tensor(ckpt, c, name + ".weight", {shape[0], shape[1]});
    };
    if (c.moe_block(b)) {
      for (const auto& [name, shape] : moe_dense_tensors(c)) expect_tensor(ckpt, c, p + name, shape);
      for (const auto& [module, shape] : moe_linears(c)) expect_linear(p + module, shape);
    }
    for (int i = 0; i < block_linear_count(c, b); ++i) {
      const auto shape = linear_shape(c, i);
      const std::string name = p + kLinears[static_cast<size_t>(i)].module;
      expect_linear(name, shape);
      if (has_bias(c, i)) expect_tensor(ckpt, c, name + ".bias", {shape[0]});
    }
  }
  // every tensor is one the forward reads (or the harmless RoPE buffer); lm_head.weight beside tied embeddings is
  // the same matrix in transformers, which ties it to the embedding
  for (const auto& name : names) {
    if (const auto split = split_block_name(name)) {
      if (!block_tensors[static_cast<size_t>(split->first)].count(split->second))
        refuse_unused_tensor(ckpt, c, name, *split);
      continue;
    }
    bool known = false;
    for (const char* t : kTopLevelTensors) known |= name == t;
    PQ_REQUIRE(known, ckpt.info(name).file, ": tensor ", name, " is not a tensor of the Llama model of ", c.path, " (",
               c.architecture,
               "; expected model.embed_tokens.weight, model.norm.weight, lm_head.weight and model.layers.<i>.*): "
               "the checkpoint is of another model");
  }
}

std::unique_ptr<WeightSource> checkpoint_source(const io::Checkpoint& checkpoint, const io::ModelConfig& config,
                                                const io::HfQuantConfig* quant) {
  return std::make_unique<CheckpointSource>(checkpoint, config, quant);
}

std::unique_ptr<WeightSource> quantized_source(const std::string& out_dir, const io::ModelConfig& config) {
  return std::make_unique<QuantizedSource>(out_dir, config);
}

// ---------------------------------------------------------------------------------------------------------

BlockRunner::BlockRunner(kernels::Backend& backend, const io::ModelConfig& config, int64_t seq, int64_t micro_batch,
                         std::optional<kernels::HalfFormat> half)
    : backend_(backend),
      config_(config),
      seq_(seq),
      micro_batch_(micro_batch),
      half_(half),
      expand_(!half && backend.host_memory()) {
  if (config.moe()) moe_ = std::make_shared<MoeMlp>(backend, config, seq, micro_batch);
  const auto inv = rope_inv_freq(config);
  inv_freq_ = kernels::Buffer<float>(backend, static_cast<int64_t>(inv.size()));
  backend.upload(inv_freq_.data(), inv.data(), inv.size() * sizeof(float));
  const int64_t rows = seq * micro_batch;
  const int64_t h = config.hidden_size;
  const int64_t q_width = config.num_heads * config.head_dim;
  const int64_t kv_width = config.num_kv_heads * config.head_dim;
  x_ = kernels::Buffer<float>(backend, rows * h);
  xn_ = kernels::Buffer<float>(backend, rows * h);
  q_ = kernels::Buffer<float>(backend, rows * q_width);
  k_ = kernels::Buffer<float>(backend, rows * kv_width);
  v_ = kernels::Buffer<float>(backend, rows * kv_width);
  attn_ = kernels::Buffer<float>(backend, rows * q_width);
  h_ = kernels::Buffer<float>(backend, rows * h);
  g_ = kernels::Buffer<float>(backend, rows * config.intermediate_size);
  u_ = kernels::Buffer<float>(backend, rows * config.intermediate_size);
}

namespace {
void upload_vector(kernels::Backend& backend, kernels::Buffer<float>& buf, const std::vector<float>& v) {
  if (buf.size() != static_cast<int64_t>(v.size()))
    buf = kernels::Buffer<float>(backend, static_cast<int64_t>(v.size()));
  backend.upload(buf.data(), v.data(), v.size() * sizeof(float));
}

// v rounded to the 16-bit format (to nearest even) into buf, through a host copy.
void upload_half(kernels::Backend& backend, kernels::Buffer<uint16_t>& buf, const std::vector<float>& v,
                 kernels::HalfFormat format) {
  std::vector<uint16_t> bits(v.size());
  const bool bf16 = format == kernels::HalfFormat::kBF16;
#pragma omp parallel for schedule(static) if (v.size() > (size_t{1} << 16))
  for (size_t i = 0; i < v.size(); ++i) bits[i] = bf16 ? float_to_bf16(v[i]) : float_to_fp16(v[i]);
  if (buf.size() != static_cast<int64_t>(v.size()))
    buf = kernels::Buffer<uint16_t>(backend, static_cast<int64_t>(v.size()));
  backend.upload(buf.data(), bits.data(), bits.size() * sizeof(uint16_t));
}
}  // namespace

void BlockRunner::set_block(const BlockWeights& block) {
  upload_vector(backend_, norm1_, block.input_norm);
  upload_vector(backend_, norm2_, block.post_norm);
  PQ_ASSERT(!config_.qk_norm || (static_cast<int64_t>(block.q_norm.size()) == config_.head_dim &&
                                 static_cast<int64_t>(block.k_norm.size()) == config_.head_dim),
            "set_block: q_norm/k_norm of ", block.q_norm.size(), " and ", block.k_norm.size(), " values, head_dim ",
            config_.head_dim);
  if (config_.qk_norm) {
    upload_vector(backend_, q_norm_, block.q_norm);
    upload_vector(backend_, k_norm_, block.k_norm);
  }
  moe_block_ = !block.moe.empty();
  if (moe_block_) moe_->set(block.moe);
  for (size_t i = 0; i < static_cast<size_t>(block_linear_count(config_, block.index)); ++i) {
    held_[i] = block.linears[i];
    upload_linear(static_cast<int>(i));
    has_bias_[i] = !block.linears[i].bias.empty();
    if (has_bias_[i]) upload_vector(backend_, bias_[i], block.linears[i].bias);
  }
}

void BlockRunner::set_linear(int module_index, const Linear& w) {
  const auto i = static_cast<size_t>(module_index);
  PQ_ASSERT(w.out == held_[i].out && w.in == held_[i].in, "set_linear: shape [", w.out, ", ", w.in, "], expected [",
            held_[i].out, ", ", held_[i].in, "]");
  std::vector<float> bias = std::move(held_[i].bias);
  held_[i] = w;
  held_[i].bias = std::move(bias);
  upload_linear(module_index);
}

void BlockRunner::set_norms(const std::vector<float>& input_norm, const std::vector<float>& post_norm) {
  PQ_ASSERT(static_cast<int64_t>(input_norm.size()) == config_.hidden_size &&
                static_cast<int64_t>(post_norm.size()) == config_.hidden_size,
            "set_norms: ", input_norm.size(), " and ", post_norm.size(), " values for hidden size ", config_.hidden_size);
  upload_vector(backend_, norm1_, input_norm);
  upload_vector(backend_, norm2_, post_norm);
}

void BlockRunner::set_linear(int module_index, std::vector<float> w) {
  const Linear& h = held_[static_cast<size_t>(module_index)];
  set_linear(module_index, Linear::of(h.out, h.in, std::move(w)));
}

// The backend's copy of a held linear: none when GEMMs expand tiles of it (expand_), else fp32 or 16-bit.
void BlockRunner::upload_linear(int module_index) {
  const auto i = static_cast<size_t>(module_index);
  if (expand_) return;
  const std::vector<float> w = held_[i].to_f32();
  if (half_)
    upload_half(backend_, wh_[i], w, *half_);
  else
    upload_vector(backend_, w_[i], w);
}

// out[rows, n] = in[rows, k] W^T (+ bias). With expand_, W in tiles of rows expanded from its held values: the
// same products as one GEMM on the fp32 weights.
// One GEMM per sample (seq rows): the problem sizes, and so each output's bits, do not depend on the micro-batch,
// on any backend (a BLAS may pick another kernel or split for another m).
void BlockRunner::run_linear(int module_index, const float* in, float* out, int64_t rows) {
  const auto i = static_cast<size_t>(module_index);
  const Linear& l = held_[i];
  const int64_t n = l.out, k = l.in;
  const auto per_sample = [&](auto&& gemm) {
    for (int64_t r0 = 0; r0 < rows; r0 += seq_) gemm(in + r0 * k, out + r0 * n, std::min(seq_, rows - r0));
  };
  if (half_) {
    per_sample([&](const float* x, float* y, int64_t m) { backend_.linear_half(x, wh_[i].data(), *half_, y, m, n, k); });
  } else if (!expand_ || l.f32()) {
    const float* w = expand_ ? l.f32() : w_[i].data();
    per_sample([&](const float* x, float* y, int64_t m) { backend_.linear(x, w, y, m, n, k); });
  } else {
    const int64_t tile = std::min(n, expand_tile_rows(k));
    tile_.resize(static_cast<size_t>(tile * k));
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t n1 = std::min(n, n0 + tile);
      l.rows_f32(n0, n1, tile_.data());
      per_sample([&](const float* x, float* y, int64_t m) {
        backend_.gemm(kernels::Trans::kNo, kernels::Trans::kYes, m, n1 - n0, k, 1.0f, x, k, tile_.data(), k, 0.0f,
                      y + n0, n);
      });
    }
  }
  if (has_bias_[i]) backend_.add_bias(out, bias_[i].data(), rows, n);
}

int64_t BlockRunner::width(Until until) const {
  switch (until) {
    case Until::kQkvInput:
    case Until::kGateUpInput:
    case Until::kOutput:
      return config_.hidden_size;
    case Until::kOInput:
      return config_.num_heads * config_.head_dim;
    case Until::kDownInput:
      return config_.intermediate_size;
  }
  return 0;
}

const float* BlockRunner::forward(const float* x, int64_t samples, Until until) {
  PQ_ASSERT(samples <= micro_batch_, "micro-batch of ", samples, " samples exceeds ", micro_batch_);
  auto& be = backend_;
  const auto& c = config_;
  const int64_t rows = samples * seq_;
  const int64_t hsz = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);

  be.upload(x_.data(), x, static_cast<size_t>(rows * hsz) * sizeof(float));
  be.rms_norm(x_.data(), norm1_.data(), xn_.data(), rows, hsz, eps);
  if (until == Until::kQkvInput) return xn_.data();
  run_linear(0, xn_.data(), q_.data(), rows);
  run_linear(1, xn_.data(), k_.data(), rows);
  run_linear(2, xn_.data(), v_.data(), rows);
  if (c.qk_norm) {  // Qwen3: RMSNorm over each head of q and k, before RoPE
    be.rms_norm(q_.data(), q_norm_.data(), q_.data(), rows * c.num_heads, c.head_dim, eps);
    be.rms_norm(k_.data(), k_norm_.data(), k_.data(), rows * c.num_kv_heads, c.head_dim, eps);
  }
  be.rope(q_.data(), samples, seq_, c.num_heads, c.head_dim, inv_freq_.data());
  be.rope(k_.data(), samples, seq_, c.num_kv_heads, c.head_dim, inv_freq_.data());
  be.attention(q_.data(), k_.data(), v_.data(), attn_.data(), samples, seq_, c.num_heads, c.num_kv_heads, c.head_dim);
  if (until == Until::kOInput) return attn_.data();
  run_linear(3, attn_.data(), h_.data(), rows);
  be.add(h_.data(), x_.data(), rows * hsz);  // h = x + attention output
  be.rms_norm(h_.data(), norm2_.data(), xn_.data(), rows, hsz, eps);
  if (until == Until::kGateUpInput) return xn_.data();
  if (moe_block_) {
    PQ_ASSERT(until == Until::kOutput, "forward: an MoE block has no single down_proj input");
    moe_->forward(xn_.data(), x_.data(), rows);
    be.add(x_.data(), h_.data(), rows * hsz);  // out = h + MoE output
    return x_.data();
  }
  run_linear(4, xn_.data(), g_.data(), rows);
  run_linear(5, xn_.data(), u_.data(), rows);
  be.swiglu(g_.data(), u_.data(), g_.data(), rows * c.intermediate_size);
  if (until == Until::kDownInput) return g_.data();
  run_linear(6, g_.data(), x_.data(), rows);
  be.add(x_.data(), h_.data(), rows * hsz);  // out = h + mlp output
  return x_.data();
}

// ---------------------------------------------------------------------------------------------------------

Head::Head(kernels::Backend& backend, const io::ModelConfig& config, const WeightSource& source, int64_t max_rows)
    : backend_(backend), config_(config), max_rows_(max_rows) {
  upload_vector(backend, norm_, source.final_norm());
  upload_vector(backend, lm_head_, source.lm_head());
  x_ = kernels::Buffer<float>(backend, max_rows * config.hidden_size);
  logits_ = kernels::Buffer<float>(backend, max_rows * config.vocab_size);
}

void Head::logits(const float* x, int64_t rows, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows_) {
    const int64_t n = std::min(max_rows_, rows - r0);
    backend_.upload(x_.data(), x + r0 * config_.hidden_size, static_cast<size_t>(n * config_.hidden_size) * 4);
    backend_.rms_norm(x_.data(), norm_.data(), x_.data(), n, config_.hidden_size,
                      static_cast<float>(config_.rms_norm_eps));
    backend_.linear(x_.data(), lm_head_.data(), logits_.data(), n, config_.vocab_size, config_.hidden_size);
    backend_.download(out + r0 * config_.vocab_size, logits_.data(), static_cast<size_t>(n * config_.vocab_size) * 4);
  }
}

double Head::nll(const float* x, const int32_t* targets, int64_t rows) {
  double total = 0.0;
  kernels::Buffer<int32_t> tgt(backend_, max_rows_);
  for (int64_t r0 = 0; r0 < rows; r0 += max_rows_) {
    const int64_t n = std::min(max_rows_, rows - r0);
    backend_.upload(x_.data(), x + r0 * config_.hidden_size, static_cast<size_t>(n * config_.hidden_size) * 4);
    backend_.upload(tgt.data(), targets + r0, static_cast<size_t>(n) * 4);
    backend_.rms_norm(x_.data(), norm_.data(), x_.data(), n, config_.hidden_size,
                      static_cast<float>(config_.rms_norm_eps));
    backend_.linear(x_.data(), lm_head_.data(), logits_.data(), n, config_.vocab_size, config_.hidden_size);
    total += backend_.nll_sum(logits_.data(), tgt.data(), n, config_.vocab_size);
  }
  return total;
}

void embed(const std::vector<float>& table, int64_t hidden, const int32_t* tokens, int64_t count, float* out) {
  for (int64_t t = 0; t < count; ++t)
    std::memcpy(out + t * hidden, table.data() + static_cast<int64_t>(tokens[t]) * hidden,
                static_cast<size_t>(hidden) * sizeof(float));
}

}  // namespace pipequant
