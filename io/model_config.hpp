#pragma once
// config.json of a LlamaForCausalLM-style checkpoint (Llama, Mistral, Qwen2, Qwen3), and the experts of the
// Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace pipequant::io {

// rope_scaling of Llama 3.x ("rope_type": "llama3"); "linear" and "default" are also understood.
struct RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The architectures name of a model_type pipequant reads ("llama" -> "LlamaForCausalLM", "qwen3", "mixtral", ...);
// empty for any other.
std::string architecture_of_model_type(const std::string& model_type);

struct ModelConfig {
  std::string path;  // the config.json it came from
  std::string architecture = "LlamaForCausalLM";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // defaults to num_heads when absent
  int64_t head_dim = 0;      // defaults to hidden_size / num_heads when absent
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;  // 0 when absent
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q, k, v and o_proj carry a bias (always false for MistralForCausalLM)
  bool mlp_bias = false;        // gate, up and down_proj carry a bias (always false for MistralForCausalLM)
  bool qkv_bias = false;        // q, k and v_proj carry a bias, o_proj none (Qwen2ForCausalLM, Qwen2-MoE, always)
  bool qk_norm = false;         // an RMSNorm [head_dim] over each head of q and of k before RoPE (Qwen3, Qwen3-MoE)
  // Mixture-of-Experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the MLP of an MoE block (moe_block(b)) is `num_experts`
  // SwiGLU experts, of which a router picks `experts_per_token` per token; 0: every block has the dense MLP.
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t expert_intermediate_size = 0;  // each expert's width: moe_intermediate_size (Qwen MoE), else intermediate_size
  bool norm_topk_prob = true;            // the top-k weights renormalized to sum 1 (Mixtral always; Qwen MoE's field)
  std::vector<int64_t> mlp_only_layers;  // blocks with the dense MLP of width intermediate_size (Qwen MoE)
  int64_t decoder_sparse_step = 1;       // an MoE MLP on blocks b with (b + 1) % step == 0 (Qwen MoE)
  // A shared expert beside the routed ones, run on every token of an MoE block (Qwen2-MoE's shared_expert, gated by
  // sigmoid(x W_shared_expert_gate^T)): its SwiGLU width, 0 for none.
  int64_t shared_expert_intermediate_size = 0;
  bool moe() const { return num_experts > 0; }
  bool shared_expert() const { return shared_expert_intermediate_size > 0; }
  // Whether block b's MLP is the experts (else the dense MLP), as Qwen3-MoE's decoder layer decides it.
  bool moe_block(int64_t b) const;
  // Tokens each position attends to (sliding_window), 0 for full causal attention: absent, null, or turned off by
  // use_sliding_window false. The forward computes full attention, so check_seq_len refuses a shorter window.
  int64_t sliding_window = 0;
  std::string torch_dtype;  // as written, may be empty
  RopeScaling rope_scaling;
  nlohmann::json raw;  // the whole file, stored in the output

  // Reads and validates `path` (a config.json or a directory holding one). Throws UserError
  // "<file>: field <name>: <what was expected>" for a missing or wrong field.
  static ModelConfig load(const std::string& path);
  // Sets `architecture` and what its modeling code fixes whatever a file says: Qwen2's q/k/v biases, Qwen3's q/k
  // norms, no bias fields where the architecture reads none. The one place of these per-family facts.
  void set_architecture(const std::string& name);
  bool reads_attention_bias() const;  // config.json's attention_bias means something (Llama, Qwen3)
  bool reads_mlp_bias() const;        // config.json's mlp_bias means something (Llama)
  bool reads_experts() const;         // config.json names experts (Mixtral, Qwen2-MoE, Qwen3-MoE)
  // config.json's num_experts, moe_intermediate_size, norm_topk_prob, mlp_only_layers and decoder_sparse_step mean
  // something (Qwen2-MoE, Qwen3-MoE); Mixtral's experts are num_local_experts of width intermediate_size instead.
  bool reads_qwen_moe_fields() const;
  bool reads_shared_expert() const;  // config.json's shared_expert_intermediate_size means something (Qwen2-MoE)
  static ModelConfig from_json(const nlohmann::json& j, const std::string& origin);
  // Throws UserError "<file>: field sliding_window: ..." when the model attends over fewer than seq_len tokens
  // (a sliding window): the forward computes full causal attention over --seq-len tokens. Called where the
  // sequence length is known (quantize, eval).
  void check_seq_len(int64_t seq_len) const;
  nlohmann::json to_json() const;  // a config.json for this model (synth writes it)
};

}  // namespace pipequant::io
