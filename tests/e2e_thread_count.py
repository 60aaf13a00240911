"""The output does not depend on the CPU threads per rank: tiny-llama-6L (down_proj 768 wide, wide enough that a
threaded BLAS splits its GEMMs by the thread count) quantized with --threads 1, 2 and 3, with and without
--act-order, and mixtral-tiny (expert GEMMs over the tokens routed to each expert) with --threads 1 and 2: every
packed dataset bit-identical to the one-thread run."""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-thread-count-")
calib = pq.testdata("text/tiny6L_wikitext2_test.tok4k.npy")
# (name, model, calibration samples, extra options, thread counts)
cases = [
    ("tiny-llama-6L", "tiny-llama-6L", 16, [], (1, 2, 3)),
    ("tiny-llama-6L act-order", "tiny-llama-6L", 16, ["--act-order"], (1, 2)),
    ("mixtral-tiny", "mixtral-tiny", 40, [], (1, 2)),
]
results = []
for name, model, nsamples, extra, thread_counts in cases:
    outs = {}
    for threads in thread_counts:
        out = os.path.join(work, f"{name.replace(' ', '-')}-t{threads}")
        pq.run(["quantize", "--model", pq.testdata(model), "--calib", calib, "--seq-len", 128, "--nsamples", nsamples,
                "--bits", 4, "--group-size", 32, "--threads", threads, "--out", out] + extra, np=1)
        outs[threads] = out
    for threads in thread_counts[1:]:
        diff = pq.compare_outputs(outs[1], outs[threads])
        results.append((f"{name}: --threads {threads} bit-identical to --threads 1" + (f": {diff[:3]}" if diff else ""),
                        not diff))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
