#!/usr/bin/python3
"""Writes the seed inputs of the fuzz harnesses into fuzz/seeds/<harness>/ (small, made here, deterministic).

    /usr/bin/python3 fuzz/make_seeds.py [--shard-harness BUILD/fuzz/fuzz_replay_shard_raw]

The shard_raw seeds are the fixture output that pipequant's own ShardWriter writes (fuzz/shard_fixture.hpp): with
--shard-harness, a replay build of fuzz_shard_raw is run once with its scratch kept and the two files are copied.
scripts/fuzz.sh adds run-time material from ../shared/testdata to the working corpora; none of it is copied here.
"""
import argparse
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(harness, name, data):
    d = os.path.join(ROOT, harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------------------
# safetensors

DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


def value_bytes(dtype, count):
    """count small finite values of dtype, little-endian."""
    vals = np.linspace(-1.0, 1.0, num=max(count, 1))[:count]
    if dtype == "F64":
        return vals.astype("<f8").tobytes()
    if dtype == "F32":
        return vals.astype("<f4").tobytes()
    if dtype == "F16":
        return vals.astype("<f2").tobytes()
    if dtype == "BF16":
        return (vals.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype in ("I64", "I32", "I16", "I8"):
        return np.arange(count).astype("<i%d" % DTYPE_SIZE[dtype]).tobytes()
    return bytes(i % 2 for i in range(count))


def safetensors(tensors, metadata=None, align=8):
    """tensors: [(name, dtype, shape)] -> the bytes of a .safetensors file."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape in tensors:
        count = int(np.prod(shape)) if shape else 1
        blob = value_bytes(dtype, count)
        assert len(blob) == count * DTYPE_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((align - len(text) % align) % align)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    write("safetensors", "mixed_dtypes.safetensors",
          safetensors([("a", "F32", [2, 3]), ("b", "F16", [4]), ("c", "BF16", [2, 2]), ("d", "I32", [3]),
                       ("e", "U8", [0])], {"format": "pt"}))
    write("safetensors", "empty_header.safetensors", safetensors([]))
    write("safetensors", "scalar_f64.safetensors", safetensors([("s", "F64", [])]))
    write("safetensors", "odd_dtypes.safetensors",
          safetensors([("m", "BOOL", [3]), ("f8", "F8_E4M3", [2, 2]), ("g8", "F8_E5M2", [1]), ("i8", "I8", [2]),
                       ("i16", "I16", [1, 2]), ("i64", "I64", [1])]))
    write("safetensors", "llama_block.safetensors",
          safetensors([("model.layers.0.input_layernorm.weight", "F32", [8]),
                       ("model.layers.0.self_attn.q_proj.weight", "BF16", [8, 8]),
                       ("model.layers.0.mlp.down_proj.weight", "F16", [8, 4])], {"format": "pt"}))


def safetensors_index_seeds():
    sep = b"\n#shard\n"
    fixed = {"metadata": {"total_size": 232},
             "weight_map": {"model.embed_tokens.weight": "fixed-a.safetensors",
                            "model.layers.0.input_layernorm.weight": "fixed-a.safetensors",
                            "lm_head.weight": "fixed-b.safetensors", "model.norm.weight": "fixed-b.safetensors"}}
    write("safetensors_index", "fixed_shards.json", json.dumps(fixed, indent=2))
    two = {"metadata": {"total_size": 40},
           "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
                          "z": "model-00002-of-00002.safetensors"}}
    write("safetensors_index", "input_shards.bin",
          json.dumps(two).encode() + sep + safetensors([("x", "F32", [2, 2])]) + sep +
          safetensors([("y", "BF16", [4]), ("z", "F16", [2])]))
    mixed = {"weight_map": {"x": "model-00001-of-00002.safetensors", "counts": "fixed-b.safetensors"}}
    write("safetensors_index", "mixed_shards.bin",
          json.dumps(mixed).encode() + sep + safetensors([("x", "F32", [3]), ("unlisted", "F32", [1])]))


# ---------------------------------------------------------------------------------------------------------------
# config.json and the quantization configs

def model_config_seeds():
    sep = "\n#file\n"
    stories = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4,
               "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
               "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32"}
    write("model_config", "llama_small.json", json.dumps(stories, indent=2))
    llama3 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "vocab_size": 1000, "rope_theta": 500000.0, "attention_bias": True, "mlp_bias": False,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              "torch_dtype": "bfloat16"}
    write("model_config", "llama3_rope.json", json.dumps(llama3))
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 1, "vocab_size": 100, "sliding_window": 4096,
               "rope_scaling": {"type": "linear", "factor": 2.0},
               "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                       "sym": True, "static_groups": False, "checkpoint_format": "gptq_v2",
                                       "damp_percent": 0.01, "lm_head": False, "dynamic": {}}}
    write("model_config", "mistral_gptq.json", json.dumps(mistral))
    quantize_config = {"bits": 3, "group_size": -1, "desc_act": False, "sym": False, "damp_percent": 0.1,
                       "true_sequential": True, "model_file_base_name": "model"}
    write("model_config", "quantize_config.bin", json.dumps(stories) + sep + json.dumps(quantize_config))
    awq = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}
    write("model_config", "awq_quant_config.bin", json.dumps(stories) + sep + "{}" + sep + json.dumps(awq))
    inline_awq = dict(stories, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 64,
                                                    "zero_point": True, "version": "gemm",
                                                    "modules_to_not_convert": None})
    write("model_config", "awq_inline.json", json.dumps(inline_awq))


# ---------------------------------------------------------------------------------------------------------------
# .npy

def npy_bytes(array, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


def npy_seeds():
    write("npy", "tokens_i4_1d.npy", npy_bytes(np.arange(20, dtype="<i4")))
    write("npy", "tokens_i8_2d.npy", npy_bytes((np.arange(16, dtype="<i8") * 7 % 50).reshape(2, 8)))
    write("npy", "matrix_f4.npy", npy_bytes(np.linspace(-1, 1, 12, dtype="<f4").reshape(3, 4)))
    write("npy", "matrix_f2.npy", npy_bytes(np.linspace(-1, 1, 4).astype("<f2").reshape(2, 2)))
    write("npy", "matrix_f8_v2.npy", npy_bytes(np.linspace(0, 1, 6).reshape(2, 3), version=(2, 0)))
    write("npy", "bytes_u1.npy", npy_bytes(np.arange(5, dtype="u1")))
    write("npy", "bool.npy", npy_bytes(np.array([True, False, True])))
    write("npy", "scalar_i4_v3.npy", npy_bytes(np.array(7, dtype="<i4"), version=(3, 0)))


# ---------------------------------------------------------------------------------------------------------------
# --config options files

def cli_config_seeds():
    write("cli_config", "quant.cfg", "method = rtn\nbits = 3\ngroup-size = 64\nsym = true\nact-order = 1\n")
    write("cli_config", "quantize_full.cfg",
          "# a whole run\nmodel = ckpt\ncalib = calib.npy\nseq-len = 16\nout = out\nnsamples = 8\n"
          "propagation = fp\ncompute-dtype = fp32\nbackend = cpu\nthreads = 2\nmicro-batch = 2\ndamp = 0.05\n"
          "damp-retries = 2\nblock-size = 64\nmetrics = m.jsonl\nblocks-per-stage = 1,1\nranks-per-stage = 1\n"
          "fp-resident-gb = 1.5\nhost-mem = 8\ngpu-mem = 0\noverwrite = true\ndry-run = false\n")
    write("cli_config", "plan.cfg", "world = 4\nranks-per-stage = 2\njson = true\nverbose = 1\nnsamples = 64\n"
                                    "micro-batch = 8\nbackend = cuda\ncompute-dtype = bf16\n")
    write("cli_config", "awq.cfg", "method = awq\nbits = 4\ngroup-size = -1\nstatic-groups = false\n")
    write("cli_config", "section.cfg", "[quantize]\nbits = 8\n")


# ---------------------------------------------------------------------------------------------------------------
# edit scripts of fuzz_shard_edit (operation byte: low bits the edit, bit 7 model.h5; operands follow)

def shard_edit_seeds():
    write("shard_edit", "no_edit.bin", b"")
    # every edit once on the shard and once on model.h5, with operands from a fixed random stream
    rng = random.Random(11)
    for op in range(14):
        for target in (0x00, 0x80):
            operands = bytes(rng.randrange(256) for _ in range(24))
            write("shard_edit", "op%02d_%s.bin" % (op, "model" if target else "shard"), bytes([op | target]) + operands)
    # a few longer scripts of several edits
    for i in range(6):
        script = b""
        for _ in range(rng.randrange(2, 6)):
            script += bytes([rng.randrange(14) | (0x80 if rng.random() < 0.2 else 0)])
            script += bytes(rng.randrange(256) for _ in range(16))
        write("shard_edit", "script%d.bin" % i, script)


def shard_raw_seeds(harness):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        empty = os.path.join(tmp, "empty")
        open(empty, "wb").close()
        env = dict(os.environ, PIPEQUANT_FUZZ_KEEP_SCRATCH="1", PIPEQUANT_FUZZ_SCRATCH=os.path.join(tmp, "s"))
        subprocess.run([harness, empty], env=env, check=True, stderr=subprocess.DEVNULL)
        (pid,) = os.listdir(os.path.join(tmp, "s"))
        # the input replaced the shard of one directory and model.h5 of the other: the fixture's files are the others
        scratch = os.path.join(tmp, "s", pid)
        d = os.path.join(ROOT, "shard_raw")
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(scratch, "shard_raw_model", "shard-00000.h5"), os.path.join(d, "shard-00000.h5"))
        shutil.copy(os.path.join(scratch, "shard_raw_shard", "model.h5"), os.path.join(d, "model.h5"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shard-harness", help="a replay build of fuzz_shard_raw, to write the shard_raw seeds")
    args = ap.parse_args()
    safetensors_seeds()
    safetensors_index_seeds()
    model_config_seeds()
    npy_seeds()
    cli_config_seeds()
    shard_edit_seeds()
    if args.shard_harness:
        shard_raw_seeds(args.shard_harness)
    for h in sorted(os.listdir(ROOT)):
        files = os.listdir(os.path.join(ROOT, h))
        size = sum(os.path.getsize(os.path.join(ROOT, h, f)) for f in files)
        print("%-18s %3d seeds, %6d bytes" % (h, len(files), size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
