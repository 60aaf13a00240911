"""--compute-dtype: the block forward's GEMMs in bf16 or fp16 (inputs rounded to the format, fp32 accumulation),
as the CUDA backend runs a bf16/fp16 checkpoint, here through the CPU backend's reference of that GEMM. On
tiny-llama-6L (a bf16 checkpoint): eval within 0.5% of the fp32 forward in both formats, and GPTQ calibrated
through the bf16 forward within 0.5% of GPTQ calibrated through the fp32 one. A bad value is one clear error."""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-dtype-")
model = pq.testdata("tiny-llama-6L")
calib = pq.testdata("text/tiny6L_calib.tok4k.npy")
judge = pq.testdata("text/tiny6L_heldout.tok4k.npy")
results = []


def evaluate(dtype, quantized=None):
    args = ["eval", "--model", model, "--tokens", judge, "--seq-len", 256, "--max-windows", 48, "--compute-dtype",
            dtype]
    if quantized:
        args += ["--quantized", quantized]
    out = pq.run(args, np=1).stdout
    return pq.perplexity(out), f"forward GEMMs {dtype}" in out


fp32, _ = evaluate("fp32")
for dtype in ("bf16", "fp16"):
    ppl, said = evaluate(dtype)
    rel = abs(ppl - fp32) / fp32
    results.append((f"eval with {dtype} GEMMs: perplexity {ppl:.6f} vs fp32 {fp32:.6f} ({rel:.2e}), "
                    f"the report names {dtype}", rel < 5e-3 and said and ppl != fp32))

quantized = {}
for dtype in ("fp32", "bf16"):
    out = os.path.join(work, dtype)
    p = pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", 256, "--nsamples", 32, "--method", "gptq",
                "--bits", 4, "--group-size", 128, "--compute-dtype", dtype, "--out", out], np=1)
    results.append((f"quantize with {dtype} GEMMs: the report names them", f"forward GEMMs {dtype}" in p.stdout))
    quantized[dtype], _ = evaluate("fp32", out)
rel = abs(quantized["bf16"] - quantized["fp32"]) / quantized["fp32"]
results.append((f"GPTQ through the bf16 forward: perplexity {quantized['bf16']:.4f} vs {quantized['fp32']:.4f} "
                f"through fp32 ({rel:.2e})", rel < 5e-3 and quantized["bf16"] < fp32 * 1.05))

p = pq.run(["eval", "--model", model, "--tokens", judge, "--seq-len", 256, "--compute-dtype", "int8"], np=1,
           check=False, timeout=10)
err = [l for l in (p.stderr + p.stdout).splitlines() if "error:" in l]
results.append(("--compute-dtype int8 is refused with one clear line",
                p.returncode != 0 and bool(err) and "--compute-dtype" in err[0] and "int8" in err[0]))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
