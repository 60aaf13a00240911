#!/usr/bin/python3
"""GPTQ as the paper's reference implementation computes it, in PyTorch float32 on the CPU.

The yardstick pipequant's GPTQ is compared against (scripts/compare_layer_reference.sh). It follows,
operation by operation and in the same order, the reference code of the GPTQ paper (Frantar et al.,
IST-DASLab/gptq): `GPTQ.add_batch` and `GPTQ.fasterquant` in gptq.py, `Quantizer.find_params` and
`quantize` in quant.py, configured as its llama.py configures them (per-channel, weight=True, no MSE grid
search). The reference's own quirks are kept on purpose, e.g. a group's scale and zero are found on the
columns as they stand in the lazily-updated W (without the updates of the current 128-column block) when
the group starts inside a block, and with sym the zero is (maxq + 1) / 2.

    gptq_reference.py --weight W.npy --inputs X.npy --bits 4 --group-size 128 [--sym] [--act-order]
                      [--static-groups] [--threads T]

W.npy: float32 [out, in]; X.npy: float32 [tokens, in] (the layer's inputs). Prints, one per line:
    relative_error: ||W X^T - Q X^T||_F^2 / ||W X^T||_F^2 (float64) of the GPTQ result Q
    solve_seconds:  wall time of the solve (fasterquant) alone; the Hessian is accumulated before
    rtn_relative_error: the same error for round-to-nearest with the same grid (the baseline GPTQ must beat)
and a few informational lines (shape, hessian_seconds, gptq_loss).
"""

import argparse
import math
import os
import sys
import time


def early_threads(argv):
    """Thread count from --threads, put in the environment before numpy/torch load their BLAS and OpenMP."""
    threads = 0
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif a.startswith("--threads="):
            threads = int(a.split("=", 1)[1])
    if threads <= 0:
        threads = os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


THREADS = early_threads(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402


def quantize(x, scale, zero, maxq):
    """quant.py quantize(): the integer grid value clamped to [0, maxq], returned dequantized."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class Quantizer:
    """quant.py Quantizer with perchannel=True, mse=False, used with weight=True: one scale/zero per row."""

    def __init__(self, bits, sym):
        self.maxq = torch.tensor(2**bits - 1)
        self.sym = sym
        self.scale = torch.zeros(1)
        self.zero = torch.zeros(1)

    def ready(self):
        return bool(torch.all(self.scale != 0))

    def find_params(self, x):
        """x: [rows, cols] weights; sets scale and zero to [rows, 1]."""
        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            neg = xmin < 0
            if torch.any(neg):
                xmin[neg] = -xmax[neg]
        both_zero = (xmin == 0) & (xmax == 0)
        xmin[both_zero] = -1
        xmax[both_zero] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, float((self.maxq + 1) / 2))
        else:
            self.zero = torch.round(-xmin / self.scale)
        self.scale = self.scale.reshape([-1, 1])
        self.zero = self.zero.reshape([-1, 1])

    def copy(self):
        c = Quantizer.__new__(Quantizer)
        c.maxq, c.sym, c.scale, c.zero = self.maxq, self.sym, self.scale.clone(), self.zero.clone()
        return c


class Hessian:
    """gptq.py add_batch for a linear layer: H = 2/nsamples * sum x x^T, rescaled as samples arrive."""

    def __init__(self, columns):
        self.H = torch.zeros((columns, columns))
        self.nsamples = 0

    def add_batch(self, inp):
        """inp: [batch, tokens, in] or [tokens, in] (one sample); nsamples counts samples, as in the reference."""
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


def fasterquant(W, H, quantizer, blocksize=128, percdamp=0.01, groupsize=-1, actorder=False, static_groups=False):
    """gptq.py GPTQ.fasterquant. W: [rows, columns] float32 (not modified); H: [columns, columns] float32
    (consumed, as the reference deletes it). Returns (Q dequantized [rows, columns], sum of losses)."""
    W = W.clone().float()
    rows, columns = W.shape

    if not quantizer.ready():
        quantizer.find_params(W)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = []
    if static_groups:
        for i in range(0, columns, groupsize):
            g = quantizer.copy()
            g.find_params(W[:, i:(i + groupsize)])
            groups.append(g)

    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]

            q = quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if actorder:
        Q = Q[:, invperm]
    return Q, torch.sum(Losses).item()


def rtn(W, bits, sym, groupsize):
    """Round to nearest with the same grid: per row (groupsize -1) or per group of consecutive columns."""
    rows, columns = W.shape
    Q = torch.zeros_like(W)
    step = columns if groupsize == -1 else groupsize
    for c0 in range(0, columns, step):
        q = Quantizer(bits, sym)
        q.find_params(W[:, c0:c0 + step])
        Q[:, c0:c0 + step] = quantize(W[:, c0:c0 + step], q.scale, q.zero, q.maxq)
    return Q


def relative_error(W, Q, X, chunk=4096):
    """||W X^T - Q X^T||_F^2 / ||W X^T||_F^2 in float64, in chunks of tokens. W, Q: [out, in]; X: [tokens, in]."""
    W64 = W.double()
    D64 = (W.double() - Q.double())
    num = 0.0
    den = 0.0
    for t0 in range(0, X.shape[0], chunk):
        x = X[t0:t0 + chunk].double()
        num += float(torch.sum(torch.square(x @ D64.t())))
        den += float(torch.sum(torch.square(x @ W64.t())))
    return num / den if den > 0 else float("nan")


def load_matrix(path, what):
    a = np.load(path)
    if a.ndim != 2:
        sys.exit(f"{path}: {what} must be 2-D, got shape {a.shape}")
    if a.dtype != np.float32:
        sys.exit(f"{path}: {what} must be float32, got {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weight", required=True, help="W.npy float32 [out, in]")
    ap.add_argument("--inputs", required=True, help="X.npy float32 [tokens, in]")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1 = one group per row")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01, help="percdamp")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048,
                    help="tokens per add_batch call (one calibration sample, as llama.py feeds them)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    ap.add_argument("--save-q", help="write the dequantized GPTQ result to this .npy (float32 [out, in])")
    ap.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest baseline")
    args = ap.parse_args()

    if args.bits not in (2, 3, 4, 8):
        sys.exit(f"--bits: expected 2, 3, 4 or 8, got {args.bits}")
    if args.group_size == 0 or args.group_size < -1:
        sys.exit(f"--group-size: expected a positive number or -1, got {args.group_size}")
    if args.static_groups and args.group_size == -1:
        sys.exit("--static-groups needs a --group-size")
    torch.set_num_threads(THREADS)

    W = load_matrix(args.weight, "the weight")
    X = load_matrix(args.inputs, "the inputs")
    if X.shape[1] != W.shape[1]:
        sys.exit(f"{args.inputs}: shape {tuple(X.shape)} does not match the weight {tuple(W.shape)}: "
                 f"expected [tokens, {W.shape[1]}]")
    rows, columns = W.shape
    print(f"shape: {rows} x {columns} (out x in), {X.shape[0]} tokens, reference gptq {args.bits}-bit "
          f"group {args.group_size}{' sym' if args.sym else ''}{' act-order' if args.act_order else ''}"
          f"{' static-groups' if args.static_groups else ''}, {THREADS} threads, torch {torch.__version__}")

    t0 = time.perf_counter()
    hess = Hessian(columns)
    for s0 in range(0, X.shape[0], args.seq_len):
        hess.add_batch(X[s0:s0 + args.seq_len].unsqueeze(0))
    print(f"hessian_seconds: {time.perf_counter() - t0:.6f}")

    quantizer = Quantizer(args.bits, args.sym)
    t0 = time.perf_counter()
    Q, loss = fasterquant(W, hess.H, quantizer, blocksize=args.block_size, percdamp=args.damp,
                          groupsize=args.group_size, actorder=args.act_order, static_groups=args.static_groups)
    solve_seconds = time.perf_counter() - t0
    del hess

    if not torch.isfinite(Q).all():
        sys.exit("the reference produced non-finite values (Cholesky of a Hessian that is not positive definite)")
    print(f"gptq_loss: {loss:.9g}")
    print(f"relative_error: {relative_error(W, Q, X):.9g}")
    print(f"solve_seconds: {solve_seconds:.6f}")
    if not args.no_rtn:
        print(f"rtn_relative_error: {relative_error(W, rtn(W, args.bits, args.sym, args.group_size), X):.9g}")
    if args.save_q:
        np.save(args.save_q, Q.numpy().astype(np.float32))


if __name__ == "__main__":
    main()
