"""A plain numpy forward of the Llama-layout families as transformers computes them, independent of pipequant, for
the end-to-end tests: Llama (biases per attention_bias and mlp_bias), Qwen2 (q/k/v biases), Qwen3 (per-head q/k
norms), and the Mixture-of-Experts MLPs of Mixtral, Qwen3-MoE and Qwen2-MoE (router softmax, top k, renormalized
with norm_topk_prob or always for Mixtral, and Qwen2-MoE's gated shared expert). float64 throughout."""
import numpy as np

import pq


def read_tensors(path):
    """{name: float64 array} of one .safetensors file (F32, F16 or BF16)."""
    return {k: v.astype(np.float64) for k, v in pq.read_safetensors(path).items()}


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def moe_block(cfg, b):
    """Whether block b's MLP is the experts, as transformers' Qwen2/Qwen3-MoE decoder layer decides (Mixtral: all)."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    return (experts > 0 and b not in cfg.get("mlp_only_layers", [])
            and (b + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def moe_mlp(cfg, t, p, xn, skip=None):
    """The MoE MLP of block prefix p on xn [seq, hidden]. skip "norm_topk_prob" flips the renormalization,
    "shared_expert" leaves the shared expert out (to show that the test sees either)."""
    mixtral = cfg["architectures"] == ["MixtralForCausalLM"]
    router, experts = (p + "block_sparse_moe.gate", p + "block_sparse_moe.experts.") if mixtral else (
        p + "mlp.gate", p + "mlp.experts.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    renormalize = True if mixtral else cfg.get("norm_topk_prob", False)
    if skip == "norm_topk_prob":
        renormalize = not renormalize

    def swiglu(x, prefix):
        g, u, d = (t[prefix + n + ".weight"] for n in names)
        return (silu(x @ g.T) * (x @ u.T)) @ d.T

    logits = xn @ t[router + ".weight"].T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :cfg["num_experts_per_tok"]]
    weights = np.take_along_axis(probs, top, 1)
    if renormalize:
        weights /= weights.sum(1, keepdims=True)
    out = np.zeros_like(xn)
    for e in range(probs.shape[1]):
        rows, j = np.nonzero(top == e)
        if len(rows):
            out[rows] += weights[rows, j][:, None] * swiglu(xn[rows], f"{experts}{e}.")
    if p + "mlp.shared_expert.gate_proj.weight" in t and skip != "shared_expert":
        gate = 1.0 / (1.0 + np.exp(-(xn @ t[p + "mlp.shared_expert_gate.weight"].T)))  # [seq, 1]
        out += gate * swiglu(xn, p + "mlp.shared_expert.")
    return out


def perplexity(cfg, t, ids, seq, skip=None):
    """exp(mean NLL) of non-overlapping windows of seq tokens, positions 0..seq-2 predicting 1..seq-1, with every
    bias and q/k norm the tensors hold. skip: a module whose bias (or a q/k norm tensor) to leave out, or
    "norm_topk_prob" / "shared_expert" (moe_mlp)."""
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hidden // heads
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(seq)[:, None] * inv_freq[None, :]  # [seq, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    lm_head = t.get("lm_head.weight", t["model.embed_tokens.weight"])

    def lin(x, p, module):
        y = x @ t[p + module + ".weight"].T
        b = t.get(p + module + ".bias")
        return y if b is None or module == skip else y + b

    def qk_norm(x, name):  # Qwen3: RMSNorm over each head, where the checkpoint has the norm
        return x if name not in t or name == skip else rms_norm(x, t[name], eps)

    def rope(x):  # [seq, heads, hd], rotate_half
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def attention(xn, p):
        q = qk_norm(lin(xn, p, "self_attn.q_proj").reshape(seq, heads, hd), p + "self_attn.q_norm.weight")
        k = qk_norm(lin(xn, p, "self_attn.k_proj").reshape(seq, kv, hd), p + "self_attn.k_norm.weight")
        q, k = rope(q), rope(k)
        v = lin(xn, p, "self_attn.v_proj").reshape(seq, kv, hd)
        attn = np.empty((seq, heads, hd))
        for h in range(heads):
            g = h // (heads // kv)
            s = q[:, h, :] @ k[:, g, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(1, keepdims=True))
            attn[:, h, :] = (s / s.sum(1, keepdims=True)) @ v[:, g, :]
        return lin(attn.reshape(seq, heads * hd), p, "self_attn.o_proj")

    def mlp(xn, p, b):
        if moe_block(cfg, b):
            return moe_mlp(cfg, t, p, xn, skip)
        gate, up = lin(xn, p, "mlp.gate_proj"), lin(xn, p, "mlp.up_proj")
        return lin(silu(gate) * up, p, "mlp.down_proj")

    nll, count = 0.0, 0
    for w in range(len(ids) // seq):
        tok = ids[w * seq:(w + 1) * seq]
        x = t["model.embed_tokens.weight"][tok]
        for b in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{b}."
            x = x + attention(rms_norm(x, t[p + "input_layernorm.weight"], eps), p)
            x = x + mlp(rms_norm(x, t[p + "post_attention_layernorm.weight"], eps), p, b)
        logits = rms_norm(x, t["model.norm.weight"], eps) @ lm_head.T
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= logp[np.arange(seq - 1), tok[1:]].sum()
        count += seq - 1
    return float(np.exp(nll / count))
