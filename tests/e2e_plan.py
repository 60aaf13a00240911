"""`pipequant plan`: one process plans any world size from config.json and the safetensors headers alone.
(a) the shared checkpoints for several world sizes, its table equal to quantize --dry-run's, under mpirun only
rank 0 printing; (b) a sparse Llama-3.1-405B-shaped checkpoint (real headers, data regions that are holes: ~800 GB
apparent, no disk) on 64 ranks within 20 s and 2 GB of peak RSS, every stage's host peak above the fp32 down_proj
Hessian, and budgets it does not fit refused naming the budget; (c) quantize carries the plan into its metrics and
refuses, before any work, a plan that does not fit --host-mem."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402
import sparse_checkpoint  # noqa: E402

STORIES = pq.testdata("stories260K")
TINY = pq.testdata("tiny-llama-6L")
CALIB = pq.testdata("text/tinystories_calib.tok512.npy")
results = []


def check(name, ok):
    results.append((name, bool(ok)))


def plan_json(model, *args, np=None, check_rc=True):
    p = pq.run(["plan", "--model", model, "--json"] + list(args), np=np, check=check_rc)
    objects = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p, objects


def shape_ok(j, world, per_stage, layers):
    """The JSON shape of the issue: world, ranks_per_stage, stages [{stage, ranks, blocks [first, last], host_peak_gb,
    device_peak_gb}] covering every block once, in order, and fits."""
    stages = j.get("stages", [])
    ok = j.get("world") == world and j.get("ranks_per_stage") == per_stage and isinstance(j.get("fits"), bool)
    ok = ok and len(stages) == world // per_stage
    nxt = 0
    for i, s in enumerate(stages):
        ok = ok and s["stage"] == i and s["ranks"] == per_stage and s["blocks"][0] == nxt
        ok = ok and s["blocks"][1] >= s["blocks"][0] and s["host_peak_gb"] > 0 and s["device_peak_gb"] > 0
        nxt = s["blocks"][1] + 1
    return ok and nxt == layers


# ---- (a) the shared checkpoints, several world sizes, one process each
for model, layers in ((STORIES, 5), (TINY, 6)):
    for world, per_stage in ((1, 1), (2, 1), (3, 1), (5, 1), (4, 2)):
        p, objs = plan_json(model, "--world", world, "--ranks-per-stage", per_stage, "--seq-len", 128,
                            "--nsamples", 16)
        check(f"{os.path.basename(model)} world {world} D={per_stage}: one JSON object of the documented shape",
              len(objs) == 1 and shape_ok(objs[0], world, per_stage, layers) and objs[0]["fits"])

# the table is quantize --dry-run's (same stages, blocks and peaks), printed by one process
for world in (1, 2):
    table = pq.run(["plan", "--model", STORIES, "--world", world, "--seq-len", 128, "--nsamples", 16]).stdout
    dry = pq.run(["quantize", "--model", STORIES, "--calib", CALIB, "--seq-len", 128, "--nsamples", 16,
                  "--out", os.path.join(tempfile.gettempdir(), "pipequant-e2e-plan-unused"), "--dry-run"],
                 np=world).stdout

    def rows(text):
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("plan: "))
        return lines[start:start + 2 + world]

    def same_table(a, b):
        """Equal rows, but the host peak within 5%: it holds the planning process's own resident set, which differs
        a little between `plan` and quantize (the calibration file, mpirun)."""
        if len(a) != len(b) or a[:2] != b[:2]:
            return False
        for x, y in zip(a[2:], b[2:]):
            fx, fy = x.split(), y.split()
            if len(fx) != len(fy) or fx[:4] + fx[5:] != fy[:4] + fy[5:]:
                return False
            if abs(float(fx[4]) / float(fy[4]) - 1) > 0.05:
                return False
        return True

    check(f"plan --world {world} prints quantize --dry-run's table on np {world}: {rows(table)[2:]} vs {rows(dry)[2:]}",
          same_table(rows(table), rows(dry)) and "peak per rank by phase" in table)
# under mpirun only rank 0 prints; --world defaults to the ranks running it
p, objs = plan_json(STORIES, "--seq-len", 128, "--nsamples", 16, np=2)
check(f"under mpirun -np 2: {len(objs)} JSON object(s), world {objs[0]['world'] if objs else '-'}",
      len(objs) == 1 and objs[0]["world"] == 2)
p = pq.run(["plan", "--model", STORIES, "--world", 2, "--seq-len", 128, "--nsamples", 16, "--verbose"], np=2)
check("under mpirun -np 2 the table is printed once, with the memory terms (--verbose)",
      p.stdout.count("plan: 2 ranks") == 1 and "block_weights_held" in p.stdout)
# layouts that cannot be made are one clear error
p = pq.run(["plan", "--model", STORIES, "--world", 6, "--seq-len", 128], check=False)
check("world 6 on 5 blocks: refused naming the blocks",
      p.returncode != 0 and "the model has only 5 blocks" in p.stdout + p.stderr)
p = pq.run(["plan", "--model", STORIES, "--world", 4, "--ranks-per-stage", 4, "--seq-len", 128, "--nsamples", 16],
           check=False)
check("D=4 with 2 Hessian chunks of samples: refused naming --nsamples",
      p.returncode != 0 and "--nsamples" in p.stdout + p.stderr)

# ---- (b) a sparse Llama-3.1-405B: real headers, data regions that are holes
H, I, L, HEADS, KV, V, HD = 16384, 53248, 126, 128, 8, 128256, 128
CONFIG_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
    "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
    "vocab_size": V, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu"}


def block_tensors(b):
    p = f"model.layers.{b}."
    return [(p + "input_layernorm.weight", [H]), (p + "post_attention_layernorm.weight", [H]),
            (p + "self_attn.q_proj.weight", [HEADS * HD, H]), (p + "self_attn.k_proj.weight", [KV * HD, H]),
            (p + "self_attn.v_proj.weight", [KV * HD, H]), (p + "self_attn.o_proj.weight", [H, HEADS * HD]),
            (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]),
            (p + "mlp.down_proj.weight", [H, I])]


def write_sparse_checkpoint(d, files=8):
    """The sparse 405B checkpoint (scripts/sparse_checkpoint.py) under d; returns its apparent size in bytes."""
    return sparse_checkpoint.write_sparse_checkpoint(d, CONFIG_405B, block_tensors, files)


def timed_plan(args):
    """Runs pipequant plan (one process, no mpirun); returns (returncode, stdout, stderr, wall s, peak RSS bytes)."""
    err = tempfile.TemporaryFile()
    t0 = time.monotonic()
    p = subprocess.Popen([pq.binary(), "plan"] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=err,
                         env=dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    out = p.stdout.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    return p.returncode, out, err.read().decode(), wall, usage.ru_maxrss * 1024


sparse_root = tempfile.mkdtemp(prefix="pipequant-e2e-plan-405b-")
try:
    d405 = os.path.join(sparse_root, "llama-3.1-405b-sparse")
    apparent = write_sparse_checkpoint(d405)
    used = sum(os.stat(os.path.join(d405, f)).st_blocks * 512 for f in os.listdir(d405))
    check(f"sparse 405B: {apparent / 1e9:.0f} GB apparent, {used / 1e6:.1f} MB on disk", apparent > 7e11 and used < 1e8)

    hessian_gb = 4 * I * I / 1e9  # the fp32 53248^2 down_proj Hessian
    base = ["--model", d405, "--world", 64, "--ranks-per-stage", 1, "--seq-len", 2048, "--nsamples", 128]
    rc, out, err, wall, rss = timed_plan(base + ["--json", "--backend", "cpu"])
    j = json.loads(out) if rc == 0 and out.strip() else {}
    print(f"plan of the sparse 405B on 64 ranks: {wall:.2f} s wall, {rss / 1e9:.3f} GB peak RSS")
    check(f"405B on 64 ranks planned in {wall:.2f} s (<= 20) with {rss / 1e9:.3f} GB peak RSS (<= 2), rc {rc} {err}",
          rc == 0 and wall <= 20 and rss <= 2e9)
    check("405B on 64 ranks: the documented JSON shape, 64 stages over 126 blocks", j and shape_ok(j, 64, 1, L))
    peaks = [s["host_peak_gb"] for s in j.get("stages", [])]
    check(f"405B, cpu backend: every stage's host peak ({min(peaks, default=0):.1f} .. {max(peaks, default=0):.1f} GB)"
          f" >= the fp32 down_proj Hessian {hessian_gb:.2f} GB", peaks and min(peaks) >= hessian_gb)
    terms = j["stages"][0]["host_terms_gb"] if j else {}
    check(f"405B stage 0 host terms hold the Hessian accumulator: 16 chunks, so the fp32 partial and the fp64 sum "
          f"({terms.get('hessian', 0):.2f} GB)", abs(terms.get("hessian", 0) - 3 * hessian_gb) < 1e-6)

    rc, out, err, wall, rss = timed_plan(base + ["--json", "--backend", "cuda", "--gpu-mem", 8])
    j = json.loads(out) if out.strip() else {}
    check(f"405B --backend cuda --gpu-mem 8: fits false, refusal names --gpu-mem (rc {rc}): {j.get('refusal')}",
          rc == 1 and j.get("fits") is False and "--gpu-mem is 8" in j.get("refusal", ""))
    rc, out, err, wall, rss = timed_plan(base + ["--backend", "cpu", "--host-mem", 8])
    line = next((x for x in out.splitlines() if x.startswith("fits:")), "")
    check(f"405B --host-mem 8: the table says it does not fit, naming --host-mem (rc {rc}): {line}",
          rc == 1 and line.startswith("fits: no: stage ") and "--host-mem is 8" in line)
    rc, out, err, wall, rss = timed_plan(base + ["--backend", "cpu", "--host-mem", 4000])
    check(f"405B --host-mem 4000: fits (rc {rc})", rc == 0 and "fits: yes" in out)
finally:
    shutil.rmtree(sparse_root, ignore_errors=True)
check("the sparse files are deleted", not os.path.exists(sparse_root))

# ---- (c) quantize: the plan next to the measured peak in the metrics; a budget it does not fit refused first
work = tempfile.mkdtemp(prefix="pipequant-e2e-plan-")
out_dir, metrics = os.path.join(work, "q"), os.path.join(work, "m.jsonl")
p = pq.run(["quantize", "--model", STORIES, "--calib", CALIB, "--seq-len", 128, "--nsamples", 16, "--backend", "cpu",
            "--host-mem", 64, "--metrics", metrics, "--out", out_dir], np=1)
stage = next((r for r in pq.read_metrics(metrics) if r["record"] == "stage"), {})
check(f"quantize --metrics: planned_host_peak_gb {stage.get('planned_host_peak_gb')} beside host_peak_gb "
      f"{stage.get('host_peak_gb')}", stage.get("planned_host_peak_gb", 0) > 0 and stage.get("host_peak_gb", 0) > 0)
check("quantize --host-mem 64 says the plan fits", "memory: every stage fits --host-mem 64" in p.stdout)

# the plan against the measured peak (getrusage) on tiny-llama-6L, 1 rank and 2 stages x 2 ranks: within 15% for
# every stage. stories260K (a few MB of tensors) is below the floor where the process's own memory, which grows
# after planning (BLAS and OpenMP buffers, MPI), is most of the peak.
for np_, d in ((1, 1), (4, 2)):
    m = os.path.join(work, f"tiny-{np_}.jsonl")
    pq.run(["quantize", "--model", TINY, "--calib", CALIB, "--seq-len", 128, "--nsamples", 32, "--backend", "cpu",
            "--ranks-per-stage", d, "--metrics", m, "--out", os.path.join(work, f"tiny-{np_}"), "--threads", 1],
           np=np_)
    for st in (r for r in pq.read_metrics(m) if r["record"] == "stage"):
        planned, measured = st["planned_host_peak_gb"], st["host_peak_gb"]
        check(f"tiny-llama-6L np {np_} (D={d}) stage {st['stage']}: planned host peak {planned:.3f} GB, measured "
              f"{measured:.3f} GB ({100 * (planned / measured - 1):+.1f}%, within 15%)",
              abs(planned / measured - 1) <= 0.15)
refused = os.path.join(work, "refused")
p = pq.run(["quantize", "--model", STORIES, "--calib", CALIB, "--seq-len", 128, "--nsamples", 16, "--backend", "cpu",
            "--host-mem", 0.001, "--out", refused], np=1, check=False)
msg = [x for x in (p.stdout + p.stderr).splitlines() if "--host-mem" in x]
check(f"quantize --host-mem 0.001: refused in one line naming the stage and the budget (rc {p.returncode}): {msg}",
      p.returncode != 0 and len(msg) == 1 and re.search(r"stage 0 needs [0-9.]+ GB of host memory, --host-mem is "
                                                        r"0.001: ", msg[0]))
check("... before any work: no model.h5", not os.path.exists(os.path.join(refused, "model.h5")))
shutil.rmtree(work, ignore_errors=True)

pq.finish(results)
