#pragma once
// The Llama model as pipequant sees it: tensor names, per-block weights, where weights come from (the
// original checkpoint or a quantized output), and the block forward on a backend.

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "io/hf_quant.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "kernels/backend.hpp"
#include "src/quant.hpp"

namespace pipequant {

// The linears of a block in true-sequential order: the module path under model.layers.<i>. and the linear group
// (linears of one group read the same input and share one Hessian). The one table of them.
struct LinearSpec {
  const char* module;
  int group;
};
inline constexpr int kLinearGroups = 4;
inline constexpr std::array<const char*, kLinearGroups> kLinearGroupNames = {"qkv", "o", "gate_up", "down"};
inline constexpr std::array<LinearSpec, 7> kLinears = {{{"self_attn.q_proj", 0},
                                                        {"self_attn.k_proj", 0},
                                                        {"self_attn.v_proj", 0},
                                                        {"self_attn.o_proj", 1},
                                                        {"mlp.gate_proj", 2},
                                                        {"mlp.up_proj", 2},
                                                        {"mlp.down_proj", 3}}};
inline constexpr int kLinearCount = static_cast<int>(kLinears.size());

std::string block_prefix(int64_t block);  // "model.layers.<block>."

// Whether linear `module_index` (kLinears) carries a bias, as the modeling code of the config's architecture builds
// it: Llama's q, k, v and o_proj bias=attention_bias, gate, up and down_proj bias=mlp_bias; Qwen2's q, k and v_proj
// always, nothing else; Mistral's none.
bool has_bias(const io::ModelConfig& config, int module_index);

// The 16-bit values of a bf16 or fp16 checkpoint tensor: exact in fp32.
struct HalfValues {
  std::vector<uint16_t> bits;
  kernels::HalfFormat format = kernels::HalfFormat::kBF16;
};
// A linear's weights as they are held, as compactly as they are exact: fp32, 16-bit, or quantized codes with
// their tables. A 405B-class block is 6.4 GB in bf16 and 12.7 GB in fp32: only a range of rows is ever expanded.
using WeightValues = std::variant<std::vector<float>, HalfValues, QuantizedLinear>;

// A linear's weights [out, in] and its optional bias [out]. Copies share the values.
struct Linear {
  int64_t out = 0;
  int64_t in = 0;
  std::shared_ptr<const WeightValues> values;
  std::vector<float> bias;

  static Linear of(int64_t out, int64_t in, WeightValues values);
  // Rows [r0, r1) in fp32 into dst [r1 - r0, in]: bit for bit what the fp32 weights would hold.
  void rows_f32(int64_t r0, int64_t r1, float* dst) const;
  std::vector<float> to_f32() const;
  // The fp32 values when held as such (no expansion needed), else null.
  const float* f32() const;
  uint64_t held_bytes() const;
};

// The per-head norms of q and k (config qk_norm, Qwen3): their names under model.layers.<i>.
inline constexpr std::array<const char*, 2> kQkNormTensors = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"};

// One expert of a Mixture-of-Experts MLP (expert_modules: Mixtral's w1, w3, w2; Qwen MoE's gate, up, down_proj): a
// SwiGLU MLP of width expert_intermediate_size (a shared expert: shared_expert_intermediate_size).
struct ExpertWeights {
  Linear gate;  // [intermediate, hidden]
  Linear up;    // [intermediate, hidden]
  Linear down;  // [hidden, intermediate]
};
// An expert every token of an MoE block goes through beside the routed ones (config shared_expert()), its output
// scaled by sigmoid(x gate^T) where the family has a gate (Qwen2-MoE's shared_expert_gate), else added as it is.
struct SharedExpertWeights {
  ExpertWeights mlp;
  std::vector<float> gate;  // [hidden]: shared_expert_gate_module(config), empty where the family has none
};
// The MLP of an MoE block (config moe_block(b)): the router, the experts and the optional shared expert
// (src/moe.hpp runs them).
struct MoeWeights {
  std::vector<float> router;  // [num_experts, hidden]: router_module(config)
  std::vector<ExpertWeights> experts;
  std::optional<SharedExpertWeights> shared;  // config shared_expert()
  bool empty() const { return experts.empty(); }
};

// The family's module names under model.layers.<i>.: the router ("block_sparse_moe.gate" for Mixtral, "mlp.gate" for
// Qwen MoE), expert e's gate, up and down linears ("block_sparse_moe.experts.<e>.w1", "w3", "w2"; Qwen MoE:
// "mlp.experts.<e>.gate_proj", "up_proj", "down_proj"), the shared expert's ("mlp.shared_expert.gate_proj", ...) and
// its gate ("mlp.shared_expert_gate", [1, hidden]; empty where the family has none). The one place of these names.
std::string router_module(const io::ModelConfig& config);
std::array<std::string, 3> expert_modules(const io::ModelConfig& config, int64_t e);
std::array<std::string, 3> shared_expert_modules(const io::ModelConfig& config);
std::string shared_expert_gate_module(const io::ModelConfig& config);
// The linears of kLinears block b has: the attention's four in an MoE block (its MLP is the experts), else seven.
int block_linear_count(const io::ModelConfig& config, int64_t block);
// The quantized linears of block b, in the order of the output's records: those of kLinears it has, then each
// expert's gate, up and down (expert_modules).
std::vector<std::string> block_modules(const io::ModelConfig& config, int64_t block);
// The experts an MoE block quantizes: the routed ones, then the shared expert (e = num_experts) where it has one;
// expert e's gate, up and down module names.
int64_t solved_experts(const io::ModelConfig& config);
std::array<std::string, 3> solved_expert_modules(const io::ModelConfig& config, int64_t e);

struct BlockWeights {
  int64_t index = 0;
  std::vector<float> input_norm;  // [hidden]
  std::vector<float> post_norm;   // [hidden]
  std::vector<float> q_norm;      // [head_dim] (config qk_norm), else empty
  std::vector<float> k_norm;      // [head_dim] (config qk_norm), else empty
  std::array<Linear, kLinearCount> linears;  // in kLinears order (an MoE block: the attention's four only)
  MoeWeights moe;                            // an MoE block's MLP (config moe_block(index)), else empty
  Linear& linear(const std::string& module);
};

// Rotary inverse frequencies [head_dim / 2] including Llama 3 rope scaling.
std::vector<float> rope_inv_freq(const io::ModelConfig& config);

// Expected [out, in] of a module for this config.
std::array<int64_t, 2> linear_shape(const io::ModelConfig& config, int module_index);

// Checks that every tensor the config needs is in the checkpoint with the right shape and a float dtype;
// throws UserError naming the checkpoint, the tensor and the expected shape. With `quant` (a GPTQ or AWQ
// checkpoint) each linear is <module>.{qweight,qzeros,scales,g_idx} instead of <module>.weight (src/hf_source.hpp).
void validate_checkpoint(const io::Checkpoint& checkpoint, const io::ModelConfig& config,
                         const io::HfQuantConfig* quant = nullptr);

// A dense output tensor (F32, F16 or BF16) in fp32; `where` names its file for errors.
std::vector<float> dense_to_f32(const io::DenseTensor& t, const std::string& where);

// Where weights come from.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual BlockWeights load_block(int64_t block) const = 0;
  virtual std::vector<float> embed_tokens() const = 0;  // [vocab, hidden]
  virtual std::vector<float> final_norm() const = 0;    // [hidden]
  virtual std::vector<float> lm_head() const = 0;       // [vocab, hidden] (the embedding when tied)
  virtual std::string describe() const = 0;
};

// quant: a GPTQ or AWQ checkpoint (validated with it), whose linears are read as codes and tables (src/hf_source.hpp).
std::unique_ptr<WeightSource> checkpoint_source(const io::Checkpoint& checkpoint, const io::ModelConfig& config,
                                                const io::HfQuantConfig* quant = nullptr);
// A quantized output directory: packed linears dequantized on the fly, dense tensors as stored.
std::unique_ptr<WeightSource> quantized_source(const std::string& out_dir, const io::ModelConfig& config);

class MoeMlp;


// Where a partial block forward stops: the input of each linear group, or the block output.
enum class Until { kQkvInput = 0, kOInput = 1, kGateUpInput = 2, kDownInput = 3, kOutput = 4 };

// Runs blocks on micro-batches of samples. Owns the block's weights in backend memory and the scratch for
// one micro-batch (bounded by micro_batch x seq rows).
class BlockRunner {
 public:
  // half: run the seven linears as 16-bit GEMMs (weights stored in that format on the backend, inputs rounded
  // to it, fp32 accumulation and outputs); nullopt: fp32 GEMMs.
  BlockRunner(kernels::Backend& backend, const io::ModelConfig& config, int64_t seq, int64_t micro_batch,
              std::optional<kernels::HalfFormat> half = std::nullopt);
  // Takes a block's weights (replacing the previous block's). On a backend whose memory is the host's, the
  // linears stay as held (16-bit or quantized) and are expanded to fp32 a tile of rows at a time for each GEMM;
  // otherwise they are uploaded in fp32 (or the 16-bit compute format).
  void set_block(const BlockWeights& block);
  // Replaces one linear's weights (after it was quantized); the bias stays.
  void set_linear(int module_index, const Linear& w);
  void set_linear(int module_index, std::vector<float> w);
  // Replaces the block's norms (AWQ folds its scales into them).
  void set_norms(const std::vector<float>& input_norm, const std::vector<float>& post_norm);
  // The weights the block holds now (the source's, or quantized where set_linear replaced them).
  const Linear& linear(int module_index) const { return held_[static_cast<size_t>(module_index)]; }
  // x: host activations [samples * seq, hidden] of `samples` <= micro_batch samples. Runs until `until`
  // and returns the activations there (backend memory, [samples * seq, width(until)]), valid until the
  // next call.
  const float* forward(const float* x, int64_t samples, Until until);
  int64_t width(Until until) const;
  int64_t seq() const { return seq_; }
  int64_t micro_batch() const { return micro_batch_; }
  kernels::Backend& backend() { return backend_; }
  // The MoE MLP of the block set, when it is an MoE block; else null.
  MoeMlp* moe() { return moe_block_ ? moe_.get() : nullptr; }

 private:
  kernels::Backend& backend_;
  const io::ModelConfig& config_;
  int64_t seq_;
  int64_t micro_batch_;
  kernels::Buffer<float> inv_freq_;
  kernels::Buffer<float> norm1_, norm2_;
  kernels::Buffer<float> q_norm_, k_norm_;  // [head_dim] each (config qk_norm)
  std::shared_ptr<MoeMlp> moe_;              // the MLP of MoE blocks (config moe())
  bool moe_block_ = false;                   // the block set is an MoE block
  std::optional<kernels::HalfFormat> half_;
  bool expand_ = false;                                     // GEMMs on tiles expanded from held_ (host backend)
  std::array<Linear, kLinearCount> held_;                   // the block's linears as held
  std::vector<float> tile_;                                 // one expanded tile of rows (expand_)
  std::array<kernels::Buffer<float>, kLinearCount> w_;      // fp32 weights (half_ empty, !expand_)
  std::array<kernels::Buffer<uint16_t>, kLinearCount> wh_;  // 16-bit weights (half_ set)
  std::array<kernels::Buffer<float>, kLinearCount> bias_;
  std::array<bool, kLinearCount> has_bias_{};
  // scratch for one micro-batch
  kernels::Buffer<float> x_, xn_, q_, k_, v_, attn_, h_, g_, u_;

  void upload_linear(int module_index);
  void run_linear(int module_index, const float* in, float* out, int64_t rows);
};

// Rows per expanded tile of a linear with `in` inputs (BlockRunner, solves): at most kExpandTileFloats floats.
inline constexpr int64_t kExpandTileFloats = int64_t{1} << 24;
inline int64_t expand_tile_rows(int64_t in) { return std::max<int64_t>(1, kExpandTileFloats / std::max<int64_t>(in, 1)); }
// Rows per tile of a solve (StageWorker::solve_rows): W is expanded to fp32 and solved this many rows at a time
// (GPTQ rows are independent given the factor), so a linear's fp32 copy never exists whole (a 405B down_proj is
// 3.5 GB in fp32).
inline constexpr int64_t kSolveTileFloats = int64_t{1} << 26;
inline int64_t solve_tile_rows(int64_t in) { return std::max<int64_t>(1, kSolveTileFloats / std::max<int64_t>(in, 1)); }

// The head: final norm and lm_head on the backend, for the loss and for logits.
class Head {
 public:
  Head(kernels::Backend& backend, const io::ModelConfig& config, const WeightSource& source, int64_t max_rows);
  // Logits [rows, vocab] of hidden states x [rows, hidden] (host), into host memory.
  void logits(const float* x, int64_t rows, float* out);
  // Sum over rows t of -log p(targets[t] | x[t]) for hidden states x [rows, hidden] (host), in double.
  double nll(const float* x, const int32_t* targets, int64_t rows);

 private:
  kernels::Backend& backend_;
  const io::ModelConfig& config_;
  int64_t max_rows_;
  kernels::Buffer<float> norm_, lm_head_, x_, logits_;
};

// Embedding rows of tokens [count] from the table [vocab, hidden] into out [count, hidden].
void embed(const std::vector<float>& table, int64_t hidden, const int32_t* tokens, int64_t count, float* out);

}  // namespace pipequant
