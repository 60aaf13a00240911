"""A Llama with biases on all seven linears (attention_bias and mlp_bias true, as transformers' LlamaForCausalLM
builds it: q, k, v AND o_proj with bias=attention_bias; gate, up, down with bias=mlp_bias) quantizes and
evaluates, and both perplexities equal a plain numpy forward of the same block math to 1e-4 relative:
the original checkpoint, and the quantized output (dequantized from its HDF5 datasets, biases read from the
shard). Every bias matters: the reference without any one of them (o_proj's included) misses the perplexity
pipequant prints by far more than the tolerance, and the checkpoint with its biases zeroed evaluates to
another perplexity. Then a Qwen2ForCausalLM (biases on q, k and v_proj only, as its modeling code builds them)
and a Qwen3ForCausalLM (RMSNorm over each head of q and k before RoPE, q_norm and k_norm; attention biases) the
same way: the original and the quantized output against the same numpy forward."""
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import llama_reference  # noqa: E402
import pq  # noqa: E402

# fp32 forward against a float64 reference over 4 windows of 64 tokens: they agree to about 1e-7 relative; leaving
# out one bias moves the perplexity by 5e-3 or more
TOL = 1e-4
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
SEQ, WINDOWS = 64, 4


def write_safetensors(path, tensors):
    header, data = {}, b""
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def perplexity(cfg, t, ids, skip_bias=None):
    """The numpy reference (scripts/llama_reference.py) over windows of SEQ tokens, without module `skip_bias`'s
    bias (or the q/k norm tensor of that name)."""
    return llama_reference.perplexity(cfg, t, ids, SEQ, skip_bias)


def unpack_along_first(words, bits, n):
    """int32 words [rows, cols] holding codes packed along the first axis, lowest bits first -> [n, cols]"""
    per = 32 // bits
    u = words.astype(np.int64) & 0xFFFFFFFF
    codes = np.stack([(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], 1)  # [rows, per, cols]
    return codes.reshape(-1, words.shape[1])[:n]


def quantized_tensors(out_dir, bits):
    """The quantized model as the shards hold it: W[n,k] = scales[g_idx[k], n] * (q[k,n] - zero[g_idx[k], n])"""
    import h5py
    t = {}
    with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
        for name in f["tensors"]:
            t[name] = f["tensors"][name][()].astype(np.float64)
        for b in f["blocks"]:
            blk = f["blocks"][b]
            for name in blk:
                key = f"model.layers.{b}.{name}"
                if isinstance(blk[name], h5py.Group):
                    d = blk[name]
                    k = d["g_idx"].shape[0]
                    n = d["scales"].shape[1]
                    q = unpack_along_first(d["qweight"][()], bits, k)                 # [K, N]
                    zeros = unpack_along_first(d["qzeros"][()].T, bits, n).T           # [G, N]
                    g = d["g_idx"][()]
                    scales = d["scales"][()].astype(np.float64)
                    t[key + ".weight"] = (scales[g] * (q - zeros[g])).T              # [N, K]
                else:
                    t[key] = blk[name][()].astype(np.float64)
    return t


def quantize_and_eval(model, out, calib, tokens, np_ranks):
    """GPTQ 4-bit g32 of model into out on np_ranks stages; returns the output's tensors and its eval perplexity."""
    pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", SEQ, "--bits", 4, "--group-size", 32,
            "--micro-batch", 4, "--threads", 1, "--out", out], np=np_ranks)
    ppl = pq.perplexity(pq.run(["eval", "--model", model, "--quantized", out, "--tokens", tokens, "--seq-len", SEQ],
                               np=1).stdout)
    return quantized_tensors(out, 4), ppl


def check_qwen2(work, calib, tokens, ids, close, results):
    """Qwen2: q, k, v_proj biases and nothing else; the config names qwen2 and no Llama bias fields."""
    model = os.path.join(work, "qwen2")
    pq.run(["synth", "--out", model, "--architecture", "qwen2", "--hidden-size", 64, "--intermediate-size", 96,
            "--num-layers", 2, "--num-heads", 4, "--num-kv-heads", 2, "--vocab-size", 128, "--dtype", "fp32",
            "--seed", 23])
    cfg = json.load(open(os.path.join(model, "config.json")))
    t = llama_reference.read_tensors(os.path.join(model, "model.safetensors"))
    biased = sorted({k.split(".")[-2] for k in t if k.endswith(".bias")})
    results.append((f"qwen2: config {cfg['architectures']} {cfg['model_type']}, biases on {biased}",
                    cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
                    and "attention_bias" not in cfg and biased == ["k_proj", "q_proj", "v_proj"]
                    and sum(k.endswith(".bias") for k in t) == 6))
    ppl = pq.perplexity(pq.run(["eval", "--model", model, "--tokens", tokens, "--seq-len", SEQ], np=1).stdout)
    close("qwen2 checkpoint", ppl, perplexity(cfg, t, ids))
    ref = perplexity(cfg, t, ids, skip_bias="self_attn.q_proj")
    results.append((f"qwen2 without q_proj.bias the reference is {ref:.6f}, above 10x the limit from {ppl:.6f}",
                    abs(ref - ppl) / ppl > 10 * TOL))
    tq, pq_q = quantize_and_eval(model, os.path.join(work, "qwen2-out"), calib, tokens, 1)
    close("qwen2 quantized output", pq_q, perplexity(cfg, tq, ids))


def check_qwen3(work, calib, tokens, ids, close, results):
    """Qwen3: per-head q/k norms (leaving either out misses the perplexity), attention biases from its config."""
    model = os.path.join(work, "qwen3")
    pq.run(["synth", "--out", model, "--architecture", "qwen3", "--attention-bias", "--hidden-size", 64,
            "--intermediate-size", 96, "--num-layers", 2, "--num-heads", 4, "--num-kv-heads", 2, "--vocab-size", 128,
            "--dtype", "fp32", "--seed", 29])
    cfg = json.load(open(os.path.join(model, "config.json")))
    t = llama_reference.read_tensors(os.path.join(model, "model.safetensors"))
    norms = sorted(k for k in t if k.endswith("_norm.weight") and "self_attn" in k)
    results.append((f"qwen3: config {cfg['architectures']} {cfg['model_type']}, {len(norms)} q/k norms, "
                    f"{sum(k.endswith('.bias') for k in t)} biases",
                    cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
                    and len(norms) == 4 and sum(k.endswith(".bias") for k in t) == 8))
    ppl = pq.perplexity(pq.run(["eval", "--model", model, "--tokens", tokens, "--seq-len", SEQ], np=1).stdout)
    close("qwen3 checkpoint", ppl, perplexity(cfg, t, ids))
    for norm in ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        ref = perplexity(cfg, t, ids, skip_bias=norm)
        results.append((f"qwen3 without {norm} the reference is {ref:.6f}, above 10x the limit from {ppl:.6f}",
                        abs(ref - ppl) / ppl > 10 * TOL))
    tq, pq_q = quantize_and_eval(model, os.path.join(work, "qwen3-out"), calib, tokens, 2)
    results.append(("the qwen3 output holds its q/k norms as the checkpoint has them",
                    all(np.array_equal(tq.get(k), t[k]) for k in norms)))
    close("qwen3 quantized output", pq_q, perplexity(cfg, tq, ids))


def main():
    work = tempfile.mkdtemp(prefix="pipequant-e2e-biases-")
    model = os.path.join(work, "model")
    pq.run(["synth", "--out", model, "--hidden-size", 64, "--intermediate-size", 96, "--num-layers", 2,
            "--num-heads", 4, "--num-kv-heads", 2, "--vocab-size", 128, "--dtype", "fp32", "--seed", 17,
            "--attention-bias", "--mlp-bias"])
    calib, tokens = os.path.join(work, "calib.npy"), os.path.join(work, "eval.npy")
    pq.run(["synth-tokens", "--out", calib, "--count", 16 * SEQ, "--vocab-size", 128, "--seed", 18])
    pq.run(["synth-tokens", "--out", tokens, "--count", WINDOWS * SEQ, "--vocab-size", 128, "--seed", 19])
    cfg = json.load(open(os.path.join(model, "config.json")))
    ids = np.load(tokens)
    t = llama_reference.read_tensors(os.path.join(model, "model.safetensors"))
    results = []

    def close(name, got, want):
        rel = abs(got - want) / want
        results.append((f"{name}: perplexity {got:.6f}, numpy reference {want:.6f}, relative {rel:.2e} "
                        f"(limit {TOL:g})", rel <= TOL))

    results.append(("the checkpoint has all 14 biases", sum(k.endswith(".bias") for k in t) == 14))
    ppl = pq.perplexity(pq.run(["eval", "--model", model, "--tokens", tokens, "--seq-len", SEQ], np=1).stdout)
    close("original checkpoint", ppl, perplexity(cfg, t, ids))
    # a forward that leaves out any one bias would fail the check above
    for module in LINEARS:
        ref = perplexity(cfg, t, ids, skip_bias=module)
        rel = abs(ref - ppl) / ppl
        results.append((f"without {module}.bias the reference is {ref:.6f}: {rel:.2e} from pipequant's, above "
                        f"10x the limit", rel > 10 * TOL))
    # the same checkpoint with its biases zeroed evaluates to another perplexity
    zeroed = os.path.join(work, "zeroed")
    os.makedirs(zeroed)
    shutil.copy(os.path.join(model, "config.json"), zeroed)
    write_safetensors(os.path.join(zeroed, "model.safetensors"),
                      {k: (np.zeros_like(v) if k.endswith(".bias") else v) for k, v in t.items()})
    ppl0 = pq.perplexity(pq.run(["eval", "--model", zeroed, "--tokens", tokens, "--seq-len", SEQ], np=1).stdout)
    results.append((f"biases zeroed: perplexity {ppl0:.6f} vs {ppl:.6f}", abs(ppl0 - ppl) / ppl > 10 * TOL))

    # quantized on 2 stages: the shards hold every bias, and the quantized model evaluates as its datasets say
    tq, pq_q = quantize_and_eval(model, os.path.join(work, "out"), calib, tokens, 2)
    results.append(("the quantized output holds the 14 biases as the checkpoint has them",
                    all(np.array_equal(tq.get(k), v) for k, v in t.items() if k.endswith(".bias"))))
    close("quantized output", pq_q, perplexity(cfg, tq, ids))
    results.append((f"quantized perplexity {pq_q:.4f} within 10% of the original {ppl:.4f}",
                    abs(pq_q - ppl) / ppl < 0.1 and pq_q != ppl))
    check_qwen2(work, calib, tokens, ids, close, results)
    check_qwen3(work, calib, tokens, ids, close, results)
    shutil.rmtree(work, ignore_errors=True)
    pq.finish(results)


main()
