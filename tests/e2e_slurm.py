"""The sbatch templates under a real Slurm cluster (slurm/local_cluster.sh starts one on this machine):
stories260K quantized by slurm/quantize_single_node.sbatch with the mpirun and the srun launcher and by
slurm/quantize_multi_node.sbatch (one node), 2 ranks = 2 pipeline stages, each output bit-identical to a
direct `mpirun -np 2` run; a job with a bad calibration path fails with the error line in its log and leaves
nothing marked complete. Skipped (exit 77) when no cluster answers, unless PIPEQUANT_SLURM_REQUIRED=1 (set by
launch/test.sh in CI, where it starts the cluster): then that is a failure."""
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402


def cluster_up():
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and any(s.strip() in ("idle", "mixed") for s in p.stdout.splitlines())


if not cluster_up():
    if os.environ.get("PIPEQUANT_SLURM_REQUIRED") == "1":
        print("FAIL: no Slurm cluster answers, and PIPEQUANT_SLURM_REQUIRED=1 (see slurm-start.log in the build tree)")
        sys.exit(1)
    print("skipped: no Slurm cluster answers (start one with slurm/local_cluster.sh)")
    sys.exit(77)

work = tempfile.mkdtemp(prefix="pipequant-e2e-slurm-")
model = pq.testdata("stories260K")
calib = pq.testdata("text/tinystories_calib.tok512.npy")
common = dict(MODEL=model, CALIB=calib, SEQ_LEN="256", NSAMPLES="16", GROUP="32", BITS="4", METHOD="gptq",
              PIPEQUANT_REPO=pq.SOURCE_DIR, PIPEQUANT_BIN=pq.binary(), EXTRA="")
results = []


def submit(script, out, nodes_flags, **env):
    log = os.path.join(work, os.path.basename(out) + ".log")
    e = dict(os.environ, **dict(common, OUT=out, **env))
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
           "--output=" + log] + nodes_flags + [os.path.join(pq.SOURCE_DIR, "slurm", script)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=work, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"sbatch failed: {p.stderr}")
    job = p.stdout.strip().split(";")[0]
    deadline = time.time() + 180
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job])
        return job, "TIMEOUT"
    time.sleep(0.5)  # the log is flushed when the job step ends
    return job, open(log).read() if os.path.exists(log) else ""


direct = os.path.join(work, "direct")
pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", 256, "--nsamples", 16, "--method", "gptq",
        "--bits", 4, "--group-size", 32, "--out", direct], np=2)

runs = [("single node, mpirun", "quantize_single_node.sbatch", [], {"LAUNCHER": "mpirun"}),
        ("single node, srun", "quantize_single_node.sbatch", [], {"LAUNCHER": "srun"}),
        ("multi-node template on 1 node", "quantize_multi_node.sbatch", ["--nodes=1", "--exclusive"],
         {"LAUNCHER": "mpirun"})]
for i, (name, script, flags, env) in enumerate(runs):
    out = os.path.join(work, f"out{i}")
    job, log = submit(script, out, flags, **env)
    finished = "output: " + out + "/model.h5 (complete)" in log and "done: " + out in log
    results.append((f"{name}: job {job} finished with a complete output", finished))
    if finished:
        diff = pq.compare_outputs(direct, out)
        results.append((f"{name}: bit-identical to mpirun -np 2" + (f": {diff[:3]}" if diff else ""), not diff))
        results.append((f"{name}: 2 stages planned", "2 ranks = 2 stages x 1 ranks per stage" in log))
    else:
        print(log[-3000:])

# a bad input inside a job: the job ends, the error line is in its log, nothing is marked complete
bad = os.path.join(work, "bad")
t0 = time.time()
job, log = submit("quantize_single_node.sbatch", bad, [], LAUNCHER="mpirun", CALIB=os.path.join(work, "no-such.npy"))
errors = [l for l in log.splitlines() if "error:" in l]
results.append((f"bad calibration path: job {job} ended in {time.time() - t0:.0f} s with "
                f"'{errors[0].strip() if errors else log[-200:]}'",
                log != "TIMEOUT" and bool(errors) and "no-such.npy" in errors[0] and "done: " not in log))
marker = os.path.join(bad, "model.h5")
if os.path.exists(marker):
    import h5py
    with h5py.File(marker, "r") as f:
        results.append(("bad calibration path: output not marked complete", int(f.attrs.get("complete", 0)) == 0))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
