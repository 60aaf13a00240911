"""Crash and resume: kill -9 of one rank in the middle of a 3-stage run ends the whole job within 30 s; the
same command again finishes and its output is bit-identical to an uninterrupted run. A shard altered after
completion is detected on resume and the block is redone. A different run into the same directory is refused
unless --overwrite."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-resume-")
model = os.path.join(work, "model")
calib = os.path.join(work, "calib.npy")
pq.run(["synth", "--out", model, "--hidden-size", 384, "--intermediate-size", 1024, "--num-layers", 6,
        "--num-heads", 6, "--num-kv-heads", 2, "--vocab-size", 512, "--dtype", "bf16", "--seed", 5])
pq.run(["synth-tokens", "--out", calib, "--count", 40 * 128 + 7, "--vocab-size", 512, "--seed", 6])
results = []


def quantize_args(out, extra=(), bits=4):
    return ["quantize", "--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 40, "--method", "gptq",
            "--bits", bits, "--group-size", 128, "--out", out] + list(extra)


clean = os.path.join(work, "clean")
t0 = time.time()
pq.run(quantize_args(clean), np=3)
clean_seconds = time.time() - t0

# the crash: start the 3-stage run, wait until stage 0 has finished its blocks, kill the rank of stage 1
out = os.path.join(work, "crashed")
cmd = pq.mpi_prefix(3) + [pq.binary()] + [str(a) for a in quantize_args(out)]
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
log = []
killed = None
deadline = time.time() + 300
while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
        break
    log.append(line)
    if line.startswith("block   2/6"):
        time.sleep(min(1.0, clean_seconds / 12))  # into stage 1's first block
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"OMPI_COMM_WORLD_RANK=1" in environ:
                os.kill(int(pid), signal.SIGKILL)
                killed = time.time()
        break
rest = ""
try:
    rest, _ = proc.communicate(timeout=60)
except subprocess.TimeoutExpired:
    proc.kill()
ended = time.time()
results.append((f"a rank was killed during the run", killed is not None))
if killed is not None:
    results.append((f"the job ended {ended - killed:.1f} s after the kill with exit code {proc.returncode}",
                    proc.returncode != 0 and ended - killed < 30))
import h5py  # noqa: E402
with h5py.File(os.path.join(out, "model.h5"), "r") as f:
    results.append(("model.h5 of the crashed run is not marked complete", int(f.attrs["complete"]) == 0))

p = pq.run(quantize_args(out), np=3)
results.append(("the rerun resumed (skipped verified blocks)", "resumed" in p.stdout))
diff = pq.compare_outputs(clean, out)
results.append(("resumed output bit-identical to the uninterrupted run" + (f": {diff[:3]}" if diff else ""), not diff))

# alter block 3's packed data after completion: detected and redone
shard = os.path.join(out, "shard-00001-of-00003.h5")
with h5py.File(shard, "r+") as f:
    d = f["blocks/3/mlp.up_proj/qweight"]
    v = d[0, 0]
    d[0, 0] = v ^ 0x5
insp = pq.run(["inspect", out], check=False)
results.append(("inspect reports the altered dataset and exits 1",
                insp.returncode == 1 and "MISMATCH" in insp.stdout and "qweight" in insp.stdout))
p = pq.run(quantize_args(out), np=3)
results.append(("the altered block was detected on resume", "block 3 fails its checksums" in p.stdout))
diff = pq.compare_outputs(clean, out)
results.append(("after redoing it the output is bit-identical again" + (f": {diff[:3]}" if diff else ""), not diff))

# a different run into the same directory is refused, unless --overwrite
p = pq.run(quantize_args(out, bits=3), np=3, check=False, timeout=30)
err = [l for l in (p.stderr + p.stdout).splitlines() if "error:" in l]
results.append(("a different fingerprint is refused with a clear message",
                p.returncode != 0 and bool(err) and "--overwrite" in err[0]))
results.append(("the refusal names what changed", bool(err) and "the arguments differ (--bits)" in err[0]))
# the same files under another spelling of their paths are the same run; a same-shaped model with other weights
# is not
respelled = ["quantize", "--model", model + "/", "--calib", os.path.relpath(calib), "--seq-len", 128, "--nsamples", 40,
             "--method", "gptq", "--bits", 4, "--group-size", 128, "--out", out]
p = pq.run(respelled, np=3)
results.append(("respelled --model and --calib paths resume the run", "resumed" in p.stdout))
other = os.path.join(work, "other-model")
pq.run(["synth", "--out", other, "--hidden-size", 384, "--intermediate-size", 1024, "--num-layers", 6,
        "--num-heads", 6, "--num-kv-heads", 2, "--vocab-size", 512, "--dtype", "bf16", "--seed", 55])
shutil.copy(os.path.join(other, "model.safetensors"), os.path.join(model, "model.safetensors"))
p = pq.run(quantize_args(out), np=3, check=False, timeout=30)
err = [l for l in (p.stderr + p.stdout).splitlines() if "error:" in l]
results.append(("a checkpoint replaced by other weights of the same shapes is refused",
                p.returncode != 0 and bool(err) and "the model differs" in err[0]))
p = pq.run(quantize_args(out, ["--overwrite"], bits=3), np=3)
results.append(("--overwrite replaces it", "output:" in p.stdout and "resumed" not in p.stdout))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
