"""Mixture-of-Experts: eval of the shared mixtral-tiny checkpoint (MixtralForCausalLM, 8 experts, top 2) matches
its reference perplexities, computed by an independent float32 implementation of the transformers semantics, to
1e-4 relative on 1 and 2 ranks (quantizing it: tests/e2e_moe_quantize.py).
Then a synthetic Qwen3MoeForCausalLM (bf16; a dense block in mlp_only_layers; top-k weights not renormalized) and a
Qwen2MoeForCausalLM (fp32; experts every second block; renormalized; a gated shared expert) evaluate on 1 and 2 ranks
to the perplexity of the numpy forward of scripts/llama_reference.py, within 1e-4 relative; the reference with the
renormalization flipped, or without the shared expert, is more than 10x the limit away (the check sees both)."""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import llama_reference  # noqa: E402
import pq  # noqa: E402

TOL = 1e-4
SEQ = 128
# the synthetic Qwen MoE models: 4 windows of 64 tokens, fp32 forward against the float64 reference (they agree to
# about 1e-7 relative)
QWEN_SEQ, QWEN_WINDOWS = 64, 4
SMALL = ["--hidden-size", 64, "--intermediate-size", 96, "--num-heads", 4, "--num-kv-heads", 2, "--vocab-size", 128]
QWEN_MODELS = {
    # name: synth options, the reference variants that must miss pipequant's perplexity
    "qwen3_moe": (["--architecture", "qwen3_moe", "--num-layers", 3, "--num-experts", 8, "--experts-per-token", 2,
                   "--moe-intermediate-size", 32, "--mlp-only-layers", "1", "--attention-bias", "--dtype", "bf16",
                   "--seed", 31], ["norm_topk_prob"]),
    "qwen2_moe": (["--architecture", "qwen2_moe", "--num-layers", 4, "--num-experts", 4, "--experts-per-token", 2,
                   "--moe-intermediate-size", 32, "--shared-expert-intermediate-size", 48, "--norm-topk-prob",
                   "--decoder-sparse-step", 2, "--dtype", "fp32", "--seed", 38], ["norm_topk_prob", "shared_expert"]),
}


def check_qwen_moe(work, results):
    """Each synthetic Qwen MoE model: its config and tensors, and its eval on 1 and 2 ranks against the numpy forward."""
    tokens = os.path.join(work, "eval.npy")
    pq.run(["synth-tokens", "--out", tokens, "--count", QWEN_WINDOWS * QWEN_SEQ, "--vocab-size", 128, "--seed", 41])
    ids = np.load(tokens)
    for name, (options, variants) in QWEN_MODELS.items():
        model = os.path.join(work, name)
        pq.run(["synth", "--out", model] + SMALL + options)
        cfg = json.load(open(os.path.join(model, "config.json")))
        t = llama_reference.read_tensors(os.path.join(model, "model.safetensors"))
        moe = [b for b in range(cfg["num_hidden_layers"]) if llama_reference.moe_block(cfg, b)]
        dense = [b for b in range(cfg["num_hidden_layers"]) if f"model.layers.{b}.mlp.gate_proj.weight" in t]
        shared = sum(k.endswith("mlp.shared_expert_gate.weight") for k in t)
        results.append((f"{name}: config {cfg['architectures']} {cfg['model_type']}, MoE blocks {moe}, dense blocks "
                        f"{dense}, {shared} shared experts",
                        cfg["model_type"] == name and moe and dense and sorted(moe + dense) == list(
                            range(cfg["num_hidden_layers"])) and shared == (len(moe) if name == "qwen2_moe" else 0)))
        want = llama_reference.perplexity(cfg, t, ids, QWEN_SEQ)
        for np_ranks in (1, 2):
            got = pq.perplexity(pq.run(["eval", "--model", model, "--tokens", tokens, "--seq-len", QWEN_SEQ],
                                       np=np_ranks).stdout)
            rel = abs(got - want) / want
            results.append((f"{name} ({np_ranks} rank{'s' if np_ranks > 1 else ''}): perplexity {got:.6f}, numpy "
                            f"reference {want:.6f}, relative {rel:.2e} (limit {TOL:g})", rel <= TOL))
        for skip in variants:
            other = llama_reference.perplexity(cfg, t, ids, QWEN_SEQ, skip)
            results.append((f"{name}: the reference with {skip} changed is {other:.6f}, above 10x the limit from "
                            f"{want:.6f}", abs(other - want) / want > 10 * TOL))


def main():
    model = pq.testdata("mixtral-tiny")
    ref = json.load(open(os.path.join(model, "reference_perplexity.json")))
    results = []
    cases = [("wikitext2_test_last10pct_all_windows", 1, []), ("wikitext2_test_last10pct_all_windows", 2,
                                                                ["--micro-batch", 3]),
             ("heldout_first_64_windows", 1, ["--max-windows", 64])]
    for key, np_ranks, extra in cases:
        want = ref[key]["perplexity"]
        p = pq.run(["eval", "--model", model, "--tokens", pq.testdata(ref[key]["file"]), "--seq-len", SEQ] + extra,
                   np=np_ranks)
        got = pq.perplexity(p.stdout)
        rel = abs(got - want) / want
        results.append((f"{ref[key]['file']} ({np_ranks} rank{'s' if np_ranks > 1 else ''}): perplexity {got:.6f}, "
                        f"reference {want:.6f}, relative {rel:.2e} (limit {TOL:g})", rel <= TOL))
    work = tempfile.mkdtemp(prefix="pipequant-e2e-moe-")
    check_qwen_moe(work, results)
    shutil.rmtree(work, ignore_errors=True)
    pq.finish(results)


main()
