"""Writes a sparse Qwen3-MoE-layout checkpoint of a large shape for `pipequant plan`: config.json, bf16 safetensors
files whose headers are real and whose data regions are holes, and the index. Shapes: Qwen3-235B-A22B, or a
DeepSeek-V3-sized expert count in the Qwen3-MoE layout (256 experts, top 8, 2048 wide, three dense blocks first;
its attention as grouped-query attention of the same width: pipequant does not model MLA, so the attention terms are
an approximation while the expert terms, most of the memory, are the real sizes).

    python3 scripts/sparse_moe_checkpoint.py qwen3-235b-a22b DIR
    python3 scripts/sparse_moe_checkpoint.py deepseek-v3-experts DIR
"""
import sys

from sparse_checkpoint import write_sparse_checkpoint

SHAPES = {
    # Qwen/Qwen3-235B-A22B config.json
    "qwen3-235b-a22b": dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                            mlp_only_layers=[], decoder_sparse_step=1, tie_word_embeddings=False),
    # deepseek-ai/DeepSeek-V3's expert and dense sizes (n_routed_experts 256, num_experts_per_tok 8,
    # moe_intermediate_size 2048, first_k_dense_replace 3, intermediate_size 18432, hidden 7168, 61 layers)
    "deepseek-v3-experts": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, head_dim=128,
                                num_experts=256, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=129280,
                                mlp_only_layers=[0, 1, 2], decoder_sparse_step=1, tie_word_embeddings=False),
}


def block_tensors(c, b):
    h, hd = c["hidden_size"], c["head_dim"]
    p = f"model.layers.{b}."
    t = [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
         (p + "self_attn.q_norm.weight", [hd]), (p + "self_attn.k_norm.weight", [hd]),
         (p + "self_attn.q_proj.weight", [c["num_attention_heads"] * hd, h]),
         (p + "self_attn.k_proj.weight", [c["num_key_value_heads"] * hd, h]),
         (p + "self_attn.v_proj.weight", [c["num_key_value_heads"] * hd, h]),
         (p + "self_attn.o_proj.weight", [h, c["num_attention_heads"] * hd])]

    def mlp(prefix, inter):
        return [(prefix + "gate_proj.weight", [inter, h]), (prefix + "up_proj.weight", [inter, h]),
                (prefix + "down_proj.weight", [h, inter])]

    if b in c["mlp_only_layers"]:
        return t + mlp(p + "mlp.", c["intermediate_size"])
    t.append((p + "mlp.gate.weight", [c["num_experts"], h]))
    for e in range(c["num_experts"]):
        t += mlp(f"{p}mlp.experts.{e}.", c["moe_intermediate_size"])
    return t


def write(shape, d, files=16):
    c = dict(SHAPES[shape], architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", rms_norm_eps=1e-6,
             rope_theta=1000000.0, max_position_embeddings=40960, torch_dtype="bfloat16", attention_bias=False)
    return write_sparse_checkpoint(d, c, lambda b: block_tensors(c, b), files)


if __name__ == "__main__":
    size = write(sys.argv[1], sys.argv[2])
    print(f"{sys.argv[2]}: {size / 1e9:.1f} GB apparent")
