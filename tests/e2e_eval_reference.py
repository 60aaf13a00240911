"""Perplexity of the original checkpoints through `pipequant eval` against the independent reference figures."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

checks = []
ref = json.load(open(pq.testdata("stories260K/reference_perplexity.json")))
out = pq.run(["eval", "--model", pq.testdata("stories260K"), "--tokens", pq.testdata(ref["eval_tokens"]),
              "--seq-len", ref["window"]], np=1).stdout
checks.append(("stories260K eval", pq.perplexity(out), ref["perplexity_fp64"], 1e-3))
if f"{ref['windows']} windows" not in out:
    checks.append(("stories260K window count", 0, 1, 0))

ref6 = json.load(open(pq.testdata("tiny-llama-6L/reference_perplexity.json")))
out = pq.run(["eval", "--model", pq.testdata("tiny-llama-6L"), "--tokens", pq.testdata("text/tiny6L_heldout.tok4k.npy"),
              "--seq-len", 256], np=1).stdout
checks.append(("tiny-llama-6L heldout", pq.perplexity(out), ref6["heldout_all_windows"]["perplexity"], 1e-3))
out = pq.run(["eval", "--model", pq.testdata("tiny-llama-6L"), "--tokens",
              pq.testdata("text/tiny6L_wikitext2_test.tok4k.npy"), "--seq-len", 256, "--max-windows", 48], np=1).stdout
checks.append(("tiny-llama-6L wikitext2 first 48", pq.perplexity(out),
               ref6["wikitext2_test_first_48_windows"]["perplexity"], 1e-3))

failed = 0
for name, got, want, tol in checks:
    rel = abs(got - want) / want
    ok = rel <= tol
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: perplexity {got:.6f}, reference {want:.6f}, relative difference {rel:.2e} (limit {tol:g})")
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
