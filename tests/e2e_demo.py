"""launch/demo.sh end to end, on 2 ranks, with the binary under test (PIPEQUANT_SKIP_BUILD=1: the test must not
reconfigure or rebuild the build directory that the other tests run from):
- every section runs, in order, and the demo ends with its summary;
- the float32 perplexity of models/stories260K is the independent float64 reference's (5.7553);
- the results table has a row per method whose "vs fp32" column is its perplexity over the float32 one;
- 4-bit g32 costs perplexity (each method above float32, all within 25% of it) and GPTQ and AWQ beat RTN;
- the exported Hugging Face GPTQ checkpoint holds what it should and evaluates to the GPTQ output's perplexity;
- inspect verifies every checksum;
- a failing step is named: PIPEQUANT_DEMO_NP=0 fails in the first quantize step."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

DEMO = os.path.join(pq.SOURCE_DIR, "launch", "demo.sh")
SECTIONS = ["build", "the model: stories260K", "perplexity of the original model (float32)",
            "quantize: GPTQ 4-bit, group 32, 2 rank(s)", "quantize: RTN 4-bit, group 32, 2 rank(s)",
            "quantize: AWQ 4-bit, group 32, 2 rank(s)", "perplexity of the GPTQ output (dequantized on the fly)",
            "perplexity of the RTN output (dequantized on the fly)",
            "perplexity of the AWQ output (dequantized on the fly)",
            "results: perplexity on held-out TinyStories text (lower is better)",
            "export the GPTQ output as a Hugging Face GPTQ checkpoint", "perplexity of the exported GPTQ checkpoint",
            "inspect the GPTQ output"]
# float64 reference forward pass of the same checkpoint on the same windows (testdata/stories260K/README.md);
# float32 GEMMs over 64-wide dot products stay well within 1e-4 of it
FP_REFERENCE_TOLERANCE = 1e-4

work = tempfile.mkdtemp(prefix="pipequant-e2e-demo-")
results = []


def demo(work_dir, np_):
    env = dict(os.environ, PIPEQUANT_SKIP_BUILD="1", PIPEQUANT_BUILD_DIR=os.path.dirname(pq.binary()),
               PIPEQUANT_DEMO_DIR=work_dir, PIPEQUANT_DEMO_NP=str(np_), PQ_MPIRUN=pq.mpiexec())
    return subprocess.run(["bash", DEMO], capture_output=True, text=True, timeout=600, env=env)


p = demo(os.path.join(work, "demo"), 2)
out = p.stdout
if p.returncode != 0:
    print(out[-3000:] + p.stderr[-3000:])
results.append((f"demo.sh exits 0 (rc {p.returncode}) and ends with its summary",
                p.returncode == 0 and re.search(r"^demo: done in \d+ s; outputs in ", out, re.M) is not None))

sections = re.findall(r"^== (.*)$", out, re.M)
sections = [s for s in sections if not s.startswith("pipequant report")]
results.append((f"sections in order: {sections}", sections == SECTIONS))

# the results table
rows = dict(re.findall(r"^(fp32|gptq|rtn|awq) +\d+ +[-\d]+ +([0-9.]+) +\S+$", out, re.M))
changes = dict(re.findall(r"^(gptq|rtn|awq) +4 +32 +[0-9.]+ +([+-][0-9.]+)%$", out, re.M))
ppl = {k: float(v) for k, v in rows.items()}
has_table = (re.search(r"^method +bits +group +perplexity +vs fp32$", out, re.M) is not None
             and sorted(ppl) == ["awq", "fp32", "gptq", "rtn"] and sorted(changes) == ["awq", "gptq", "rtn"])
results.append((f"results table: header and rows fp32, gptq, rtn, awq: {ppl}, changes {changes}", has_table))
if has_table:
    ref = json.load(open(pq.testdata("stories260K/reference_perplexity.json")))["perplexity_fp64"]
    results.append((f"fp32 perplexity {ppl['fp32']} = float64 reference {ref:.6f} within {FP_REFERENCE_TOLERANCE}",
                    abs(ppl["fp32"] - ref) < FP_REFERENCE_TOLERANCE))
    bad = [m for m in changes if abs(float(changes[m]) - 100 * (ppl[m] / ppl["fp32"] - 1)) > 0.006]
    results.append((f"'vs fp32' is 100 (q / fp - 1) in every row (off: {bad})", not bad))
    results.append((f"4-bit g32 costs perplexity: gptq {ppl['gptq']}, rtn {ppl['rtn']}, awq {ppl['awq']} are above "
                    f"fp32 {ppl['fp32']} and within 25% of it",
                    all(ppl["fp32"] < ppl[m] < 1.25 * ppl["fp32"] for m in ("gptq", "rtn", "awq"))))
    results.append((f"GPTQ ({ppl['gptq']}) and AWQ ({ppl['awq']}) beat RTN ({ppl['rtn']})",
                    ppl["gptq"] < ppl["rtn"] and ppl["awq"] < ppl["rtn"]))

# the export and its perplexity
m = re.search(r"^export: perplexity ([0-9.]+) = the GPTQ output's ([0-9.]+): the checkpoint holds the same weights$",
              out, re.M)
results.append((f"the exported checkpoint's perplexity equals the GPTQ output's: {m.groups() if m else None}",
                m is not None and m.group(1) == m.group(2) and float(m.group(2)) == ppl.get("gptq")))
hf = os.path.join(work, "demo", "gptq-hf")
files = sorted(os.listdir(hf)) if os.path.isdir(hf) else []
qc = json.load(open(os.path.join(hf, "quantize_config.json"))) if "quantize_config.json" in files else {}
results.append((f"gptq-hf/ holds {files}; quantize_config {qc.get('quant_method')} {qc.get('bits')}-bit "
                f"group_size {qc.get('group_size')}",
                files == ["config.json", "model.safetensors", "quantize_config.json", "tok512.bin"]
                and (qc.get("quant_method"), qc.get("bits"), qc.get("group_size")) == ("gptq", 4, 32)))

results.append(("inspect of the GPTQ output: 35 linears, all checksums ok",
                re.search(r"^summary: blocks complete 5/5, linears 35, .*all checksums ok$", out, re.M) is not None))

# a failing step is named, and the rest does not run
p = demo(os.path.join(work, "failing"), 0)
results.append((f"PIPEQUANT_DEMO_NP=0: rc {p.returncode}, {p.stderr.strip().splitlines()[-1:]}",
                p.returncode != 0
                and "demo: FAILED in step: quantize: GPTQ 4-bit, group 32, 0 rank(s)" in p.stderr
                and "== results" not in p.stdout))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
