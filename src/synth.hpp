#pragma once
// Synthetic checkpoints and token files: deterministic random weights in the Hugging Face layout of a Llama-layout
// family (Llama, Mistral, Qwen2, Qwen3, and the Mixture-of-Experts Mixtral, Qwen2-MoE, Qwen3-MoE), for tests and
// benchmarks at sizes no real checkpoint at hand has.

#include <cstdint>
#include <string>
#include <vector>

namespace pipequant {

struct SynthOptions {
  std::string out_dir;
  // or MistralForCausalLM, Qwen2ForCausalLM (biases on q, k, v), Qwen3ForCausalLM (q/k norms), MixtralForCausalLM,
  // Qwen2MoeForCausalLM, Qwen3MoeForCausalLM (experts, as the fields below say)
  std::string architecture = "LlamaForCausalLM";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t vocab_size = 0;
  std::string dtype = "bf16";  // bf16 | fp16 | fp32
  uint64_t seed = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q, k, v and o_proj get random biases (config attention_bias true)
  bool mlp_bias = false;        // gate, up and down_proj get random biases (config mlp_bias true)
  // The experts of a Mixture-of-Experts architecture (required there, refused elsewhere): num_experts and
  // experts_per_token for all; for Qwen MoE the experts' width, norm_topk_prob, mlp_only_layers and
  // decoder_sparse_step (config fields of the same names); for Qwen2-MoE the shared expert's width.
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  std::vector<int64_t> mlp_only_layers;
  int64_t decoder_sparse_step = 1;
  int64_t shared_expert_intermediate_size = 0;
};

// Writes out_dir/config.json and out_dir/model.safetensors (creating out_dir). The same options give the
// same bytes on every platform. Throws UserError for invalid options or an unwritable directory.
void write_synthetic_checkpoint(const SynthOptions& options);

// Writes `count` int32 token ids in [0, vocab) as a 1-D .npy file, drawn from a Zipf-like distribution
// (p(rank r) ~ 1/(r+1)^1.1, ranks shuffled over the vocabulary) so that some tokens are frequent, as in text.
void write_synthetic_tokens(const std::string& path, int64_t count, int64_t vocab, uint64_t seed);

}  // namespace pipequant
