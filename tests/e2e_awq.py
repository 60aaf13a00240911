"""AWQ end to end on stories260K (5 blocks, GQA, intermediate 172: a ragged last group at g32):
- the output is bit-identical, norms included, with 1 rank, 3 stages and 2 stages x 2 ranks, in both propagation
  modes, at one thread per rank (OpenBLAS's GEMMs are not thread-count invariant: the activations, and so the
  scales folded into the fp32 norms, may differ in their last bit between thread counts); the folded norms are fp32 and differ from the checkpoint's; the report says which scales and clips were
  chosen;
- a resumed run (the last two blocks marked incomplete) gives the same bits: the resumed blocks' folded norms feed
  the next block;
- at 8 bits the output's perplexity is the FP model's within 0.5% (the folds into the norms, v_proj and up_proj keep
  the model; a synthetic model with as many KV heads as heads exercises v -> o);
- --method awq with --act-order is refused with one line.
The perplexity against RTN is checked by e2e_quality (scripts/quality_table.py)."""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-awq-")
model = pq.testdata("stories260K")
calib = pq.testdata("text/tinystories_calib.tok512.npy")
results = []


def quantize(out, ranks, per_stage, mode, extra=(), check=True):
    return pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 24, "--method", "awq",
                   "--bits", 4, "--group-size", 32, "--propagation", mode, "--ranks-per-stage", per_stage,
                   "--micro-batch", 3 if ranks == 1 else 2, "--threads", 1, "--out", out] + list(extra), np=ranks,
                  check=check)


def block_norm(out, block, name):
    with h5py.File(os.path.join(out, "model.h5"), "r") as f:
        d = f["blocks"][str(block)][name]
        return d[()], d.attrs["dtype"]


report_lines = {}
for mode in ("quantized", "fp"):
    outs = {}
    for ranks, per_stage in ((1, 1), (3, 1), (4, 2)):
        out = os.path.join(work, f"{mode}-np{ranks}-d{per_stage}")
        p = quantize(out, ranks, per_stage, mode)
        outs[(ranks, per_stage)] = out
        if (ranks, per_stage) == (1, 1):
            chosen = [l for l in p.stdout.splitlines() if "awq scale exponent" in l]
            report_lines[mode] = chosen
            results.append((f"{mode}: the report gives the chosen scale exponents and clip ratios for the q/k/v, "
                            f"gate/up and down linears ({len(chosen)} lines)", len(chosen) == 6))
    ref = outs[(1, 1)]
    for key, out in outs.items():
        if key != (1, 1):
            diff = pq.compare_outputs(ref, out)
            results.append((f"{mode}: np {key[0]} (D={key[1]}) bit-identical to np 1, norms included"
                            + (f": {diff[:3]}" if diff else ""), not diff))
    # the scales live in the norms now: fp32, not the checkpoint's values, and finite
    src = pq.read_safetensors(os.path.join(model, "model.safetensors"))["model.layers.2.input_layernorm.weight"]
    norm, dtype = block_norm(ref, 2, "input_layernorm.weight")
    folded = np.frombuffer(norm.tobytes(), dtype=np.float32)
    results.append((f"{mode}: block 2's input norm is stored folded in fp32 ({dtype}), finite, not the checkpoint's",
                    dtype == "F32" and np.all(np.isfinite(folded)) and folded.shape == src.shape
                    and not np.array_equal(folded, src)))

# resume: the last two blocks of a complete quantized-propagation output marked incomplete, then the run again
clean = os.path.join(work, "quantized-np1-d1")
resumed = os.path.join(work, "resumed")
shutil.copytree(clean, resumed)
with h5py.File(os.path.join(resumed, "model.h5"), "r+") as f:
    f.attrs["complete"] = 0
shard = [n for n in os.listdir(resumed) if n.startswith("shard-")][0]
with h5py.File(os.path.join(resumed, shard), "r+") as f:
    for b in ("3", "4"):
        f["blocks"][b].attrs["complete"] = 0
p = quantize(resumed, 1, 1, "quantized")
diff = pq.compare_outputs(clean, resumed)
results.append(("resume after blocks 3 and 4 were lost: 3 blocks resumed, output bit-identical"
                + (f": {diff[:3]}" if diff else ""), not diff and p.stdout.count("resumed") >= 3))
again = [l for l in p.stdout.splitlines() if "awq scale exponent" in l]
results.append(("the resumed run reports the same AWQ choices (the shard keeps them)", again == report_lines["quantized"]))

# the folds keep the model: at 8 bits (nearly lossless) the AWQ output's perplexity is the FP model's within 0.5%,
# on stories260K (GQA: norms and up -> down) and on a synthetic model with as many KV heads as heads (v -> o too)
synth = os.path.join(work, "mha")
pq.run(["synth", "--out", synth, "--hidden-size", 128, "--intermediate-size", 256, "--num-layers", 2, "--num-heads", 4,
        "--num-kv-heads", 4, "--vocab-size", 512, "--dtype", "bf16", "--seed", 7])
evals = pq.testdata("text/tinystories_eval.tok512.npy")
for name, m in (("stories260K", model), ("synthetic MHA", synth)):
    out, metrics = os.path.join(work, f"w8-{os.path.basename(m)}"), os.path.join(work, f"w8-{os.path.basename(m)}.jsonl")
    pq.run(["quantize", "--model", m, "--calib", calib, "--seq-len", 128, "--nsamples", 16, "--method", "awq", "--bits",
            8, "--group-size", 32, "--out", out, "--metrics", metrics], np=1)
    ev = ["eval", "--model", m, "--tokens", evals, "--seq-len", 128, "--max-windows", 16]
    fp, q = pq.perplexity(pq.run(ev).stdout), pq.perplexity(pq.run(ev + ["--quantized", out]).stdout)
    o_alpha = [r["awq_alpha"] for r in pq.read_metrics(metrics) if r["record"] == "linear"
               and r["module"] == "self_attn.o_proj"]
    folded_o = all(a >= 0 for a in o_alpha) if name == "synthetic MHA" else all(a < 0 for a in o_alpha)
    results.append((f"{name} AWQ 8-bit: perplexity {q:.4f} within 0.5% of fp {fp:.4f}; o_proj scales "
                    f"{'folded into v_proj' if name == 'synthetic MHA' else 'not folded (GQA)'}: alphas {o_alpha}",
                    abs(q / fp - 1) < 0.005 and folded_o))

# refused settings
p = quantize(os.path.join(work, "refused"), 1, 1, "quantized", ["--act-order"], check=False)
lines = [l for l in (p.stdout + p.stderr).splitlines() if "error:" in l]
results.append((f"--method awq --act-order refused with one line (rc {p.returncode}): {lines}",
                p.returncode != 0 and len(lines) == 1 and "--act-order" in lines[0]))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
