"""Every bad input ends the job with one clear line naming the file and the field, a non-zero exit within
30 s (under mpirun too, with 1 and 2 ranks), and no output marked complete."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

STORIES = pq.testdata("stories260K")
CALIB = pq.testdata("text/tinystories_calib.tok512.npy")
work = tempfile.mkdtemp(prefix="pipequant-e2e-bad-")


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_st(path, header, data, raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def model_copy(name, edit_header=None, edit_config=None, truncate=None, raw=None):
    d = os.path.join(work, name)
    shutil.copytree(STORIES, d)
    st = os.path.join(d, "model.safetensors")
    os.chmod(st, 0o644)
    header, data = read_st(st)
    if edit_header:
        edit_header(header)
        write_st(st, header, data)
    if raw is not None:
        with open(st, "wb") as f:
            f.write(raw(header, data))
    if truncate:
        size = os.path.getsize(st)
        with open(st, "r+b") as f:
            f.truncate(size - truncate)
    if edit_config:
        cfg_path = os.path.join(d, "config.json")
        os.chmod(cfg_path, 0o644)
        cfg = json.load(open(cfg_path))
        edit_config(cfg)
        json.dump(cfg, open(cfg_path, "w"))
    return d


def write_raw(h, d):  # header h and data d as a safetensors file's bytes
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + d


def tokens(name, arr):
    p = os.path.join(work, name)
    np.save(p, arr)
    return p


def set_offsets(name, begin, end):
    def f(h):
        h[name]["data_offsets"] = [begin, end]
    return f


T0 = "model.layers.0.mlp.down_proj.weight"
T1 = "model.layers.0.mlp.gate_proj.weight"
hdr, data = read_st(os.path.join(STORIES, "model.safetensors"))
end0 = hdr[T0]["data_offsets"][1]
calib_ids = np.load(CALIB)

cases = []  # (name, args, expected substrings of the error line)


def quantize_args(model=STORIES, calib=CALIB, out=None, extra=(), bits=4):
    return ["quantize", "--model", model, "--calib", calib, "--seq-len", 128, "--method", "gptq", "--bits", bits,
            "--group-size", 32, "--out", out or os.path.join(work, "out-" + str(len(cases)))] + list(extra)


m = model_copy("truncated", truncate=1000)
cases.append(("truncated safetensors", quantize_args(m), ["model.safetensors"]))
m = model_copy("header-past-end", raw=lambda h, d: struct.pack("<Q", 10 ** 9) + b"{}")
cases.append(("header length past the end", quantize_args(m), ["model.safetensors", "header"]))
m = model_copy("offsets-out-of-range", edit_header=set_offsets(T0, hdr[T0]["data_offsets"][0], len(data) + 4096 + 176))
cases.append(("offsets out of range", quantize_args(m), ["model.safetensors", T0]))
m = model_copy("offsets-overlap", edit_header=set_offsets(T1, end0 - 8, end0 - 8 + 44032))
cases.append(("overlapping offsets", quantize_args(m), ["model.safetensors", "overlap"]))
m = model_copy("unknown-dtype", edit_header=lambda h: h[T0].update(dtype="F9"))
cases.append(("unknown dtype", quantize_args(m), ["model.safetensors", T0, "F9"]))
m = model_copy("shape-mismatch", edit_header=lambda h: h[T0].update(shape=[64, 171]))
cases.append(("shape x dtype not matching the span", quantize_args(m), ["model.safetensors", T0]))


def drop_tensor(name):  # the tensor's entry and its bytes removed; later tensors move down
    def f(h, d):
        b, e = h[name]["data_offsets"]
        h = {k: v for k, v in h.items() if k != name}
        for k, v in h.items():
            if k != "__metadata__" and v["data_offsets"][0] >= e:
                h[k] = dict(v, data_offsets=[v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)])
        return write_raw(h, d[:b] + d[e:])
    return f


m = model_copy("missing-tensor", raw=drop_tensor("model.layers.3.self_attn.v_proj.weight"))
cases.append(("tensor missing for the config", quantize_args(m), ["model.layers.3.self_attn.v_proj.weight"]))
m = model_copy("config-missing-field", edit_config=lambda c: c.pop("hidden_size"))
cases.append(("config missing a field", quantize_args(m), ["config.json", "hidden_size"]))
m = model_copy("config-fewer-layers", edit_config=lambda c: c.update(num_hidden_layers=4))
cases.append(("config with fewer layers than the checkpoint", quantize_args(m),
              ["model.layers.4.", "num_hidden_layers", "config.json"]))
m = model_copy("config-bad-field", edit_config=lambda c: c.update(num_attention_heads="eight"))
cases.append(("config field of the wrong type", quantize_args(m), ["config.json", "num_attention_heads"]))


def add_tensor(name, shape):  # the checkpoint with one more F32 tensor of 0.5s at the end of its data
    def f(h, d):
        h = dict(h)
        h[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(d), len(d) + 4 * int(np.prod(shape))]}
        return write_raw(h, d + np.full(shape, 0.5, np.float32).tobytes())
    return f


# models the forward does not compute exactly are refused, never run as Llama
QNORM = "model.layers.2.self_attn.q_norm.weight"
m = model_copy("qwen3-q-norm", raw=add_tensor(QNORM, [8]))
cases.append(("a tensor the block does not use (Qwen3 q_norm)", quantize_args(m), ["model.safetensors", QNORM,
                                                                                  "not used"]))
m = model_copy("unannounced-bias", raw=add_tensor("model.layers.0.self_attn.o_proj.bias", [64]))
cases.append(("a bias the config does not announce", quantize_args(m),
              ["model.layers.0.self_attn.o_proj.bias", "config.json", "attention_bias"]))
m = model_copy("sliding-window", edit_config=lambda c: c.update(sliding_window=64))
cases.append(("sliding_window below --seq-len", quantize_args(m), ["config.json", "sliding_window", "--seq-len 128"]))
cases.append(("eval: sliding_window below --seq-len", ["eval", "--model", m, "--tokens",
                                                       pq.testdata("text/tinystories_eval.tok512.npy"), "--seq-len",
                                                       256], ["config.json", "sliding_window", "--seq-len 256"]))
m = model_copy("unknown-architecture", edit_config=lambda c: c.update(architectures=["GemmaForCausalLM"]))
cases.append(("unknown architecture", quantize_args(m), ["config.json", "architectures", "GemmaForCausalLM"]))
m = model_copy("no-architectures-gemma", edit_config=lambda c: (c.pop("architectures"), c.update(model_type="gemma")))
cases.append(("no architectures, model_type of another model", quantize_args(m),
              ["config.json", "architectures", "model_type", "gemma"]))
# the safetensors format: one entry per name, tensors covering the data region without holes or trailing bytes
def duplicate_entry(name):
    def f(h, d):
        entry = json.dumps({name: h[name]})[1:-1].encode()
        raw = json.dumps(h).encode()
        raw = raw[:-1] + b", " + entry + b"}"
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + d
    return f


def hole_after(name, gap=8):  # `gap` bytes of nothing after tensor `name`; later tensors move up
    def f(h, d):
        h = dict(h)
        end = h[name]["data_offsets"][1]
        for k, v in h.items():
            if k != "__metadata__" and v["data_offsets"][0] >= end:
                h[k] = dict(v, data_offsets=[v["data_offsets"][0] + gap, v["data_offsets"][1] + gap])
        return write_raw(h, d[:end] + b"\0" * gap + d[end:])
    return f


def set_value(name, index, value):  # one F32 element of a tensor set to `value` (flat index)
    def f(h, d):
        at = h[name]["data_offsets"][0] + 4 * index
        return write_raw(h, d[:at] + struct.pack("<f", value) + d[at + 4:])
    return f


def scale_tensor(name, factor):  # a tensor multiplied by `factor`: finite values that overflow in the forward
    def f(h, d):
        b, e = h[name]["data_offsets"]
        v = (np.frombuffer(d[b:e], np.float32) * np.float32(factor)).astype(np.float32)
        return write_raw(h, d[:b] + v.tobytes() + d[e:])
    return f


m = model_copy("duplicate-name", raw=duplicate_entry(T1))
cases.append(("a tensor name twice in the header", quantize_args(m), ["model.safetensors", T1, "twice"]))
m = model_copy("hole", raw=hole_after(T0))
cases.append(("a hole between two tensors", quantize_args(m), ["model.safetensors", "holes"]))
m = model_copy("trailing-bytes", raw=lambda h, d: write_raw(h, d + b"\0" * 16))
cases.append(("bytes after the last tensor", quantize_args(m), ["model.safetensors", "16 bytes after the last",
                                                                "trailing"]))
EMBED = "model.embed_tokens.weight"
m = model_copy("embed-inf", raw=set_value(EMBED, 5 * 64 + 7, float("inf")))
cases.append(("an inf in the embedding", quantize_args(m), ["model.safetensors", EMBED, "[5, 7]", "inf"]))
cases.append(("eval: an inf in the embedding", ["eval", "--model", m, "--tokens",
                                                pq.testdata("text/tinystories_eval.tok512.npy"), "--seq-len", 256],
              ["model.safetensors", EMBED, "[5, 7]", "inf"]))
NORM3 = "model.layers.3.post_attention_layernorm.weight"
m = model_copy("norm-nan", raw=set_value(NORM3, 10, float("nan")))
cases.append(("a nan in a norm", quantize_args(m), ["model.safetensors", NORM3, "[10]", "nan"]))
Q4 = "model.layers.4.self_attn.q_proj.weight"
m = model_copy("weight-minus-inf", raw=set_value(Q4, 3 * 64 + 2, float("-inf")))
cases.append(("a -inf in a weight", quantize_args(m), ["model.safetensors", Q4, "[3, 2]", "-inf"]))
m = model_copy("overflow-hessian", raw=scale_tensor("model.layers.2.input_layernorm.weight", 1e30))
cases.append(("finite weights whose activations overflow float32", quantize_args(m),
              ["block 2", "Hessian", "self_attn.q_proj", "overflow"]))
cases.append(("eval: finite weights whose activations overflow float32",
              ["eval", "--model", m, "--tokens", pq.testdata("text/tinystories_eval.tok512.npy"), "--seq-len", 256],
              ["block 2", "output holds nan", "eval window 0", "overflow"]))


def config_with_duplicate(d):
    cfg_path = os.path.join(d, "config.json")
    os.chmod(cfg_path, 0o644)
    text = open(cfg_path).read().rstrip().rstrip("}")
    open(cfg_path, "w").write(text + ', "hidden_size": 128}')


m = model_copy("config-duplicate-key")
config_with_duplicate(m)
cases.append(("config.json with a key twice", quantize_args(m), ["config.json", "hidden_size", "twice"]))
m = model_copy("index-duplicate-key")
os.rename(os.path.join(m, "model.safetensors"), os.path.join(m, "model-00001-of-00001.safetensors"))
weight_map = ", ".join(f'"{k}": "model-00001-of-00001.safetensors"' for k in hdr if k != "__metadata__")
open(os.path.join(m, "model.safetensors.index.json"), "w").write(
    '{"metadata": {}, "weight_map": {' + weight_map + f', "{T0}": "model-00001-of-00001.safetensors"' + '}}')
cases.append(("an index with a tensor twice", quantize_args(m), ["model.safetensors.index.json", T0, "twice"]))

# special files where a regular one is expected: refused at once, never opened (a FIFO would block the open)
m = model_copy("fifo-checkpoint")
os.remove(os.path.join(m, "model.safetensors"))
os.mkfifo(os.path.join(m, "model.safetensors"))
cases.append(("the checkpoint file is a FIFO", quantize_args(m), ["model.safetensors", "not a regular file"]))
fifo_tokens = os.path.join(work, "fifo-tokens.npy")
os.mkfifo(fifo_tokens)
cases.append(("the token file is a FIFO", quantize_args(calib=fifo_tokens), ["fifo-tokens.npy", "not a regular file"]))
bad_ids = calib_ids.copy()
bad_ids[100] = 600
cases.append(("token id >= vocab", quantize_args(calib=tokens("ids-too-big.npy", bad_ids)),
              ["ids-too-big.npy", "600", "vocab_size"]))
cases.append(("token file of float dtype", quantize_args(calib=tokens("float-ids.npy", calib_ids.astype(np.float32))),
              ["float-ids.npy", "dtype"]))
cases.append(("token file of rank 3", quantize_args(calib=tokens("rank3.npy", calib_ids[:5400].reshape(2, 27, 100))),
              ["rank3.npy"]))
eval_bad = ["eval", "--model", STORIES, "--tokens", tokens("eval-too-big.npy", bad_ids), "--seq-len", 256]
cases.append(("eval token id >= vocab", eval_bad, ["eval-too-big.npy", "vocab_size"]))
blocker = os.path.join(work, "a-file")
open(blocker, "w").write("x")
cases.append(("unwritable output dir", quantize_args(out=os.path.join(blocker, "out")), ["--out", "a-file"]))
cases.append(("unknown flag", quantize_args(extra=["--frobnicate", "1"]), ["frobnicate"]))
cases.append(("unwritable --metrics", quantize_args(extra=["--metrics", os.path.join(blocker, "m.jsonl")]),
              ["--metrics", "a-file"]))
cfg = os.path.join(work, "run.cfg")
open(cfg, "w").write("bits = 4\nbogus = 3\n")
cases.append(("--config with an unknown name", quantize_args(extra=["--config", cfg]), ["run.cfg", "bogus"]))
fifo_cfg = os.path.join(work, "fifo.cfg")
os.mkfifo(fifo_cfg)
cases.append(("--config is a FIFO", quantize_args(extra=["--config", fifo_cfg]), ["fifo.cfg", "not a regular file"]))
cases.append(("2-D token rows shorter than --seq-len",
              quantize_args(calib=tokens("short-rows.npy", calib_ids[:64 * 40].reshape(40, 64))),
              ["short-rows.npy", "[40, 64]", "--seq-len 128"]))
cases.append(("bad bits", quantize_args(bits=5), ["--bits", "5"]))
cases.append(("missing model dir", quantize_args(model=os.path.join(work, "no-such-model")), ["no-such-model"]))
w = tokens("w.npy", np.ones((8, 16), np.float32))
x = tokens("x.npy", np.ones((32, 12), np.float32))
cases.append(("layer with mismatched inputs", ["layer", "--weight", w, "--inputs", x, "--bits", 4, "--group-size", 8],
              ["x.npy", "16"]))

failed = 0
count = 0
for np_ranks in (1, 2):
    for name, args, expect in cases:
        if np_ranks == 2 and name not in ("truncated safetensors", "token id >= vocab", "unwritable output dir",
                                          "unknown flag", "config missing a field", "a tensor name twice in the header",
                                          "an inf in the embedding", "a nan in a norm",
                                          "finite weights whose activations overflow float32"):
            continue
        count += 1
        out_dir = args[args.index("--out") + 1] if "--out" in args else None
        t0 = time.time()
        try:
            p = pq.run(args, np=np_ranks, timeout=30, check=False)
            rc, err = p.returncode, p.stderr + p.stdout
        except subprocess.TimeoutExpired:
            rc, err = None, "TIMEOUT"
        dt = time.time() - t0
        lines = [l for l in err.splitlines() if "error:" in l]
        problems = []
        if rc is None:
            problems.append("did not end within 30 s")
        elif rc == 0:
            problems.append("exit code 0")
        if not lines:
            problems.append("no 'error:' line")
        else:
            missing = [e for e in expect if e not in lines[0]]
            if missing:
                problems.append(f"error line lacks {missing}")
        if "HDF5-DIAG" in err or "Segmentation" in err or "terminate called" in err:
            problems.append("crash or HDF5 diagnostics in the output")
        if out_dir and os.path.exists(os.path.join(out_dir, "model.h5")):
            import h5py
            with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
                if int(f.attrs.get("complete", 0)) == 1:
                    problems.append("output marked complete")
        status = "ok  " if not problems else "FAIL"
        failed += bool(problems)
        print(f"{status} [np {np_ranks}] {name}: rc {rc}, {dt:.1f} s: {lines[0] if lines else err.strip()[:300]}"
              + (f"  <- {'; '.join(problems)}" if problems else ""))

# a disk that fills up while the shards are written (a 150 kB tmpfs; the output needs about 280 kB): one line
# naming the shard, a non-zero exit, no crash, nothing marked complete. Needs root to mount; skipped otherwise.
full = os.path.join(work, "full")
os.makedirs(full)
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", full], capture_output=True).returncode == 0:
    try:
        for np_ranks in (1, 2):
            out_dir = os.path.join(full, f"out{np_ranks}")
            shutil.rmtree(os.path.join(full, "out1"), ignore_errors=True)  # each run gets the whole 150 kB
            p = pq.run(quantize_args(out=out_dir), np=np_ranks, timeout=30, check=False)
            err = p.stderr + p.stdout
            lines = [l for l in err.splitlines() if "error:" in l]
            problems = []
            if p.returncode == 0:
                problems.append("exit code 0")
            if not lines or "shard-" not in lines[0] or "disk full" not in lines[0]:
                problems.append("no error line naming the shard and the full disk")
            if "Segmentation" in err or "terminate called" in err or p.returncode in (-11, 139):
                problems.append("crash")
            try:
                import h5py
                with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
                    if int(f.attrs.get("complete", 0)) == 1:
                        problems.append("output marked complete")
            except (OSError, KeyError):
                pass  # model.h5 itself may not have fitted
            count += 1
            failed += bool(problems)
            print(f"{'ok  ' if not problems else 'FAIL'} [np {np_ranks}] disk full while writing: rc {p.returncode}: "
                  f"{lines[0] if lines else err.strip()[-300:]}" + (f"  <- {'; '.join(problems)}" if problems else ""))
    finally:
        subprocess.run(["umount", full], capture_output=True)
else:
    print("skipped: disk full while writing (cannot mount a tmpfs here)")

shutil.rmtree(work, ignore_errors=True)
print(f"{count - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
