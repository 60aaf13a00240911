#!/usr/bin/python3
"""Adds run-time material from the shared test data to the working corpora of scripts/fuzz.sh (never to the repo).

    corpus_from_testdata.py --testdata ../shared/testdata --corpus WORK/corpus [--output QUANTIZED_OUT_DIR]

safetensors        the real headers of the test checkpoints: alone (8-byte length and JSON, no data), and with the
                   shapes cut to at most 2 per dimension and data of that size (a valid file with the real names)
safetensors_index  the cut stories260K checkpoint split into two shards and its index
model_config       each checkpoint's config.json
npy                the first tokens of each token file, and the first rows of the reference logits
shard_raw          the shard and model.h5 of a quantized output (--output), as scripts/fuzz.sh makes one
"""
import argparse
import glob
import io
import json
import os
import shutil
import struct
import sys

import numpy as np

CHECKPOINTS = ("stories260K", "tiny-llama-6L", "mixtral-tiny")
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


def write(corpus, harness, name, data):
    d = os.path.join(corpus, harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = f.read(n)
    return text, json.loads(text)


def cut(header):
    """The header with every dimension cut to at most 2 and offsets packed again; returns (header, data)."""
    out, data = {}, b""
    for name, entry in sorted(header.items(), key=lambda kv: (kv[1].get("data_offsets", [0])[0], kv[0])):
        if name == "__metadata__":
            out[name] = entry
            continue
        shape = [min(d, 2) for d in entry["shape"]]
        count = int(np.prod(shape)) if shape else 1
        blob = bytes((i * 37 + 11) % 61 for i in range(count * DTYPE_SIZE[entry["dtype"]]))  # small, finite
        out[name] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return out, data


def safetensors_bytes(header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def from_checkpoints(testdata, corpus):
    for ck in CHECKPOINTS:
        path = os.path.join(testdata, ck, "model.safetensors")
        if not os.path.exists(path):
            continue
        text, header = read_header(path)
        write(corpus, "safetensors", ck + ".header_only", struct.pack("<Q", len(text)) + text)
        write(corpus, "safetensors", ck + ".cut", safetensors_bytes(*cut(header)))
        config = os.path.join(testdata, ck, "config.json")
        if os.path.exists(config):
            with open(config, "rb") as f:
                write(corpus, "model_config", ck + ".config.json", f.read())
    path = os.path.join(testdata, "stories260K", "model.safetensors")
    if os.path.exists(path):
        header, _ = cut(read_header(path)[1])
        names = sorted(n for n in header if n != "__metadata__")
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        halves = [{}, {}]
        for i, n in enumerate(names):
            halves[i * 2 // len(names)][n] = header[n]
        parts = [json.dumps({"weight_map": {n: shards[i * 2 // len(names)] for i, n in enumerate(names)}}).encode()]
        for half in halves:
            part, data = cut(half)
            parts.append(safetensors_bytes(part, data))
        write(corpus, "safetensors_index", "stories260K.split", b"\n#shard\n".join(parts))


def from_token_files(testdata, corpus):
    for path in sorted(glob.glob(os.path.join(testdata, "text", "*.npy")) +
                       glob.glob(os.path.join(testdata, "*", "reference_logits*.npy"))):
        a = np.load(path, mmap_mode="r")
        head = np.ascontiguousarray(a[:64] if a.ndim == 1 else a[:2, :32])
        buf = io.BytesIO()
        np.save(buf, head, allow_pickle=False)
        write(corpus, "npy", os.path.basename(path) + ".head", buf.getvalue())


def from_output(out_dir, corpus):
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".h5"):
            d = os.path.join(corpus, "shard_raw")
            os.makedirs(d, exist_ok=True)
            shutil.copy(os.path.join(out_dir, name), os.path.join(d, "stories260K." + name))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testdata", required=True)
    ap.add_argument("--corpus", required=True, help="the working corpora, one directory per harness")
    ap.add_argument("--output", help="a quantized output directory: its .h5 files go to the shard_raw corpus")
    args = ap.parse_args()
    from_checkpoints(args.testdata, args.corpus)
    from_token_files(args.testdata, args.corpus)
    if args.output:
        from_output(args.output, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
