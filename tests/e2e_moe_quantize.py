"""Quantizing Mixture-of-Experts models, on the shared mixtral-tiny checkpoint (8 experts, top 2, trained):
(a) GPTQ at 4 and 3 bits (groups of 128 = per row at this width) has a lower held-out perplexity than RTN, with
--moe-calibration routed and all; (b) the dequantized HDF5 output evaluated by the numpy forward of
scripts/llama_reference.py (weights unpacked by scripts/packed_reader.py) agrees with eval --quantized within 0.5%,
and the GPTQ export, read back by the numpy GPTQ reader, within 2e-4 (eval of the export by pipequant too), its
quantization_config naming the packed linears of a block (modules_in_block_to_quantize) and not the router;
(c) the output is bit-identical with 1 rank, 2 stages and 1 stage x 2 ranks (experts split over the ranks), and a
rerun resumes every block; (d) the report and inspect give every expert's routed token count and name the experts
that took the all-token Hessian (--moe-min-tokens); (e) a synthetic Qwen2-MoE with a gated shared expert quantizes
(the shared expert's linears and gate in the output) and its eval --quantized matches the numpy forward of its
dequantized output; (f) plan counts the experts, and --method awq refuses an MoE model with one line."""
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import llama_reference  # noqa: E402
import pq  # noqa: E402
from packed_reader import gptq_weight, internal_linears  # noqa: E402

MODEL = pq.testdata("mixtral-tiny")
CALIB = pq.testdata("text/tiny6L_wikitext2_test.tok4k.npy")  # its first 90% is the training text
HELDOUT = pq.testdata("text/wikitext2_test_last10pct.tok4k.npy")
SEQ = 128
NUMPY_WINDOWS = 24  # windows of the held-out set the numpy forward evaluates
work = tempfile.mkdtemp(prefix="pipequant-e2e-moe-quantize-")
results = []


def check(name, ok):
    results.append((name, bool(ok)))


def quantize(name, extra, np_=None, model=MODEL, calib=CALIB, seq=SEQ):
    out = os.path.join(work, name)
    p = pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", seq, "--out", out] +
               [str(a) for a in extra], np=np_)
    return out, p


def eval_quantized(out, tokens=HELDOUT, windows=0, model=MODEL, seq=SEQ):
    args = ["eval", "--model", model, "--quantized", out, "--tokens", tokens, "--seq-len", seq]
    return pq.perplexity(pq.run(args + (["--max-windows", windows] if windows else [])).stdout)


def dequantized_tensors(model, out):
    """The source checkpoint's tensors with every quantized linear replaced by the output's dequantized weights."""
    t = llama_reference.read_tensors(os.path.join(model, "model.safetensors"))
    linears = internal_linears(out)
    for prefix, (w, _, _) in linears.items():
        assert prefix + ".weight" in t, prefix
        t[prefix + ".weight"] = w.astype(np.float64)
    return t, len(linears)


def numpy_perplexity(model, t, tokens, windows, seq=SEQ):
    cfg = json.load(open(os.path.join(model, "config.json")))
    return llama_reference.perplexity(cfg, t, np.load(tokens)[:windows * seq], seq)


# ---- (a) quality: GPTQ below RTN at 4 and 3 bits, both calibration modes
ppl = {}
for bits in (4, 3):
    for method, mode in (("rtn", "routed"), ("gptq", "routed"), ("gptq", "all")):
        out, _ = quantize(f"{method}{bits}-{mode}", ["--method", method, "--bits", bits, "--group-size", 128,
                                                     "--nsamples", 128, "--moe-calibration", mode])
        ppl[(method, bits, mode)] = eval_quantized(out)
    for mode in ("routed", "all"):
        g, r = ppl[("gptq", bits, mode)], ppl[("rtn", bits, "routed")]
        check(f"{bits}-bit: GPTQ (--moe-calibration {mode}) held-out perplexity {g:.4f} below RTN's {r:.4f}", g < r)

# ---- (b) the output and its export evaluated independently
out4 = os.path.join(work, "gptq4-routed")
t, count = dequantized_tensors(MODEL, out4)
check(f"the HDF5 output holds 112 linears (4 blocks x (4 attention + 8 experts x 3)): {count}", count == 112)
mine = eval_quantized(out4, windows=NUMPY_WINDOWS)
independent = numpy_perplexity(MODEL, t, HELDOUT, NUMPY_WINDOWS)
rel = abs(independent - mine) / mine
check(f"dequantized HDF5 output, numpy forward {independent:.6f} vs eval --quantized {mine:.6f}: relative "
      f"{rel:.2e} (limit 5e-3)", rel <= 5e-3)
hf = os.path.join(work, "gptq4-export")
pq.run(["export", "--out", out4, "--to", hf, "--format", "gptq"])
qc = json.load(open(os.path.join(hf, "config.json")))["quantization_config"]
exported = {k: ("", v) for k, v in pq.read_safetensors(os.path.join(hf, "model.safetensors")).items()}
t_hf = llama_reference.read_tensors(os.path.join(MODEL, "model.safetensors"))
experts = [k[:-len(".qweight")] for k in exported if ".experts." in k and k.endswith(".qweight")]
to_quantize = {m for g in qc.get("modules_in_block_to_quantize", []) for m in g}
block0 = {k[len("model.layers.0."):-len(".qweight")] for k in exported if k.startswith("model.layers.0.")
          and k.endswith(".qweight")}
check(f"quantization_config modules_in_block_to_quantize: the 4 groups name the {len(block0)} packed linears of a "
      f"block and not the router (kept dense: {'model.layers.0.block_sparse_moe.gate.weight' in exported})",
      to_quantize == block0 and len(block0) == 28 and "block_sparse_moe.gate" not in to_quantize
      and len(qc["modules_in_block_to_quantize"]) == 4 and "model.layers.0.block_sparse_moe.gate.weight" in exported)
for prefix in [k[:-len(".qweight")] for k in exported if k.endswith(".qweight")]:
    t_hf[prefix + ".weight"] = gptq_weight(exported, prefix, qc).astype(np.float64)
from_export = numpy_perplexity(MODEL, t_hf, HELDOUT, NUMPY_WINDOWS)
rel = abs(from_export - mine) / mine
check(f"GPTQ export ({len(experts)} expert linears under model.layers.<i>.block_sparse_moe.experts.<e>.w1/w2/w3), "
      f"numpy reader {from_export:.6f} vs eval --quantized {mine:.6f}: relative {rel:.2e} (limit 2e-4)",
      len(experts) == 96 and rel <= 2e-4)
by_pipequant = pq.perplexity(pq.run(["eval", "--model", hf, "--tokens", HELDOUT, "--seq-len", SEQ,
                                     "--max-windows", NUMPY_WINDOWS]).stdout)
check(f"eval of the GPTQ export {by_pipequant:.6f} equals eval --quantized {mine:.6f}",
      abs(by_pipequant - mine) <= 1e-6 * mine)

# ---- (c) layouts: 1 rank, 2 stages, 1 stage x 2 ranks (experts split over the ranks), each rank with its default
# threads (the node's 2 cores shared by its ranks: 2 threads alone, 1 each beside another)
layout_args = ["--bits", 4, "--group-size", 32, "--nsamples", 40]
one, _ = quantize("layout-1", layout_args + ["--micro-batch", 3])
for name, np_, extra in (("2 stages", 2, []), ("1 stage x 2 ranks", 2, ["--ranks-per-stage", 2])):
    other, _ = quantize("layout-" + name.replace(" ", ""), layout_args + ["--micro-batch", 2] + extra, np_=np_)
    diffs = pq.compare_outputs(one, other)
    check(f"{name}: every dataset bit-identical to 1 rank's ({len(diffs)} differ{': ' + diffs[0] if diffs else ''})",
          not diffs)
_, again = quantize("layout-1", layout_args + ["--micro-batch", 3])
resumed = len(re.findall(r"^block .* resumed", again.stdout, re.M))
check(f"the same command again resumes all 4 blocks ({resumed})", resumed == 4)

# ---- (d) per-expert token counts in the report and inspect; the low-token path
low, p = quantize("low-tokens", ["--bits", 4, "--nsamples", 8, "--moe-min-tokens", 260])
listed = re.findall(r"^  block (\d+) block_sparse_moe\.experts\.(\d+) \((\d+)\)$", p.stdout, re.M)
rows = [l for l in p.stdout.splitlines() if re.match(r"^  block \d+: ", l)]
counts = [re.findall(r" (\d+):(\d+)(\*?)", r) for r in rows]
sums_ok = len(counts) == 4 and all(len(c) == 8 and sum(int(n) for _, n, _ in c) == 8 * SEQ * 2 for c in counts)
marked = {(b, e) for b, c in enumerate(counts) for e, n, star in c if star}
check(f"report: each block's 8 experts with routed token counts summing to 8 samples x 128 tokens x top 2; "
      f"{len(listed)} experts under 260 tokens listed with their counts, the same starred",
      sums_ok and listed and {(int(b), e) for b, e, _ in listed} == {(b, e) for b, e in marked}
      and all(int(n) < 260 for _, _, n in listed))
inspect = pq.run(["inspect", low]).stdout
notes = re.findall(r"block_sparse_moe\.experts\.(\d+)\.w[123] .* expert tokens (\d+) \((routed|all \(low tokens\))\)",
                   inspect)
check(f"inspect: all 96 expert linears with their tokens, {sum(n[2] != 'routed' for n in notes)} on the all-token "
      f"path (3 per listed expert)", len(notes) == 96 and sum(n[2] != "routed" for n in notes) == 3 * len(listed)
      and all((int(n[1]) < 260) == (n[2] != "routed") for n in notes))

# ---- (e) a gated shared expert (Qwen2-MoE, synthetic)
qwen = os.path.join(work, "qwen2-moe")
pq.run(["synth", "--out", qwen, "--hidden-size", 64, "--intermediate-size", 96, "--num-heads", 4, "--num-kv-heads", 2,
        "--vocab-size", 128, "--architecture", "qwen2_moe", "--num-layers", 2, "--num-experts", 4,
        "--experts-per-token", 2, "--moe-intermediate-size", 32, "--shared-expert-intermediate-size", 48,
        "--norm-topk-prob", "--dtype", "fp32", "--seed", 38])
tokens = os.path.join(work, "qwen-tokens.npy")
pq.run(["synth-tokens", "--out", tokens, "--count", 64 * 40, "--vocab-size", 128, "--seed", 5])
qout, p = quantize("qwen2-moe-q", ["--bits", 4, "--group-size", 32, "--nsamples", 32], model=qwen, calib=tokens,
                   seq=64)
shared = re.findall(r"shared_expert\.(gate|up|down)_proj .* expert tokens 2048 \(all \(shared expert\)\)",
                    pq.run(["inspect", qout]).stdout)
t, count = dequantized_tensors(qwen, qout)
mine = eval_quantized(qout, tokens=tokens, windows=8, model=qwen, seq=64)
independent = numpy_perplexity(qwen, t, tokens, 8, seq=64)
rel = abs(independent - mine) / mine
check(f"Qwen2-MoE: {count} linears (2 x (4 + 3 x 5)), the shared expert's 6 seen by all 2048 tokens; numpy forward "
      f"of the output {independent:.6f} vs eval --quantized {mine:.6f}: relative {rel:.2e} (limit 5e-3)",
      count == 38 and len(shared) == 6 and rel <= 5e-3)

# ---- (f) plan, and the AWQ refusal
plan = json.loads(pq.run(["plan", "--model", MODEL, "--seq-len", SEQ, "--nsamples", 128, "--json", "--verbose"])
                  .stdout.splitlines()[0])
terms = {name for s in plan["stages"] for kind in ("host_terms_gb", "device_terms_gb") for name in s.get(kind, {})}
check(f"plan of mixtral-tiny fits and counts the experts ({sorted(x for x in terms if 'expert' in x or 'moe' in x)})",
      plan["fits"] and {"experts_held", "moe_runner_experts", "moe_inputs"} <= terms)
p = pq.run(["quantize", "--model", MODEL, "--calib", CALIB, "--seq-len", SEQ, "--nsamples", 8, "--method", "awq",
            "--out", os.path.join(work, "awq")], check=False)
lines = [l for l in p.stderr.splitlines() if "error:" in l]
check(f"--method awq refuses an MoE model with one line: {lines[0] if lines else p.stderr[-200:]}",
      p.returncode != 0 and len(lines) == 1 and "Mixture-of-Experts" in lines[0] and "gptq or rtn" in lines[0])

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
