"""Disk and file-system faults during a quantization, with 1 rank and with 3 (3 stages): the output directory
read-only before a run and before a resume, a shard made unwritable before a resume and in the middle of a run, a
shard file or the whole output directory removed in the middle of a run, a disk that fills up (then grows), and
shards truncated or with bytes of a block's dataset or of its metadata changed after completion. Every failing run must end with a
non-zero exit within 30 s of the fault, with an error line that names the file, no crash signal and nothing marked
complete; the same command afterwards must finish with an output bit-identical to an uninterrupted run.

The faults that need root (a read-only bind mount, a tmpfs, chattr +i) are skipped with a line saying so where they
cannot be made; plain permission bits stand in for the read-only directory when not root (root ignores them)."""
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

import h5py  # noqa: E402

# PIPEQUANT_DISK_FAULT_RANKS="3": fewer runs, for the sanitizer pass (launch/test_sanitizers.sh)
RANKS = tuple(int(r) for r in os.environ.get("PIPEQUANT_DISK_FAULT_RANKS", "1 3").split())
FAULT_DEADLINE_S = 30
work = tempfile.mkdtemp(prefix="pipequant-e2e-disk-")
model = os.path.join(work, "model")
calib = os.path.join(work, "calib.npy")
pq.run(["synth", "--out", model, "--hidden-size", 256, "--intermediate-size", 512, "--num-layers", 6, "--num-heads", 4,
        "--num-kv-heads", 2, "--vocab-size", 512, "--dtype", "bf16", "--seed", 5])
pq.run(["synth-tokens", "--out", calib, "--count", 32 * 128 + 7, "--vocab-size", 512, "--seed", 6])
results = []
undo = []  # what must be undone whatever happens (mounts, immutable files), last first


def quantize_cmd(out, np):
    args = ["quantize", "--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 32, "--method", "gptq",
            "--bits", 4, "--group-size", 128, "--out", out]
    return (pq.mpi_prefix(np) if np > 1 else []) + [pq.binary()] + [str(a) for a in args]


def env():
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")


def kill_tree(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(out, np, fault_after_first_block=None):
    """Runs the quantization; with fault_after_first_block, calls it once the first 'block' progress line is out.
    Returns (exit code or None on a hang, output, seconds from the fault (or the start) to the end)."""
    proc = subprocess.Popen(quantize_cmd(out, np), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), start_new_session=True)
    t0 = time.time()
    log = []
    if fault_after_first_block:
        for line in proc.stdout:
            log.append(line)
            if line.startswith("block "):
                fault_after_first_block()
                t0 = time.time()
                break
    try:
        rest, _ = proc.communicate(timeout=FAULT_DEADLINE_S if fault_after_first_block else 300)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return None, "".join(log), time.time() - t0
    return proc.returncode, "".join(log) + rest, time.time() - t0


def marked_complete(out):
    try:
        with h5py.File(os.path.join(out, "model.h5"), "r") as f:
            return int(f.attrs.get("complete", 0)) == 1
    except (OSError, KeyError):
        return False  # no model.h5 (or an unreadable one) marks nothing complete


def expect_failure(name, out, outcome, names):
    """The run failed cleanly: non-zero exit within the deadline, no signal, the first error line names `names`."""
    rc, log, seconds = outcome
    errors = [l.strip() for l in log.splitlines() if "error:" in l]
    first = errors[0] if errors else ""
    crashed = rc is not None and (rc < 0 or rc >= 128) or any(
        s in log for s in ("Segmentation", "signal", "core dumped", "terminate called", "HDF5-DIAG", "AddressSanitizer"))
    problems = []
    if rc is None:
        problems.append(f"no exit within {FAULT_DEADLINE_S} s")
    elif rc == 0:
        problems.append("exit code 0")
    if crashed:
        problems.append("crash signal or diagnostics in the output")
    if not first or names not in first:
        problems.append(f"no error line naming {names}")
    if marked_complete(out):
        problems.append("model.h5 marked complete")
    results.append((f"{name}: rc {rc}, {seconds:.1f} s, {len(errors)} error line(s): {first or log.strip()[-400:]}"
                    + (f"  <- {'; '.join(problems)}" if problems else ""), not problems))


def expect_resumed(name, out, np, reference, detected=None):
    """The same command finishes with the uninterrupted run's output; with `detected`, a resume line says so."""
    rc, log, seconds = run(out, np)
    if rc != 0:
        results.append((f"{name}: the rerun failed (rc {rc}): {log.strip()[-600:]}", False))
        return
    diff = pq.compare_outputs(reference[np], out)
    notes = [l.split(": ", 1)[1] for l in log.splitlines() if l.startswith("resume:") and "fingerprint" not in l]
    found = detected is None or any(detected in n for n in notes)
    results.append((f"{name}: the rerun finished in {seconds:.1f} s, bit-identical to an uninterrupted run"
                    + (f" ({'; '.join(notes)[:300]})" if notes else "") + (f": {diff[:3]}" if diff else "")
                    + ("" if found else f"  <- no resume line with '{detected}'"), not diff and found))


def sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True).returncode == 0


def is_root():
    return os.geteuid() == 0


# ---------------------------------------------------------------------------------------------------------
# what this machine can do

def probe_chattr():
    p = os.path.join(work, "chattr-probe")
    open(p, "w").close()
    ok = sh("chattr", "+i", p)
    if ok:
        sh("chattr", "-i", p)
    os.remove(p)
    return ok and is_root()


def probe_mount():
    d = os.path.join(work, "mount-probe")
    os.makedirs(d)
    ok = is_root() and sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d)
    if ok:
        sh("umount", d)
    os.rmdir(d)
    return ok


def probe_read_only():
    """A read-only bind mount for root; plain permission bits do for anybody else."""
    if not is_root():
        return True
    d = os.path.join(work, "ro-probe")
    os.makedirs(d)
    ok = sh("mount", "--bind", d, d)
    if ok:
        ok = sh("mount", "-o", "remount,ro,bind", d)
        sh("umount", d)
    os.rmdir(d)
    return ok


CAN_CHATTR = probe_chattr()
CAN_MOUNT = probe_mount()
CAN_READ_ONLY = probe_read_only()


def immutable(path):
    sh("chattr", "+i", path)
    undo.append(lambda: sh("chattr", "-i", path))


def writable_again(path):
    sh("chattr", "-i", path)


class ReadOnly:
    """The directory read-only even for root: a read-only bind mount of itself (or mode 0555 when not root)."""

    def __init__(self, d):
        self.d = d

    def __enter__(self):
        if is_root():
            assert sh("mount", "--bind", self.d, self.d) and sh("mount", "-o", "remount,ro,bind", self.d)
            undo.append(lambda: sh("umount", self.d))
        else:
            os.chmod(self.d, 0o555)
        return self

    def __exit__(self, *exc):
        if is_root():
            sh("umount", self.d)
        else:
            os.chmod(self.d, 0o755)


def interrupted_copy(reference, out, last_block):
    """A copy of a complete output as a run killed during block `last_block` leaves it: that block and those after
    it not marked complete, model.h5 not complete."""
    shutil.copytree(reference, out)
    with h5py.File(os.path.join(out, "model.h5"), "r+") as f:
        f.attrs["complete"] = 0
        shards = {int(b): f["blocks"].get(b, getlink=True).filename for b in f["blocks"]}
    for b, shard in shards.items():
        if b >= last_block:
            with h5py.File(os.path.join(out, shard), "r+") as s:
                del s[f"blocks/{b}"].attrs["complete"]


def shard_name(np, stage):
    return f"shard-{stage:05d}-of-{np:05d}.h5"


def dataset_offset(shard, dataset):
    with h5py.File(shard, "r") as f:
        d = f[dataset]
        return d.id.get_offset(), d.id.get_storage_size()


def object_header(shard, obj):
    """The file offset of an object's header (version 2, 'OHDR', checksummed)."""
    with h5py.File(shard, "r") as f:
        addr = h5py.h5o.get_info(f[obj].id).addr
    with open(shard, "rb") as f:
        f.seek(addr)
        assert f.read(4) == b"OHDR", f"{shard}: {obj}: not a version 2 object header"
    return addr


def flip_bytes(path, offset, count):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(x ^ 0xA5 for x in b))


# ---------------------------------------------------------------------------------------------------------
# the faults

reference = {}
for np in RANKS:
    reference[np] = os.path.join(work, f"clean{np}")
    rc, log, _ = run(reference[np], np)
    assert rc == 0, log

try:
    for np in RANKS:
        tag = f"[np {np}]"
        victim = shard_name(np, np // 2)  # the middle stage's shard with 3 ranks: its blocks come after a block line

        # (1) the output directory read-only before a run, and before a resume
        if CAN_READ_ONLY:
            out = os.path.join(work, f"ro-run{np}")
            os.makedirs(out)
            with ReadOnly(out):
                expect_failure(f"{tag} read-only output directory before a run", out, run(out, np), out)
            expect_resumed(f"{tag} read-only output directory before a run", out, np, reference)

            out = os.path.join(work, f"ro-resume{np}")
            interrupted_copy(reference[np], out, last_block=3)
            with ReadOnly(out):
                expect_failure(f"{tag} read-only output directory before a resume", out, run(out, np), out)
            expect_resumed(f"{tag} read-only output directory before a resume", out, np, reference)
        else:
            print(f"skipped {tag}: read-only output directory (root, and a read-only bind mount is not allowed here)")

        # (2) a shard unwritable before a resume and during a run; a shard or the directory removed during a run
        if CAN_CHATTR:
            out = os.path.join(work, f"immutable-resume{np}")
            interrupted_copy(reference[np], out, last_block=3)
            immutable(os.path.join(out, victim))
            expect_failure(f"{tag} shard unwritable (chattr +i) before a resume", out, run(out, np), victim)
            writable_again(os.path.join(out, victim))
            expect_resumed(f"{tag} shard unwritable (chattr +i) before a resume", out, np, reference)

            out = os.path.join(work, f"immutable-run{np}")
            expect_failure(f"{tag} shard made unwritable (chattr +i) during the run", out,
                           run(out, np, lambda o=out: immutable(os.path.join(o, victim))), victim)
            writable_again(os.path.join(out, victim))
            expect_resumed(f"{tag} shard made unwritable (chattr +i) during the run", out, np, reference)
        else:
            print(f"skipped {tag}: unwritable shard (needs root and chattr +i on this file system)")

        out = os.path.join(work, f"removed-shard{np}")
        expect_failure(f"{tag} shard file removed during the run", out,
                       run(out, np, lambda o=out: os.remove(os.path.join(o, victim))), victim)
        expect_resumed(f"{tag} shard file removed during the run (model.h5 remains)", out, np, reference,
                       detected=f"{victim} is missing")

        out = os.path.join(work, f"removed-dir{np}")
        expect_failure(f"{tag} output directory removed during the run", out,
                       run(out, np, lambda o=out: shutil.rmtree(o)), "shard-")
        expect_resumed(f"{tag} output directory removed during the run", out, np, reference)

        # (3) a disk that fills up, then grows: the output resumes (the error line itself is e2e_bad_inputs's)
        if CAN_MOUNT:
            disk = os.path.join(work, f"disk{np}")
            os.makedirs(disk)
            size_kb = sum(os.path.getsize(os.path.join(reference[np], f)) for f in os.listdir(reference[np])) // 2048
            assert sh("mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", disk)
            undo.append(lambda d=disk: sh("umount", d))
            out = os.path.join(disk, "out")
            expect_failure(f"{tag} disk full ({size_kb} kB) during the run", out, run(out, np), "shard-")
            sh("mount", "-o", "remount,size=16m", disk)
            expect_resumed(f"{tag} disk full, then grown", out, np, reference)
            sh("umount", disk)
        else:
            print(f"skipped {tag}: disk full (needs root to mount a tmpfs)")

        # (4) after completion: a shard truncated, a block's dataset with bytes changed on disk
        out = os.path.join(work, f"truncated{np}")
        shutil.copytree(reference[np], out)
        path = os.path.join(out, victim)
        os.truncate(path, os.path.getsize(path) // 2)
        expect_resumed(f"{tag} shard truncated to half after completion", out, np, reference,
                       detected="cannot be read")

        out = os.path.join(work, f"flipped{np}")
        shutil.copytree(reference[np], out)
        path = os.path.join(out, victim)
        offset, size = dataset_offset(path, "blocks/3/mlp.down_proj/qweight")
        flip_bytes(path, offset + size // 2, 16)
        expect_resumed(f"{tag} 16 bytes of block 3's down_proj qweight changed on disk", out, np, reference,
                       detected="block 3 fails its checksums ( mlp.down_proj/qweight )")

        # the object header of block 3's up_proj group damaged: HDF5 cannot read it, so the block cannot be replaced
        # in place either; the shard starts over
        out = os.path.join(work, f"damaged-header{np}")
        shutil.copytree(reference[np], out)
        path = os.path.join(out, victim)
        flip_bytes(path, object_header(path, "blocks/3/mlp.up_proj") + 12, 4)
        expect_resumed(f"{tag} 4 bytes of block 3's up_proj object header changed on disk", out, np, reference,
                       detected="block 3 has damaged metadata")
finally:
    for u in reversed(undo):
        u()

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
