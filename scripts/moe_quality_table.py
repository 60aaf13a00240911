"""The Mixture-of-Experts table of docs/quality.md: mixtral-tiny quantized with RTN and with GPTQ in both
--moe-calibration modes at 4 and 3 bits, each evaluated on the held-out tenth of its training text. Prints markdown.

    /usr/bin/python3 scripts/moe_quality_table.py [--nsamples 128]
"""
import argparse
import os
import shutil
import tempfile

import pq

SEQ = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    args = ap.parse_args()
    model = pq.testdata("mixtral-tiny")
    calib = pq.testdata("text/tiny6L_wikitext2_test.tok4k.npy")  # calibration windows from its first 90%
    heldout = pq.testdata("text/wikitext2_test_last10pct.tok4k.npy")
    work = tempfile.mkdtemp(prefix="pipequant-moe-quality-")
    fp = pq.perplexity(pq.run(["eval", "--model", model, "--tokens", heldout, "--seq-len", SEQ]).stdout)
    print(f"full precision: perplexity {fp:.4f}\n")
    print("| bits | method | --moe-calibration | perplexity | vs fp | mean rel. error (experts) | mean rel. error "
          "(attention) | expert linears at or below RTN's error | low-token experts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits in (4, 3):
        for method, mode in (("rtn", "-"), ("gptq", "routed"), ("gptq", "all")):
            out = os.path.join(work, f"{method}{bits}{mode}")
            metrics = out + ".jsonl"
            extra = ["--moe-calibration", mode] if mode != "-" else []
            pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", SEQ, "--nsamples", args.nsamples,
                    "--method", method, "--bits", bits, "--group-size", 128, "--out", out, "--metrics", metrics] +
                   extra)
            p = pq.perplexity(pq.run(["eval", "--model", model, "--quantized", out, "--tokens", heldout,
                                      "--seq-len", SEQ]).stdout)
            linears = [r for r in pq.read_metrics(metrics) if r.get("record") == "linear"]
            experts = [r for r in linears if r["expert_tokens"] >= 0]
            attention = [r for r in linears if r["expert_tokens"] < 0]
            mean = lambda rs: sum(r["relative_error"] for r in rs) / len(rs)  # noqa: E731
            below = sum(r["relative_error"] <= r["rtn_relative_error"] * (1 + 1e-12) for r in experts)
            low = len({(r["block"], r["module"].rsplit(".", 1)[0]) for r in experts
                       if r["expert_hessian"] == "all (low tokens)"})
            print(f"| {bits} | {method} | {mode} | {p:.4f} | {p / fp - 1:+.2%} | {mean(experts):.3e} | "
                  f"{mean(attention):.3e} | {below}/{len(experts)} | {low} |")
    shutil.rmtree(work, ignore_errors=True)


main()
