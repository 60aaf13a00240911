"""One 405B-shaped block on one rank: peak RSS, the plan against it, every linear's error against RTN's, and the
run's rate on the block's nominal flops as a fraction of the machine's sgemm rate. A benchmark (tens of minutes,
about 20 GB), not a test: run it alone.

  python3 scripts/bench_405b_block.py WORKDIR            # synth the block (7.4 GB), then quantize it
  python3 scripts/bench_405b_block.py WORKDIR --reuse    # WORKDIR/ckpt and tokens.npy exist: quantize only
  python3 scripts/bench_405b_block.py WORKDIR --report   # the last run's numbers again (run.log, metrics.jsonl)

Nominal flops (T calibration tokens): forward 2*T*params, Hessians T*K^2 per linear group, factor 2/3*K^3 per
group, solves N*K^2 per linear.
"""
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pq  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 16384, 53248, 128, 8, 128, 32000
SAMPLES, SEQ = 8, 128


def linears():
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    # (module, N = out, K = in, group)
    return [("q", q, HIDDEN, 0), ("k", kv, HIDDEN, 0), ("v", kv, HIDDEN, 0), ("o", HIDDEN, q, 1),
            ("gate", INTER, HIDDEN, 2), ("up", INTER, HIDDEN, 2), ("down", HIDDEN, INTER, 3)]


def nominal_flops():
    t = SAMPLES * SEQ
    params = sum(n * k for _, n, k, _ in linears())
    widths = {g: k for _, _, k, g in linears()}
    parts = {
        "forward 2*T*params": 2 * t * params,
        "Hessians T*K^2": sum(t * k * k for k in widths.values()),
        "factor 2/3*K^3": sum(2 * k ** 3 / 3 for k in widths.values()),
        "solves N*K^2": sum(n * k * k for _, n, k, _ in linears()),
    }
    return parts, sum(parts.values())


def sgemm_rate():
    """The median of three sgemm lines (the first one after an 18 GB process has exited can read low)."""
    rates = []
    for _ in range(3):
        p = pq.run(["bench", "hessian", "--widths", "1024", "--tokens", 1024, "--reps", 1, "--backend", "cpu"],
                   check=False)
        m = re.search(r"sgemm .*?: ([0-9.]+) GFLOP/s", p.stdout + p.stderr)
        if m:
            rates.append(float(m.group(1)))
    return sorted(rates)[len(rates) // 2] if rates else None


def synth(work):
    pq.run(["synth", "--out", os.path.join(work, "ckpt"), "--hidden-size", HIDDEN, "--intermediate-size", INTER,
            "--num-layers", 1, "--num-heads", HEADS, "--num-kv-heads", KV_HEADS, "--vocab-size", VOCAB, "--dtype",
            "bf16", "--tie-word-embeddings", "--seed", 1], timeout=3600)
    import numpy as np
    rng = np.random.default_rng(0)
    np.save(os.path.join(work, "tokens.npy"), rng.integers(0, VOCAB, size=(SAMPLES, SEQ), dtype=np.int32))


def quantize(work):
    out = os.path.join(work, "out")
    cmd = ["/usr/bin/time", "-v", pq.binary(), "quantize", "--model", os.path.join(work, "ckpt"), "--calib",
           os.path.join(work, "tokens.npy"), "--seq-len", SEQ, "--nsamples", SAMPLES, "--out", out, "--overwrite",
           "--metrics", os.path.join(work, "metrics.jsonl"), "--backend", "cpu", "--bits", 4, "--group-size", 128]
    with open(os.path.join(work, "run.log"), "w") as log:
        subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, check=True)


def report(work):
    log = open(os.path.join(work, "run.log")).read()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", log).group(1)
    wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    records = pq.read_metrics(os.path.join(work, "metrics.jsonl"))
    stage = next(r for r in records if r["record"] == "stage")
    lins = [r for r in records if r["record"] == "linear"]
    parts, total = nominal_flops()
    rate = sgemm_rate()
    print(f"405B-shaped block, 1 rank, GPTQ 4-bit g128, {SAMPLES} x {SEQ} calibration tokens")
    print(f"peak RSS {rss_kb * 1024 / 1e9:.2f} GB (/usr/bin/time); metrics host_peak_gb {stage['host_peak_gb']:.2f}, "
          f"planned_host_peak_gb {stage['planned_host_peak_gb']:.2f} "
          f"({100 * (stage['planned_host_peak_gb'] / stage['host_peak_gb'] - 1):+.1f}%)")
    print(f"wall {wall_s:.0f} s; stage total {stage['total_s']:.0f} s: load {stage['load_s']:.0f}, "
          f"forward+Hessian {stage['forward_hessian_s']:.0f}, solve {stage['solve_s']:.0f}, "
          f"write {stage['pack_write_s']:.0f}")
    for name, f in parts.items():
        print(f"  nominal {name:20s} {f / 1e12:8.1f} TFLOP")
    print(f"  nominal total {total / 1e12:.1f} TFLOP -> {total / wall_s / 1e9:.1f} GFLOP/s over the wall time")
    if rate:
        print(f"sgemm {rate:.1f} GFLOP/s: the run reaches {100 * total / wall_s / 1e9 / rate:.1f}% of it")
    for r in lins:
        ok = r["relative_error"] < r["rtn_relative_error"]
        print(f"  {r['module']:20s} [{r['out_features']}, {r['in_features']}] error {r['relative_error']:.4e} RTN "
              f"{r['rtn_relative_error']:.4e} {'below' if ok else 'NOT below'} solve {r['solve_s']:.1f} s")


def main():
    work = sys.argv[1]
    os.makedirs(work, exist_ok=True)
    if "--report" not in sys.argv:
        if "--reuse" not in sys.argv:
            synth(work)
        quantize(work)
    report(work)


if __name__ == "__main__":
    main()
