"""Helpers to run the pipequant binary from Python scripts and tests."""
import json
import os
import re
import shutil
import subprocess
import sys

SOURCE_DIR = os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def binary():
    b = os.environ.get("PIPEQUANT_BIN") or os.path.join(SOURCE_DIR, "build", "pipequant")
    if not os.path.exists(b):
        sys.exit(f"pipequant binary not found at {b} (build it, or set PIPEQUANT_BIN)")
    return b


def testdata(rel=""):
    base = os.environ.get("PIPEQUANT_TESTDATA") or os.environ.get("PIPEQUANT_TESTDATA_DEFAULT") or os.path.join(
        SOURCE_DIR, "..", "shared", "testdata")
    return os.path.join(base, rel)


def mpiexec():
    return os.environ.get("PIPEQUANT_MPIEXEC") or shutil.which("mpirun") or "mpirun"


def mpi_prefix(np):
    cmd = [mpiexec(), "-np", str(np)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + ["--oversubscribe", "--bind-to", "none"]


def run(args, np=None, timeout=600, check=True):
    """Runs pipequant with args (list), under mpirun -np N when np is given. Returns CompletedProcess."""
    cmd = (mpi_prefix(np) if np else []) + [binary()] + [str(a) for a in args]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def perplexity(stdout):
    m = re.search(r"^perplexity: ([0-9.eE+-]+)$", stdout, re.M)
    if not m:
        raise RuntimeError("no 'perplexity:' line in output:\n" + stdout)
    return float(m.group(1))


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


PACKED = ("qweight", "qzeros", "scales", "g_idx")


def packed_datasets(out_dir, dense=False):
    """{'/blocks/<i>/<module>/<dataset>': bytes} for every packed dataset, read through model.h5's links; with
    dense, also '/blocks/<i>/<tensor>' for the block's dense tensors (norms, biases)."""
    import h5py
    result = {}
    with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
        if int(f.attrs["complete"]) != 1:
            raise RuntimeError(f"{out_dir}/model.h5 is not complete")
        for b in f["blocks"]:
            blk = f["blocks"][b]
            for module in blk:
                if isinstance(blk[module], h5py.Group):
                    for d in PACKED:
                        result[f"/blocks/{b}/{module}/{d}"] = blk[module][d][()].tobytes()
                elif dense:
                    result[f"/blocks/{b}/{module}"] = blk[module][()].tobytes()
    return result


def compare_outputs(a, b):
    """List of differences between the packed datasets and block tensors of two outputs (empty = bit-identical)."""
    da, db = packed_datasets(a, dense=True), packed_datasets(b, dense=True)
    problems = []
    if set(da) != set(db):
        problems.append(f"dataset sets differ: {sorted(set(da) ^ set(db))[:5]}")
    for k in sorted(set(da) & set(db)):
        if da[k] != db[k]:
            problems.append(f"{k} differs")
    if not da:
        problems.append("no packed datasets")
    return problems


def read_safetensors(path):
    """{name: numpy array} of one .safetensors file: F32, F16 and BF16 tensors as float32, I32 as int32."""
    import json
    import struct
    import numpy as np
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        s, e = t["data_offsets"]
        data = raw[8 + n + s:8 + n + e]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] == "I32":  # packed codes, zeros and group indices: kept as integers
            a = np.frombuffer(data, dtype=np.int32)
        else:
            a = np.frombuffer(data, dtype={"F32": np.float32, "F16": np.float16}[t["dtype"]]).astype(np.float32)
        out[name] = a.reshape(t["shape"])
    return out


def finish(results):
    """Prints each (name, ok) check of an end-to-end test, a summary line, and exits 1 when any failed."""
    failed = 0
    for name, ok in results:
        failed += not ok
        print(("ok   " if ok else "FAIL ") + name)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    # pq.py compare OUT_A OUT_B: are the packed datasets of two outputs bit-identical?
    if len(sys.argv) != 4 or sys.argv[1] != "compare":
        sys.exit("usage: pq.py compare OUT_A OUT_B")
    diffs = compare_outputs(sys.argv[2], sys.argv[3])
    for d in diffs:
        print(d)
    print("identical" if not diffs else f"{len(diffs)} differences")
    sys.exit(1 if diffs else 0)
