// Hugging Face GPTQ and AWQ checkpoints read for eval (src/hf_source.hpp): one linear of each format from words
// packed by hand, whole tiny checkpoints (every linear, dense tensors as stored) compared with the weights they
// encode, logits equal to those of an fp32 checkpoint holding the dequantized weights, and one refusal per
// malformed input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "io/bitstream.hpp"
#include "io/hf_quant.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "src/hf_source.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"
#include "src/synth.hpp"
#include "tests/testdata.hpp"

namespace pipequant {
namespace {

using nlohmann::json;

template <typename T>
std::vector<std::byte> bytes_of(const std::vector<T>& v) {
  std::vector<std::byte> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

io::TensorToWrite i32_tensor(const std::string& name, std::vector<int64_t> shape, const std::vector<uint32_t>& words) {
  return {name, io::DType::kI32, std::move(shape), bytes_of(words)};
}

io::TensorToWrite f16_tensor(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_fp16(v[i]);
  return {name, io::DType::kF16, std::move(shape), bytes_of(h)};
}

// ---------------------------------------------------------------------------------------------------------
// One linear [N = 8, K = 8], group_size 4 (G = 2), codes q[k][n] = (k + n) % 16, packed by hand

// scales [2][8]: group 0 all 0.5; group 1 all 0.25 but column 7, 1.0
const std::vector<float> kScales = {0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,  0.5f,
                                    0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 0.25f, 1.0f};

std::vector<float> expected_weights(const std::vector<float>& zeros_gn, const std::vector<int32_t>& g_idx) {
  std::vector<float> w(64);
  for (int n = 0; n < 8; ++n)
    for (int k = 0; k < 8; ++k) {
      const int g = g_idx[static_cast<size_t>(k)];
      w[static_cast<size_t>(n * 8 + k)] = kScales[static_cast<size_t>(g * 8 + n)] *
                                          static_cast<float>((k + n) % 16 - zeros_gn[static_cast<size_t>(g * 8 + n)]);
    }
  return w;
}

QuantizedLinear read_one(const std::string& name, const std::vector<io::TensorToWrite>& tensors,
                         const io::HfQuantConfig& q) {
  const std::string dir = testing::scratch_dir(name);
  io::write_safetensors(dir + "/model.safetensors", tensors);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  return read_hf_quantized_linear(ckpt, q, "m", 8, 8);
}

TEST(HfSource, GptqLinearFromHandPackedWords) {
  // qweight [1][8]: column n holds codes n, n+1, ..., n+7 along K, lowest nibble first
  const std::vector<uint32_t> qweight = {0x76543210u, 0x87654321u, 0x98765432u, 0xA9876543u,
                                         0xBA987654u, 0xCBA98765u, 0xDCBA9876u, 0xEDCBA987u};
  // qzeros [2][1], v1 (zero - 1): group 0 stores 7 everywhere (zero 8); group 1 stores 0..6 and 15, and a stored
  // 15 reads as 16 (AutoGPTQ's ((w >> s) & 15) + 1)
  const std::vector<uint32_t> qzeros = {0x77777777u, 0xF6543210u};
  io::HfQuantConfig q;
  q.bits = 4;
  q.group_size = 4;
  const QuantizedLinear ql = read_one("hf_gptq_one",
                                      {i32_tensor("m.qweight", {1, 8}, qweight), i32_tensor("m.qzeros", {2, 1}, qzeros),
                                       f16_tensor("m.scales", {2, 8}, kScales)},
                                      q);
  const std::vector<float> zeros = {8, 8, 8, 8, 8, 8, 8, 8, 1, 2, 3, 4, 5, 6, 7, 16};
  EXPECT_EQ(ql.zeros, zeros);
  EXPECT_EQ(ql.g_idx, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1}));  // k / group_size without a g_idx tensor
  const std::vector<float> w = ql.dequantize();
  EXPECT_EQ(w, expected_weights(zeros, ql.g_idx));
  EXPECT_EQ(w[0], -4.0f);          // n 0, k 0: 0.5 * (0 - 8)
  EXPECT_EQ(w[4], 0.75f);          // n 0, k 4: 0.25 * (4 - 1)
  EXPECT_EQ(w[7 * 8 + 7], -2.0f);  // n 7, k 7: 1.0 * (14 - 16), the v1 zero of 2^bits
  EXPECT_EQ(w[3 * 8 + 2], -1.5f);  // n 3, k 2: 0.5 * (5 - 8)

  // gptq_v2 stores the zeros as they are; act-order: g_idx from the file
  q.format = io::HfQuantFormat::kGptqV2;
  q.desc_act = true;
  const std::vector<int32_t> g_idx = {1, 0, 1, 0, 1, 0, 1, 0};
  const QuantizedLinear v2 = read_one("hf_gptq_v2_one",
                                      {i32_tensor("m.qweight", {1, 8}, qweight),
                                       i32_tensor("m.qzeros", {2, 1}, qzeros),
                                       f16_tensor("m.scales", {2, 8}, kScales),
                                       {"m.g_idx", io::DType::kI32, {8}, bytes_of(g_idx)}},
                                      q);
  const std::vector<float> zeros_v2 = {7, 7, 7, 7, 7, 7, 7, 7, 0, 1, 2, 3, 4, 5, 6, 15};
  EXPECT_EQ(v2.zeros, zeros_v2);
  EXPECT_EQ(v2.g_idx, g_idx);
  EXPECT_EQ(v2.dequantize(), expected_weights(zeros_v2, g_idx));
}

TEST(HfSource, AwqLinearFromHandPackedWords) {
  // qweight [8][1]: row k holds columns 0, 2, 4, 6, 1, 3, 5, 7 (codes k + n) from the lowest nibble
  const std::vector<uint32_t> qweight = {0x75316420u, 0x86427531u, 0x97538642u, 0xA8649753u,
                                         0xB975A864u, 0xCA86B975u, 0xDB97CA86u, 0xECA8DB97u};
  // qzeros [2][1]: group 0 zero 8 everywhere; group 1 zero n for column n, in the same order
  const std::vector<uint32_t> qzeros = {0x88888888u, 0x75316420u};
  io::HfQuantConfig q;
  q.format = io::HfQuantFormat::kAwq;
  q.bits = 4;
  q.group_size = 4;
  const QuantizedLinear ql = read_one("hf_awq_one",
                                      {i32_tensor("m.qweight", {8, 1}, qweight), i32_tensor("m.qzeros", {2, 1}, qzeros),
                                       f16_tensor("m.scales", {2, 8}, kScales)},
                                      q);
  const std::vector<float> zeros = {8, 8, 8, 8, 8, 8, 8, 8, 0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(ql.zeros, zeros);
  const std::vector<float> w = ql.dequantize();
  EXPECT_EQ(w, expected_weights(zeros, {0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(w[0], -4.0f);         // n 0, k 0: 0.5 * (0 - 8)
  EXPECT_EQ(w[7 * 8 + 7], 7.0f);  // n 7, k 7: 1.0 * (14 - 7)
  EXPECT_EQ(w[5 * 8 + 6], 1.5f);  // n 5, k 6: 0.25 * (11 - 5)
}

// ---------------------------------------------------------------------------------------------------------
// Whole checkpoints: a 1-block fp32 synthetic model (hidden 16, 2 heads of 8, 1 KV head, intermediate 32, vocab 32)
// with every linear replaced by its quantized tensors

struct Built {
  std::string dir;
  std::map<std::string, std::vector<float>> weights;  // module -> W [out, in] the tensors encode
};

std::string base_model() {
  static const std::string dir = [] {
    SynthOptions o;
    o.out_dir = testing::scratch_dir("hf_source_base");
    o.hidden_size = 16;
    o.intermediate_size = 32;
    o.num_layers = 1;
    o.num_heads = 2;
    o.num_kv_heads = 1;
    o.vocab_size = 32;
    o.dtype = "fp32";
    o.seed = 9;
    write_synthetic_checkpoint(o);
    return o.out_dir;
  }();
  return dir;
}

using Edit = std::function<void(std::vector<io::TensorToWrite>&)>;

// Writes `name`: the base model's config with `quant` (in config.json's quantization_config, or as AutoAWQ's
// quant_config.json beside it), its dense tensors, and each linear's qweight/qzeros/scales (and g_idx for GPTQ;
// act-order: group k % G) from codes (3k + 5n + i) % 2^bits, zeros and power-of-two scales. `edit` may change the
// tensors before they are written.
Built build_quantized(const std::string& name, const io::HfQuantConfig& quant, bool awq_file = false,
                      const Edit& edit = {}) {
  const std::string base = base_model();
  const io::ModelConfig config = io::ModelConfig::load(base);
  const io::Checkpoint src = io::Checkpoint::open(base);
  Built b;
  b.dir = testing::scratch_dir(name);
  std::vector<io::TensorToWrite> tensors;
  for (const auto& n : src.names()) {
    if (n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0 && n.find("_proj.") != std::string::npos) continue;
    const auto raw = src.raw(n);
    tensors.push_back({n, src.info(n).dtype, src.info(n).shape, std::vector<std::byte>(raw.begin(), raw.end())});
  }
  const bool awq = quant.format == io::HfQuantFormat::kAwq;
  const int maxq = (1 << quant.bits) - 1;
  for (int i = 0; i < kLinearCount; ++i) {
    const auto shape = linear_shape(config, i);
    const int64_t n = shape[0], k = shape[1];
    const int64_t gs = quant.group_size == -1 ? k : quant.group_size;
    const int64_t g = (k + gs - 1) / gs;
    const std::string module = block_prefix(0) + kLinears[static_cast<size_t>(i)].module;
    std::vector<uint8_t> codes(static_cast<size_t>(k * n)), zeros(static_cast<size_t>(g * n));
    std::vector<float> scales(static_cast<size_t>(g * n));
    std::vector<int32_t> g_idx(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) {
      g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(quant.desc_act ? c % g : c / gs);
      for (int64_t r = 0; r < n; ++r)
        codes[static_cast<size_t>(c * n + r)] = static_cast<uint8_t>((3 * c + 5 * r + i) % (maxq + 1));
    }
    for (int64_t gg = 0; gg < g; ++gg)
      for (int64_t r = 0; r < n; ++r) {
        const size_t t = static_cast<size_t>(gg * n + r);
        zeros[t] = static_cast<uint8_t>(awq ? (gg + 2 * r + i) % 16 : (gg + 2 * r + i) % maxq + 1);
        scales[t] = std::ldexp(1.0f, -static_cast<int>(3 + (gg + r + i) % 4));
      }
    auto& w = b.weights[module];
    w.resize(static_cast<size_t>(n * k));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const size_t t = static_cast<size_t>(g_idx[static_cast<size_t>(c)] * n + r);
        w[static_cast<size_t>(r * k + c)] =
            scales[t] * (static_cast<float>(codes[static_cast<size_t>(c * n + r)]) - static_cast<float>(zeros[t]));
      }
    std::vector<int32_t> qweight, qzeros;
    if (awq) {
      qweight = io::awq_pack(codes.data(), k, n);
      qzeros = io::awq_pack(zeros.data(), g, n);
      tensors.push_back({module + ".qweight", io::DType::kI32, {k, n / 8}, bytes_of(qweight)});
      tensors.push_back({module + ".qzeros", io::DType::kI32, {g, n / 8}, bytes_of(qzeros)});
    } else {
      qweight = io::pack_columns(codes.data(), k, n, quant.bits);
      qzeros = io::gptq_pack_zeros(zeros.data(), g, n, quant.bits, quant.format, module);
      tensors.push_back(
          {module + ".qweight", io::DType::kI32, {io::stream_words(k, quant.bits), n}, bytes_of(qweight)});
      tensors.push_back({module + ".qzeros", io::DType::kI32, {g, io::stream_words(n, quant.bits)}, bytes_of(qzeros)});
      tensors.push_back({module + ".g_idx", io::DType::kI32, {k}, bytes_of(g_idx)});
    }
    tensors.push_back(f16_tensor(module + ".scales", {g, n}, scales));
  }
  if (edit) edit(tensors);
  io::write_safetensors(b.dir + "/model.safetensors", tensors);
  json cfg = config.raw;
  if (awq_file) {
    std::ofstream(b.dir + "/quant_config.json")
        << json{{"zero_point", true}, {"q_group_size", quant.group_size}, {"w_bit", 4}, {"version", "GEMM"}}.dump();
  } else {
    cfg["quantization_config"] = io::quantization_config_json(quant, "test");
  }
  std::ofstream(b.dir + "/config.json") << cfg.dump(2);
  return b;
}

// Loads block 0 through model_source (validation included) and compares every linear and dense tensor.
void expect_loads(const Built& b) {
  const io::ModelConfig config = io::ModelConfig::load(b.dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(b.dir);
  const auto source = model_source(ckpt, b.dir, config);
  const BlockWeights block = source->load_block(0);
  for (int i = 0; i < kLinearCount; ++i) {
    const std::string module = block_prefix(0) + kLinears[static_cast<size_t>(i)].module;
    SCOPED_TRACE(module);
    const Linear& l = block.linears[static_cast<size_t>(i)];
    ASSERT_TRUE(std::holds_alternative<QuantizedLinear>(*l.values));  // held as codes, not expanded
    const std::vector<float> w = l.to_f32();
    EXPECT_EQ(w, b.weights.at(module));
    size_t nonzero = 0;
    for (float x : w) nonzero += x != 0.0f;
    EXPECT_GT(nonzero, w.size() / 2);
  }
  const io::Checkpoint base = io::Checkpoint::open(base_model());
  EXPECT_EQ(block.input_norm, base.read_f32("model.layers.0.input_layernorm.weight"));
  EXPECT_EQ(block.post_norm, base.read_f32("model.layers.0.post_attention_layernorm.weight"));
  EXPECT_EQ(source->embed_tokens(), base.read_f32("model.embed_tokens.weight"));
  EXPECT_EQ(source->lm_head(), base.read_f32("lm_head.weight"));
  EXPECT_NE(source->describe().find(b.dir), std::string::npos);
}

io::HfQuantConfig gptq(int bits, io::HfQuantFormat format, int64_t group_size, bool desc_act) {
  io::HfQuantConfig q;
  q.format = format;
  q.bits = bits;
  q.group_size = group_size;
  q.desc_act = desc_act;
  return q;
}

TEST(HfSource, GptqCheckpointsLoad) {
  {
    SCOPED_TRACE("4-bit v1, group 8");
    expect_loads(build_quantized("hf_gptq4", gptq(4, io::HfQuantFormat::kGptq, 8, false)));
  }
  {
    SCOPED_TRACE("3-bit v2, act-order (K = 16: 48 bits, qweight has ceil rows)");
    expect_loads(build_quantized("hf_gptq3", gptq(3, io::HfQuantFormat::kGptqV2, 8, true)));
  }
  {
    SCOPED_TRACE("2-bit v2, one group per row");
    expect_loads(build_quantized("hf_gptq2", gptq(2, io::HfQuantFormat::kGptqV2, -1, false)));
  }
  {
    SCOPED_TRACE("8-bit v1, group 16, no g_idx tensors");
    expect_loads(build_quantized("hf_gptq8", gptq(8, io::HfQuantFormat::kGptq, 16, false), false,
                                 [](std::vector<io::TensorToWrite>& t) {
                                   std::erase_if(t, [](const auto& x) { return x.name.ends_with(".g_idx"); });
                                 }));
  }
}

TEST(HfSource, AwqCheckpointsLoad) {
  io::HfQuantConfig q;
  q.format = io::HfQuantFormat::kAwq;
  q.group_size = 8;
  {
    SCOPED_TRACE("config.json quantization_config");
    expect_loads(build_quantized("hf_awq", q));
  }
  {
    SCOPED_TRACE("AutoAWQ's quant_config.json beside config.json");
    expect_loads(build_quantized("hf_awq_file", q, true));
  }
}

TEST(HfSource, LogitsEqualThoseOfTheDequantizedWeights) {
  const Built b = build_quantized("hf_gptq_logits", gptq(4, io::HfQuantFormat::kGptq, 8, true));
  // the same model with each linear as an fp32 .weight holding the dequantized values
  const std::string dense = testing::scratch_dir("hf_dense_logits");
  std::filesystem::copy_file(base_model() + "/config.json", dense + "/config.json");
  const io::Checkpoint src = io::Checkpoint::open(base_model());
  std::vector<io::TensorToWrite> tensors;
  for (const auto& n : src.names()) {
    const auto raw = src.raw(n);
    io::TensorToWrite t{n, src.info(n).dtype, src.info(n).shape, std::vector<std::byte>(raw.begin(), raw.end())};
    const std::string module = n.substr(0, n.size() - 7);  // without ".weight"
    if (b.weights.count(module)) t.bytes = bytes_of(b.weights.at(module));
    tensors.push_back(std::move(t));
  }
  io::write_safetensors(dense + "/model.safetensors", tensors);
  RunOptions run;
  run.backend = BackendKind::kCpu;
  run.threads = 1;
  const std::vector<int32_t> tokens = {1, 5, 9, 2, 31, 7, 7, 0, 12, 30};
  const std::vector<float> quantized = sequence_logits(b.dir, tokens, run);
  const std::vector<float> reference = sequence_logits(dense, tokens, run);
  ASSERT_EQ(quantized.size(), tokens.size() * 32);
  EXPECT_EQ(quantized, reference);
  EXPECT_NE(quantized, sequence_logits(base_model(), tokens, run));  // the quantized weights are not the base's
}

// ---------------------------------------------------------------------------------------------------------
// Refusals: one line naming the file or config and the tensor or field

void expect_refused(const Built& b, const std::vector<std::string>& parts) {
  testing::expect_user_error(
      [&] {
        const io::ModelConfig config = io::ModelConfig::load(b.dir);
        const io::Checkpoint ckpt = io::Checkpoint::open(b.dir);
        model_source(ckpt, b.dir, config)->load_block(0);
      },
      parts);
}

Edit replace(const std::string& name, io::TensorToWrite with) {
  return [name, with](std::vector<io::TensorToWrite>& t) {
    for (auto& x : t)
      if (x.name == name) x = with;
  };
}

Edit drop(const std::string& name) {
  return [name](std::vector<io::TensorToWrite>& t) { std::erase_if(t, [&](const auto& x) { return x.name == name; }); };
}

TEST(HfSource, RefusesWrongQweightShape) {
  // up_proj [32, 16] at 4 bits: qweight [2, 32]; written as [1, 64]
  const std::string name = "model.layers.0.mlp.up_proj.qweight";
  expect_refused(build_quantized("hf_bad_qweight", gptq(4, io::HfQuantFormat::kGptq, 8, false), false,
                                 replace(name, i32_tensor(name, {1, 64}, std::vector<uint32_t>(64, 0x11111111u)))),
                 {"model.safetensors", name, "[1, 64]", "expected [2, 32]"});
}

TEST(HfSource, RefusesMissingScales) {
  const std::string name = "model.layers.0.self_attn.k_proj.scales";
  expect_refused(build_quantized("hf_no_scales", gptq(4, io::HfQuantFormat::kGptq, 8, false), false, drop(name)),
                 {name, "is missing", "[2, 8]"});
}

TEST(HfSource, RefusesBitsFive) {
  Built b = build_quantized("hf_bits5", gptq(4, io::HfQuantFormat::kGptq, 8, false));
  json cfg = json::parse(std::ifstream(b.dir + "/config.json"));
  cfg["quantization_config"]["bits"] = 5;
  std::ofstream(b.dir + "/config.json") << cfg.dump();
  expect_refused(b, {"config.json: quantization_config", "field bits", "5"});
}

TEST(HfSource, RefusesOtherMalformedCheckpoints) {
  const auto v1 = gptq(4, io::HfQuantFormat::kGptq, 8, false);
  {
    SCOPED_TRACE("quantized tensors without a quantization config");
    Built b = build_quantized("hf_no_config", v1);
    std::filesystem::copy_file(base_model() + "/config.json", b.dir + "/config.json",
                               std::filesystem::copy_options::overwrite_existing);
    expect_refused(b, {"model.layers.0.self_attn.q_proj.qweight", "quantization_config"});
  }
  {
    SCOPED_TRACE("a tensor the model does not use");
    const std::string extra = "model.layers.0.self_attn.q_norm.weight";
    expect_refused(build_quantized("hf_extra", v1, false,
                                   [&](std::vector<io::TensorToWrite>& t) {
                                     t.push_back(f16_tensor(extra, {8}, std::vector<float>(8, 1.0f)));
                                   }),
                   {extra, "not used"});
  }
  {
    SCOPED_TRACE("act-order without g_idx");
    expect_refused(build_quantized("hf_no_gidx", gptq(4, io::HfQuantFormat::kGptq, 8, true), false,
                                   drop("model.layers.0.mlp.down_proj.g_idx")),
                   {"model.layers.0.mlp.down_proj.g_idx", "is missing", "desc_act"});
  }
  {
    SCOPED_TRACE("g_idx outside the groups");
    const std::string name = "model.layers.0.self_attn.o_proj.g_idx";
    std::vector<int32_t> g(16, 0);
    g[5] = 2;  // G = 2
    expect_refused(build_quantized("hf_bad_gidx", gptq(4, io::HfQuantFormat::kGptq, 8, true), false,
                                   replace(name, {name, io::DType::kI32, {16}, bytes_of(g)})),
                   {name, "[5] = 2", "outside [0, 2)"});
  }
  {
    SCOPED_TRACE("qzeros of the wrong dtype");
    const std::string name = "model.layers.0.mlp.gate_proj.qzeros";
    expect_refused(build_quantized("hf_bad_dtype", v1, false,
                                   replace(name, f16_tensor(name, {2, 4}, std::vector<float>(8, 1.0f)))),
                   {name, "dtype F16", "expected I32"});
  }
  {
    SCOPED_TRACE("AWQ group_size that does not divide K");
    io::HfQuantConfig q;
    q.format = io::HfQuantFormat::kAwq;
    q.group_size = 8;
    Built b = build_quantized("hf_awq_gs", q);
    json cfg = json::parse(std::ifstream(b.dir + "/config.json"));
    cfg["quantization_config"]["group_size"] = 6;
    std::ofstream(b.dir + "/config.json") << cfg.dump();
    expect_refused(b, {"in_features 16", "group_size 6"});
  }
}

}  // namespace
}  // namespace pipequant
