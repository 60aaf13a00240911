"""Readers of quantized weights, written from the public format descriptions and pipequant's docs/output_format.md,
independent of pipequant: the GPTQ bit streams (Hugging Face checkpoints) and pipequant's own HDF5 shards."""
import os

import h5py
import numpy as np


def unpack_stream(words, count, bits):
    """Codes [count, C] from int32 words [rows, C]: code i of column c is bits [i*bits, (i+1)*bits) of the column's
    little-endian bit stream (word j = words[j, c]); a code may straddle two words."""
    w = words.astype(np.uint32).astype(np.uint64)
    w = np.concatenate([w, np.zeros((1, w.shape[1]), np.uint64)])  # the word after the last, for straddles
    bit = np.arange(count, dtype=np.uint64) * np.uint64(bits)
    j = (bit // np.uint64(32)).astype(np.int64)
    off = (bit % np.uint64(32))[:, None]
    pair = w[j] | (w[j + 1] << np.uint64(32))
    return ((pair >> off) & np.uint64((1 << bits) - 1)).astype(np.int64)


def gptq_weight(t, prefix, qc):
    """W [N, K] of one GPTQ linear as a loader computes it."""
    bits = qc["bits"]
    qweight, qzeros, scales, g_idx = (t[prefix + "." + p][1] for p in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = g_idx.shape[0], scales.shape[1]
    q = unpack_stream(qweight, k, bits)  # [K, N]
    z = unpack_stream(qzeros.T, n, bits).T  # [G, N]: the streams run along N
    if qc.get("checkpoint_format", "gptq") == "gptq":
        z = z + 1  # v1 stores zero - 1
    g = g_idx.astype(np.int64)
    w = scales.astype(np.float32)[g, :] * (q - z[g, :]).astype(np.float32)
    return w.T


def internal_linears(out_dir):
    """{hf prefix: (W [N, K] float32, bits, zeros [G, N])} from the HDF5 shards of a quantized output."""
    result = {}
    with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
        for b in f["blocks"]:
            blk = f["blocks"][b]
            for module in blk:
                if not isinstance(blk[module], h5py.Group):
                    continue
                m = blk[module]
                bits = int(m.attrs["bits"])
                k, n = int(m.attrs["in_features"]), int(m.attrs["out_features"])
                q = unpack_stream(m["qweight"][()], k, bits)
                z = unpack_stream(m["qzeros"][()].T, n, bits).T  # the real zero
                g = m["g_idx"][()].astype(np.int64)
                w = m["scales"][()].astype(np.float32)[g, :] * (q - z[g, :]).astype(np.float32)
                result[f"model.layers.{b}.{module}"] = (w.T, bits, z)
    return result
