"""stories260K (5 blocks) quantized with 1, 2, 3 and 5 ranks (one stage each) and with 4 ranks as 2 stages x 2:
every packed dataset bit-identical across the runs, in both propagation modes. Also: eval and inspect read
the multi-stage output, and the transport benchmark prints its table."""
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-multirank-")
model = pq.testdata("stories260K")
calib = pq.testdata("text/tinystories_calib.tok512.npy")
# (ranks, ranks per stage, fp blocks kept in host memory); fp mode streams the blocks of a stage one at a time
# when they do not fit --fp-resident-gb
layouts = [(1, 1, True), (2, 1, True), (3, 1, True), (5, 1, True), (4, 2, True), (3, 1, False)]
results = []
for mode in ("quantized", "fp"):
    outs = {}
    for ranks, per_stage, resident in layouts:
        if mode == "quantized" and not resident:
            continue
        out = os.path.join(work, f"{mode}-np{ranks}-d{per_stage}" + ("" if resident else "-streamed"))
        metrics = out + ".jsonl"
        p = pq.run(["quantize", "--metrics", metrics, "--model", model, "--calib", calib, "--seq-len", 128,
                    "--method", "gptq", "--bits", 4,
                    "--group-size", 32, "--act-order", "--propagation", mode, "--ranks-per-stage", per_stage,
                    "--micro-batch", 3 if ranks == 1 else 2, "--fp-resident-gb", 16 if resident else 0,
                    "--out", out], np=ranks)
        if "HDF5-DIAG" in p.stderr + p.stdout:
            results.append((f"{mode} np {ranks}: HDF5 diagnostics printed", False))
        stages = ranks // per_stage
        plan_ok = f"{stages} stages x {per_stage} ranks per stage" in p.stdout
        if mode == "fp":
            kept = "fp-blocks-" + ("resident" if resident else "streamed")
            plan_ok = plan_ok and p.stdout.count(kept) == stages
        results.append((f"{mode} np {ranks} (D={per_stage}): plan printed with {stages} stages", plan_ok))
        lines = sorted(int(l.split()[1].split("/")[0]) for l in p.stdout.splitlines() if l.startswith("block "))
        results.append((f"{mode} np {ranks} (D={per_stage}): rank 0 printed one line per block: {lines}",
                        lines == [1, 2, 3, 4, 5]))
        outs[(ranks, per_stage, resident)] = out
        # per-phase device peaks: the solve phase holds at least the widest Hessian (fp32), the overall peak is
        # the larger of the two phases
        recs = pq.read_metrics(metrics)
        widest = max(r["in_features"] for r in recs if r["record"] == "linear")
        for st in (r for r in recs if r["record"] == "stage"):
            fwd, solve, peak = st["peak_device_forward_bytes"], st["peak_device_solve_bytes"], st["peak_device_bytes"]
            results.append((f"{mode} np {ranks} stage {st['stage']}: device peaks forward {fwd}, solve {solve} "
                            f"(>= {4 * widest ** 2}), overall {peak}",
                            fwd > 0 and solve >= 4 * widest ** 2 and peak == max(fwd, solve)))
            # parallel HDF5: every rank of the stage group writes its own slice of the shard
            parts = st["hdf5_rank_bytes"]
            results.append((f"{mode} np {ranks} stage {st['stage']}: HDF5 bytes per rank {parts} add up to "
                            f"{st['hdf5_bytes']}, every rank wrote", len(parts) == per_stage
                            and sum(parts) == st["hdf5_bytes"] and min(parts) > 0))
    ref = outs[(1, 1, True)]
    for key, out in outs.items():
        if key == (1, 1, True):
            continue
        diff = pq.compare_outputs(ref, out)
        results.append((f"{mode}: np {key[0]} (D={key[1]}{'' if key[2] else ', blocks streamed'}) bit-identical to "
                        f"np 1" + (f": {diff[:3]}" if diff else ""), not diff))
    # the multi-stage output reads back whatever P and D were
    ppl = [pq.perplexity(pq.run(["eval", "--model", model, "--quantized", outs[k], "--tokens",
                                 pq.testdata("text/tinystories_eval.tok512.npy"), "--seq-len", 256, "--max-windows", 8],
                                np=1).stdout) for k in ((1, 1, True), (5, 1, True))]
    results.append((f"{mode}: eval of the 5-stage output equals the 1-stage one ({ppl[0]:.6f} vs {ppl[1]:.6f})",
                    ppl[0] == ppl[1]))
    insp = pq.run(["inspect", outs[(4, 2, True)]], check=False)
    results.append((f"{mode}: inspect of the 2x2 output verifies (rc {insp.returncode})",
                    insp.returncode == 0 and "self_attn.q_proj" in insp.stdout))

# the transport benchmark prints an nccl-tests style table and validates the data
p = pq.run(["bench", "transport", "--min-bytes", 1024, "--max-bytes", 1 << 20, "--iters", 5, "--warmup", 1], np=2)
rows = [l for l in p.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+float", l)]
results.append((f"bench transport: {len(rows)} size rows, validation OK", len(rows) == 11 and "OK" in p.stdout))
print(p.stdout)

# the HDF5 benchmark: each rank writes its slice through the shard writer, rank 0 reads it back and checks it
p = pq.run(["bench", "hdf5", "--dir", work, "--mib", 8, "--reps", 2], np=2)
rows = [l.split() for l in p.stdout.splitlines() if re.match(r"^(write|read)\s+\d", l)]
results.append((f"bench hdf5: {len(rows)} rows (write/read x 2), validation OK, positive bandwidths",
                len(rows) == 4 and "OK" in p.stdout and all(float(r[1]) > 0 for r in rows)))
print(p.stdout)

# the Hessian benchmark checks its own result (H[0, 0]) and prints a row per width next to the sgemm rate
p = pq.run(["bench", "hessian", "--widths", "64,200", "--tokens", 300, "--reps", 1, "--threads", 1], np=1)
rows = [l.split() for l in p.stdout.splitlines() if re.match(r"^\s+\d+\s+300\s", l)]
results.append((f"bench hessian: rows for widths {[r[0] for r in rows]}, sgemm rate printed",
                [r[0] for r in rows] == ["64", "200"] and "# sgemm 2048x2048x2048" in p.stdout
                and all(float(r[4]) > 0 for r in rows)))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
