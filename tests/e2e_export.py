"""pipequant export: Hugging Face GPTQ and AWQ checkpoints from quantized outputs, read back by a numpy reader
written here from the public format descriptions (GPTQ: qweight bit streams along K, 3-bit codes straddling words,
qzeros along N storing zero - 1 in checkpoint_format gptq, g_idx, fp16 scales; AWQ: AutoAWQ's GEMM layout, 8
columns per word in the order 0 2 4 6 1 3 5 7). Every linear's dequantized weights must equal those of the
output's own HDF5 shards (unpacked here too) exactly, and every other tensor must be the source checkpoint's.
Also: AWQ refusals (ragged groups, 3-bit) with one line and no directory left, an incomplete output refused, a
--to that is not empty refused unless --overwrite, and mpirun -np 3 writing the same bytes as one rank."""
import glob
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402
from packed_reader import gptq_weight, internal_linears  # noqa: E402
import h5py  # noqa: E402

work = tempfile.mkdtemp(prefix="pipequant-e2e-export-")
results = []
STORIES = pq.testdata("stories260K")
STORIES_CALIB = pq.testdata("text/tinystories_calib.tok512.npy")
TINY = pq.testdata("tiny-llama-6L")
TINY_CALIB = pq.testdata("text/tiny6L_calib.tok4k.npy")
STORIES_EVAL = pq.testdata("text/tinystories_eval.tok512.npy")
TINY_EVAL = pq.testdata("text/tiny6L_heldout.tok4k.npy")
LINEAR_PARTS = {"qweight", "qzeros", "scales", "g_idx"}


def check(name, ok):
    results.append((name, bool(ok)))
    return ok


# ---- an independent safetensors reader ----------------------------------------------------------------------

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32}


def read_safetensors(path):
    """{name: (dtype string, numpy array)} of one .safetensors file; BF16 as its uint16 bits."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[base + a:base + b], dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = (info["dtype"], arr)
    return out, header.get("__metadata__", {})


def read_checkpoint(d):
    """All tensors of a checkpoint directory (model.safetensors, or the files of its index)."""
    index = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else [
        "model.safetensors"]
    tensors = {}
    for f in files:
        t, meta = read_safetensors(os.path.join(d, f))
        if meta.get("format") != "pt":
            check(f"{f}: __metadata__ format pt", False)
        tensors.update(t)
    return tensors


# ---- public layouts ------------------------------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble p of a word holds column 8j + AWQ_ORDER[p]


def awq_unpack(words):
    rows, cols = words.shape
    u = words.astype(np.uint32)
    out = np.zeros((rows, cols * 8), np.int64)
    for p in range(8):
        out[:, np.arange(cols) * 8 + AWQ_ORDER[p]] = (u >> np.uint32(4 * p)) & np.uint32(0xF)
    return out


def awq_weight(t, prefix, qc):
    qweight, qzeros, scales = (t[prefix + "." + p][1] for p in ("qweight", "qzeros", "scales"))
    gs = qc["group_size"]
    q = awq_unpack(qweight)  # [K, N]
    z = awq_unpack(qzeros)  # [G, N]
    g = np.arange(q.shape[0]) // gs
    return (scales.astype(np.float32)[g, :] * (q - z[g, :]).astype(np.float32)).T


# ---- pipequant's own output (docs/output_format.md), unpacked here too ---------------------------------------

def source_tensors(model_dir):
    return read_checkpoint(model_dir)


# ---- runs ----------------------------------------------------------------------------------------------------

def quantize(name, model, calib, extra, np_=None):
    out = os.path.join(work, name)
    pq.run(["quantize", "--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 16, "--out", out] +
           [str(a) for a in extra], np=np_)
    return out


def export(out, to, fmt="gptq", extra=(), np_=None, ok=True):
    p = pq.run(["export", out, "--to", to, "--format", fmt] + list(extra), np=np_, check=ok)
    return p


def error_lines(p):
    return [l for l in (p.stderr + p.stdout).splitlines() if "error:" in l]


def check_export(label, out, to, model_dir, fmt, dense_from_source=True):
    """The export's tensors against the output's own dequantized weights and the source checkpoint."""
    qc = json.load(open(os.path.join(to, "config.json")))["quantization_config"]
    t = read_checkpoint(to)
    internal = internal_linears(out)
    src = source_tensors(model_dir)
    bad = []
    for prefix, (w_ref, bits, zeros) in internal.items():
        w = gptq_weight(t, prefix, qc) if fmt == "gptq" else awq_weight(t, prefix, qc)
        if w.shape != w_ref.shape or not np.array_equal(w, w_ref):
            bad.append(prefix)
    check(f"{label}: {len(internal)} linears dequantize exactly to the output's weights" +
          (f" (differ: {bad[:3]})" if bad else ""), internal and not bad)
    # the weights are not trivial: many distinct levels, and not all equal to zero
    w0 = next(iter(internal.values()))[0]
    check(f"{label}: weights non-trivial ({len(np.unique(w0))} distinct values)",
          len(np.unique(w0)) > 4 and np.abs(w0).sum() > 0)
    expected = {n for n in src if not (n.endswith(".weight") and n[:-len(".weight")] in internal)}
    parts = LINEAR_PARTS if fmt == "gptq" else LINEAR_PARTS - {"g_idx"}
    expected |= {f"{p}.{part}" for p in internal for part in parts}
    check(f"{label}: tensor names are the source's with each linear's {sorted(parts)}", set(t) == expected)
    dense_bad = [n for n in src if n in t and (src[n][0] != t[n][0] or src[n][1].tobytes() != t[n][1].tobytes())]
    if dense_from_source:
        check(f"{label}: dense tensors are the source's bytes in its dtype", not dense_bad)
    else:  # AWQ folds its input scales into the norms (kept in F32): those differ, the rest are the source's
        check(f"{label}: the folded norms changed, the other dense tensors are the source's",
              dense_bad and all("layernorm" in n for n in dense_bad))
    return qc, internal


def same_perplexity(label, model, out, hf, tokens):
    """eval --model of the export against eval --quantized of the output it came from."""
    args = ["--tokens", tokens, "--seq-len", 128, "--max-windows", 16]
    a = pq.perplexity(pq.run(["eval", "--model", hf] + args).stdout)
    b = pq.perplexity(pq.run(["eval", "--model", model, "--quantized", out] + args).stdout)
    # the same weights through the same forward: only the order of fp32 sums may differ
    check(f"{label}: eval --model of the export {a:.6f} = eval --quantized {b:.6f} (within 2e-4 relative)",
          abs(a - b) <= 2e-4 * b)


def has_zero_zero(internal):
    return any((z == 0).any() for _, _, z in internal.values())


# ---- GPTQ from stories260K and tiny-llama-6L ---------------------------------------------------------------

configs = [
    ("stories-4b-g32", STORIES, STORIES_CALIB, ["--bits", 4, "--group-size", 32]),
    ("stories-3b-act-row", STORIES, STORIES_CALIB, ["--bits", 3, "--group-size", -1, "--act-order"]),
    ("stories-2b-sym", STORIES, STORIES_CALIB, ["--bits", 2, "--group-size", 32, "--sym"]),
    ("stories-2b-g32", STORIES, STORIES_CALIB, ["--bits", 2, "--group-size", 32]),  # has zero points of 0
    ("tiny-8b-static", TINY, TINY_CALIB, ["--bits", 8, "--group-size", 128, "--act-order", "--static-groups"]),
    ("tiny-3b-act-g64", TINY, TINY_CALIB, ["--bits", 3, "--group-size", 64, "--act-order"]),
]
formats_seen = set()
for label, model, calib, extra in configs:
    out = quantize(label, model, calib, extra)
    to = os.path.join(work, label + "-hf")
    p = export(out, to)
    qc, internal = check_export(label, out, to, model, "gptq")
    formats_seen.add(qc["checkpoint_format"])
    same_perplexity(label, model, out, to, STORIES_EVAL if model == STORIES else TINY_EVAL)
    expect_v2 = has_zero_zero(internal)
    check(f"{label}: checkpoint_format {qc['checkpoint_format']} (a zero point of 0: {expect_v2})",
          qc["checkpoint_format"] == ("gptq_v2" if expect_v2 else "gptq"))
    if expect_v2:
        check(f"{label}: one line says why gptq_v2", sum("cannot hold" in l for l in p.stdout.splitlines()) == 1)
        refused = export(out, to + "-v1", extra=["--checkpoint-format", "gptq"], ok=False)
        err = error_lines(refused)
        check(f"{label}: --checkpoint-format gptq refused with one line naming the linear",
              refused.returncode != 0 and len(err) == 1 and "model.layers." in err[0] and
              not os.path.exists(to + "-v1"))
    args = dict(zip(extra[::2], extra[1::2]))
    check(f"{label}: quantization_config bits {qc['bits']} group_size {qc['group_size']} desc_act {qc['desc_act']} "
          f"sym {qc['sym']}", qc["quant_method"] == "gptq" and qc["bits"] == args["--bits"] and
          qc["group_size"] == args["--group-size"] and qc["desc_act"] == ("--act-order" in extra) and
          qc["sym"] == ("--sym" in extra))
    check(f"{label}: quantize_config.json is the same quantization_config",
          json.load(open(os.path.join(to, "quantize_config.json"))) == qc)
    src_cfg = json.load(open(os.path.join(model, "config.json")))
    cfg = json.load(open(os.path.join(to, "config.json")))
    cfg.pop("quantization_config")
    check(f"{label}: config.json is the source config plus quantization_config", cfg == src_cfg)
    if label == "stories-4b-g32":
        check(f"{label}: warns about K = 172 (not a multiple of the group size)",
              any("warning" in l and "172" in l for l in p.stdout.splitlines()))
        check(f"{label}: tokenizer file tok512.bin copied from the recorded model dir",
              open(os.path.join(to, "tok512.bin"), "rb").read() ==
              open(os.path.join(STORIES, "tok512.bin"), "rb").read())
    if label.startswith("tiny"):
        check(f"{label}: tokenizer.model copied", os.path.exists(os.path.join(to, "tokenizer.model")))
check(f"both zero conventions were exercised: {sorted(formats_seen)}", formats_seen == {"gptq", "gptq_v2"})

# ---- AWQ ---------------------------------------------------------------------------------------------------
tiny4 = quantize("tiny-4b-g64-np3", TINY, TINY_CALIB, ["--bits", 4, "--group-size", 64], np_=3)
awq_dir = os.path.join(work, "tiny-awq")
export(tiny4, awq_dir, "awq")
qc, _ = check_export("tiny 4-bit g64 awq", tiny4, awq_dir, TINY, "awq")
same_perplexity("tiny 4-bit g64 awq", TINY, tiny4, awq_dir, TINY_EVAL)
check("awq quantization_config: quant_method awq, version gemm, 4-bit, group 64, zero_point",
      qc["quant_method"] == "awq" and str(qc.get("version")).lower() == "gemm" and qc.get("bits", qc.get("w_bit")) == 4
      and qc.get("group_size", qc.get("q_group_size")) == 64 and qc["zero_point"] is True)
check("awq: no quantize_config.json", not os.path.exists(os.path.join(awq_dir, "quantize_config.json")))

stories4 = os.path.join(work, "stories-4b-g32")
to = os.path.join(work, "stories-awq")
p = export(stories4, to, "awq", ok=False)
err = error_lines(p)
check("awq of stories260K g32 (K 172: ragged groups) refused with one line naming down_proj",
      p.returncode != 0 and len(err) == 1 and "mlp.down_proj" in err[0] and "172" in err[0])
check("  ... and no directory left", not glob.glob(to + "*"))
p = export(os.path.join(work, "stories-3b-act-row"), to, "awq", ok=False)
err = error_lines(p)
check("awq of a 3-bit output refused with one line", p.returncode != 0 and len(err) == 1 and "bits" in err[0]
      and not glob.glob(to + "*"))
p = export(os.path.join(work, "tiny-3b-act-g64"), to, "awq", ok=False)
err = error_lines(p)
check("awq of 3-bit act-order refused (bits first)", p.returncode != 0 and len(err) == 1)

# an output of --method awq (scales folded into the norms) exported as AWQ: the same perplexity
if "awq" in pq.run(["quantize", "--help"]).stdout:
    awq_out = quantize("tiny-awq-method", TINY, TINY_CALIB, ["--method", "awq", "--bits", 4, "--group-size", 64])
    awq_hf = os.path.join(work, "tiny-awq-method-hf")
    export(awq_out, awq_hf, "awq")
    check_export("tiny --method awq exported as awq", awq_out, awq_hf, TINY, "awq", dense_from_source=False)
    same_perplexity("tiny --method awq exported as awq", TINY, awq_out, awq_hf, TINY_EVAL)

# AWQ has no g_idx: act-order is refused unless its groups are static (then g_idx is k / group_size)
act = quantize("tiny-4b-act-g64", TINY, TINY_CALIB, ["--bits", 4, "--group-size", 64, "--act-order"])
p = export(act, to, "awq", ok=False)
err = error_lines(p)
check("awq of act-order without static groups refused with one line about g_idx",
      p.returncode != 0 and len(err) == 1 and "g_idx" in err[0] and not glob.glob(to + "*"))
static = quantize("tiny-4b-act-static-g64", TINY, TINY_CALIB,
                  ["--bits", 4, "--group-size", 64, "--act-order", "--static-groups"])
export(static, to, "awq")
check_export("tiny 4-bit g64 act-order static groups awq", static, to, TINY, "awq")
shutil.rmtree(to)

# ---- ranks, shards, directories ----------------------------------------------------------------------------
def same_files(a, b):
    fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
    return fa == fb and all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
                            for f in fa)


# the zero check spread over the ranks: with files of 20 kB block 0's down_proj (the first zero of 0) is in file 1,
# which rank 1 writes and checks
v2 = os.path.join(work, "stories-2b-g32")
p1 = export(v2, os.path.join(work, "v2-1"), extra=["--max-shard-gb", "0.00002"])
p3 = export(v2, os.path.join(work, "v2-3"), extra=["--max-shard-gb", "0.00002"], np_=3)
wm = json.load(open(os.path.join(work, "v2-1", "model.safetensors.index.json")))["weight_map"]
holder = int(wm["model.layers.0.mlp.down_proj.qzeros"].split("-")[1]) - 1
check(f"the first linear with a zero of 0 is in file {holder + 1}, which rank {holder % 3} of 3 checks",
      holder % 3 != 0)
why1 = [l for l in p1.stdout.splitlines() if "cannot hold" in l]
why3 = [l for l in p3.stdout.splitlines() if "cannot hold" in l]
check("gptq_v2 chosen under mpirun -np 3 with the same line and the same bytes as one rank",
      why1 and why1 == why3 and "model.layers.0.mlp.down_proj" in why1[0] and
      same_files(os.path.join(work, "v2-1"), os.path.join(work, "v2-3")))

one = os.path.join(work, "tiny-gptq-1")
three = os.path.join(work, "tiny-gptq-3")
export(tiny4, one, extra=["--max-shard-gb", "0.0008"])
export(tiny4, three, extra=["--max-shard-gb", "0.0008"], np_=3)
files_one = sorted(os.listdir(one))
same = same_files(one, three)
n_st = len([f for f in files_one if f.endswith(".safetensors")])
check(f"mpirun -np 3 export writes the same {len(files_one)} files, byte for byte ({n_st} safetensors)",
      same and n_st >= 3)
index = json.load(open(os.path.join(one, "model.safetensors.index.json")))
sizes = sum(os.path.getsize(os.path.join(one, f)) for f in files_one if f.endswith(".safetensors"))
check("index: weight_map names every tensor, total_size below the files' bytes",
      set(index["weight_map"]) == set(read_checkpoint(one)) and 0 < index["metadata"]["total_size"] < sizes)
check_export("tiny 4-bit g64 gptq in several files", tiny4, one, TINY, "gptq")

p = export(tiny4, one, ok=False)
err = error_lines(p)
check("a --to that is not empty is refused with one line", p.returncode != 0 and len(err) == 1 and
      "--overwrite" in err[0])
p = export(tiny4, one, extra=["--overwrite"])
check("--overwrite replaces it with one file",
      os.listdir(one).count("model.safetensors") == 1 and not os.path.exists(one + ".replaced") and
      not os.path.exists(os.path.join(one, "model-00001-of-00002.safetensors")))

# --overwrite never removes the model directory: a --to that is it (or holds it) is refused, the model stays
model_copy = os.path.join(work, "model-copy")
shutil.copytree(TINY, model_copy)
p = export(tiny4, model_copy, extra=["--overwrite", "--model", model_copy], ok=False)
err = error_lines(p)
check("--to the model directory itself is refused with one line, the model untouched",
      p.returncode != 0 and len(err) == 1 and "model directory" in err[0]
      and sorted(os.listdir(model_copy)) == sorted(os.listdir(TINY)))
p = export(tiny4, work, extra=["--overwrite", "--model", model_copy], ok=False)
check("--to a directory holding the model is refused too", p.returncode != 0 and os.path.isdir(model_copy))

incomplete = os.path.join(work, "incomplete")
shutil.copytree(tiny4, incomplete)
with h5py.File(os.path.join(incomplete, "model.h5"), "r+") as f:
    f.attrs.modify("complete", 0)
p = export(incomplete, os.path.join(work, "incomplete-hf"), ok=False)
err = error_lines(p)
check("an incomplete output is refused with one line", p.returncode != 0 and len(err) == 1 and "complete" in err[0]
      and not glob.glob(os.path.join(work, "incomplete-hf*")))

shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
