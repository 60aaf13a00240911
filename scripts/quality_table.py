#!/usr/bin/python3
"""Quantizes the two real test checkpoints with RTN, GPTQ and AWQ at several settings, evaluates perplexity, and
prints a markdown table (FP, RTN, GPTQ, AWQ; bits x group) with the per-linear relative output errors.

usage: quality_table.py [--models stories260K,tiny-llama-6L] [--md OUT.md] [--json OUT.json] [--work DIR]
       quality_table.py --from-json RESULTS.json [--md OUT.md]     (the table again from saved results)
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pq  # noqa: E402

MODELS = {
    "stories260K": dict(model="stories260K", calib="text/tinystories_calib.tok512.npy",
                        judge="text/tinystories_eval.tok512.npy", extra=[], seq=256,
                        settings=[(4, 32), (4, -1), (3, 32), (3, -1)]),
    "tiny-llama-6L": dict(model="tiny-llama-6L", calib="text/tiny6L_calib.tok4k.npy",
                          judge="text/tiny6L_heldout.tok4k.npy", extra=[("wikitext2", "text/tiny6L_wikitext2_test.tok4k.npy")],
                          seq=256, settings=[(4, 128), (4, -1), (3, 128), (3, -1)]),
}


def evaluate(model_dir, tokens, seq, quantized=None):
    args = ["eval", "--model", model_dir, "--tokens", tokens, "--seq-len", seq]
    if quantized:
        args += ["--quantized", quantized]
    return pq.perplexity(pq.run(args, np=1).stdout)


METHODS = ("rtn", "gptq", "awq")


def run_model(name, work, settings=None, extras=True):
    """settings: (bits, group) pairs to run (default: the model's full list); extras: also evaluate the
    extra token files (WikiText-2 for tiny-llama-6L, 5x the judge file's length)."""
    spec = dict(MODELS[name])
    if settings is not None:
        spec["settings"] = settings
    if not extras:
        spec["extra"] = []
    model_dir = pq.testdata(spec["model"])
    judge = pq.testdata(spec["judge"])
    seq = spec["seq"]
    result = {"model": name, "fp": {"judge": evaluate(model_dir, judge, seq)}, "runs": []}
    for label, path in spec["extra"]:
        result["fp"][label] = evaluate(model_dir, pq.testdata(path), seq)
    for bits, group in spec["settings"]:
        for method in METHODS:
            out = os.path.join(work, f"{name}-{method}-{bits}b-g{group}")
            metrics = out + ".metrics.jsonl"
            pq.run(["quantize", "--model", model_dir, "--calib", pq.testdata(spec["calib"]), "--seq-len", seq,
                    "--method", method, "--bits", bits, "--group-size", group, "--out", out, "--metrics", metrics,
                    "--overwrite"], np=1)
            run = {"method": method, "bits": bits, "group": group, "judge": evaluate(model_dir, judge, seq, out),
                   "linears": [r for r in pq.read_metrics(metrics) if r["record"] == "linear"]}
            for label, path in spec["extra"]:
                run[label] = evaluate(model_dir, pq.testdata(path), seq, out)
            result["runs"].append(run)
            print(f"{name} {method} {bits}-bit group {group}: perplexity {run['judge']:.4f}", flush=True)
    return result


def markdown(results):
    lines = []
    for res in results:
        spec = MODELS[res["model"]]
        extra = [label for label, _ in spec["extra"]]
        lines.append(f"### {res['model']}  (judge: `{spec['judge']}`, windows of {spec['seq']} tokens; "
                     f"calibration `{spec['calib']}`)\n")
        head = "| setting | method | perplexity |" + "".join(f" {e} ppl |" for e in extra) + \
               " mean rel. error | max rel. error | linears at or below RTN's error |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        lines.append(f"| fp | - | {res['fp']['judge']:.4f} |" + "".join(f" {res['fp'][e]:.4f} |" for e in extra)
                     + " - | - | - |")
        for run in res["runs"]:
            errs = [l["relative_error"] for l in run["linears"]]
            better = sum(1 for l in run["linears"] if l["relative_error"] <= l["rtn_relative_error"])
            better = f"{better}/{len(errs)}" if run["method"] != "rtn" else "-"
            g = "per-row" if run["group"] == -1 else f"g{run['group']}"
            lines.append(f"| {run['bits']}-bit {g} | {run['method']} | {run['judge']:.4f} |"
                         + "".join(f" {run[e]:.4f} |" for e in extra)
                         + f" {sum(errs) / len(errs):.3e} | {max(errs):.3e} | {better} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--md")
    ap.add_argument("--json")
    ap.add_argument("--work")
    ap.add_argument("--from-json", help="print the table of results saved with --json instead of running")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            results = json.load(f)
    else:
        work = a.work or tempfile.mkdtemp(prefix="pipequant-quality-")
        results = [run_model(m, work) for m in a.models.split(",")]
    md = markdown(results)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.json and not a.from_json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
