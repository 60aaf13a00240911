"""Mixture-of-Experts: eval of the shared mixtral-tiny checkpoint (MixtralForCausalLM, 8 experts, top 2) matches
its reference perplexities, computed by an independent float32 implementation of the transformers semantics, to
1e-4 relative on 1 and 2 ranks; quantize and plan refuse it with one line (experts are not quantized yet)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

TOL = 1e-4
SEQ = 128


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
    for command in (["quantize", "--calib", pq.testdata("text/tiny6L_heldout.tok4k.npy"), "--out",
                     os.path.join(os.environ.get("TMPDIR", "/tmp"), "pipequant-e2e-moe-never")],
                    ["plan"]):
        p = pq.run([command[0], "--model", model, "--seq-len", SEQ] + command[1:], np=1, check=False, timeout=60)
        lines = [l for l in p.stderr.splitlines() if "error:" in l]
        results.append((f"{command[0]} refuses: rc {p.returncode}: {lines[0] if lines else p.stderr[-200:]}",
                        p.returncode != 0 and len(lines) == 1 and "Mixture-of-Experts" in lines[0]
                        and "mixtral-tiny/config.json" in lines[0]))
    pq.finish(results)


main()
