#!/usr/bin/python3
"""Writes a synthetic linear layer for the GPTQ comparison: W.npy [out, in] and X.npy [tokens, in], float32.

    make_layer_inputs.py --shape 4096x11008 --out-dir DIR [--tokens N] [--seed S] [--rank R] [--dead K]

W is standard normal scaled by 1/sqrt(in). X imitates the inputs of a real linear layer, whose Hessian
X^T X is far from the identity: X = Z @ M with Z standard normal [tokens, R + in] and the mixing
M = [B; eps * I] (B [R, in] random normal / sqrt(R)), so that most of the energy lies in a random
R-dimensional subspace and the remaining directions carry only the small isotropic part eps; then each
input channel is scaled by a log-normal factor, with 1% outlier channels 20x larger, as LLM activations
have. H's eigenvalues so span several orders of magnitude (the script prints its diagonal spread).
--dead K zeroes K input channels of X, which exercises the dead-column path (diag(H) = 0).
Deterministic for a given seed.
"""

import argparse
import os
import sys

import numpy as np


def parse_shape(s):
    try:
        out_f, in_f = (int(v) for v in s.lower().split("x"))
    except ValueError:
        sys.exit(f"--shape: expected OUTxIN such as 4096x11008, got '{s}'")
    if out_f <= 0 or in_f <= 0:
        sys.exit(f"--shape: sizes must be positive, got '{s}'")
    return out_f, in_f


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, help="OUTxIN, e.g. 4096x11008")
    ap.add_argument("--out-dir", required=True, help="writes W.npy and X.npy here")
    ap.add_argument("--tokens", type=int, default=0, help="rows of X (default max(2048, in))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=0, help="dimension of the dominant subspace (default in/4)")
    ap.add_argument("--eps", type=float, default=0.05, help="weight of the isotropic part of X")
    ap.add_argument("--dead", type=int, default=0, help="input channels of X set to zero")
    args = ap.parse_args()

    out_f, in_f = parse_shape(args.shape)
    tokens = args.tokens if args.tokens > 0 else max(2048, in_f)
    rank = args.rank if args.rank > 0 else max(1, in_f // 4)
    if not 0 <= args.dead < in_f:
        sys.exit(f"--dead: expected 0 <= K < {in_f}, got {args.dead}")
    os.makedirs(args.out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    w = rng.standard_normal((out_f, in_f), dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt(in_f))

    b = rng.standard_normal((rank, in_f), dtype=np.float32)
    b *= np.float32(1.0 / np.sqrt(rank))
    x = np.empty((tokens, in_f), dtype=np.float32)
    chunk = 4096  # bound the temporaries to [chunk, max(rank, in)]
    for t0 in range(0, tokens, chunk):
        t1 = min(tokens, t0 + chunk)
        z = rng.standard_normal((t1 - t0, rank), dtype=np.float32)
        np.matmul(z, b, out=x[t0:t1])
        x[t0:t1] += np.float32(args.eps) * rng.standard_normal((t1 - t0, in_f), dtype=np.float32)
    scale = np.exp(0.5 * rng.standard_normal(in_f)).astype(np.float32)
    outliers = rng.choice(in_f, size=max(1, in_f // 100), replace=False)
    scale[outliers] *= 20.0
    x *= scale[None, :]
    if args.dead > 0:
        x[:, rng.choice(in_f, size=args.dead, replace=False)] = 0.0

    np.save(os.path.join(args.out_dir, "W.npy"), w)
    np.save(os.path.join(args.out_dir, "X.npy"), x)
    diag = np.einsum("ij,ij->j", x, x, dtype=np.float64)
    live = diag[diag > 0]
    print(f"make_layer_inputs: {args.out_dir}/W.npy [{out_f}, {in_f}], X.npy [{tokens}, {in_f}], rank {rank}, "
          f"seed {args.seed}, diag(H) max/min {live.max() / live.min():.3g}, dead {args.dead}")


if __name__ == "__main__":
    main()
