"""The packed output pinned: GPTQ (act-order, static groups, sym/asym, 3/4 bits) and RTN, with 1 rank, 3 stages,
2 stages x 2 ranks, fp propagation (blocks resident and streamed), on the shared checkpoints and on a synthetic one
with ragged widths. Each run's packed datasets are digested (SHA-256 over the sorted dataset paths and bytes) and
compared with tests/packed_digests.json, recorded from the code as it was before the stage worker was rebuilt and
re-recorded twice: when the block forward became one GEMM per sample (5 of the 12 digests moved: activations in
their last bit, so a few codes), and when the CPU backend's GEMMs became a grid of single-threaded tiles instead of
one call that OpenBLAS split by the thread count (the 2 tiny6l digests moved; until then they held only for the
thread count of a 2-core machine): a refactor of the quantize path must not change one bit.

  python3 tests/e2e_packed_pin.py            # check (the test)
  python3 tests/e2e_packed_pin.py --record   # rewrite tests/packed_digests.json (only for an intended change)

OpenBLAS is pinned to its Haswell kernels: its AVX-512 kernels round some fp32 sums differently, and the digests
must not depend on which of the two the machine has."""
import hashlib
import json
import os
import shutil
import sys
import tempfile

os.environ["OPENBLAS_CORETYPE"] = "Haswell"
sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402

DIGESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_digests.json")
STORIES = ["--model", pq.testdata("stories260K"), "--calib", pq.testdata("text/tinystories_calib.tok512.npy"),
           "--seq-len", 128, "--nsamples", 24]
TINY6L = ["--model", pq.testdata("tiny-llama-6L"), "--calib", pq.testdata("text/tiny6L_calib.tok4k.npy"),
          "--seq-len", 256, "--nsamples", 16]

# name -> (ranks, checkpoint arguments, quantize arguments); "SYNTH" is replaced by the synthetic checkpoint
RUNS = {
    "stories-gptq4-g32-actorder-static-asym-np1": (1, STORIES, ["--bits", 4, "--group-size", 32, "--act-order",
                                                                 "--static-groups"]),
    "stories-gptq3-g32-sym-np1": (1, STORIES, ["--bits", 3, "--group-size", 32, "--sym"]),
    "stories-gptq4-row-sym-actorder-np3": (3, STORIES, ["--bits", 4, "--group-size", -1, "--sym", "--act-order"]),
    "stories-gptq4-g32-actorder-2x2": (4, STORIES, ["--bits", 4, "--group-size", 32, "--act-order",
                                                     "--ranks-per-stage", 2]),
    "stories-rtn4-g32-np1": (1, STORIES, ["--method", "rtn", "--bits", 4, "--group-size", 32]),
    "stories-rtn3-g32-sym-2x2": (4, STORIES, ["--method", "rtn", "--bits", 3, "--group-size", 32, "--sym",
                                               "--ranks-per-stage", 2]),
    "stories-gptq4-g32-fp-np3": (3, STORIES, ["--bits", 4, "--group-size", 32, "--propagation", "fp"]),
    "stories-gptq3-g32-fp-streamed-2x2": (4, STORIES, ["--bits", 3, "--group-size", 32, "--propagation", "fp",
                                                        "--fp-resident-gb", 0, "--ranks-per-stage", 2]),
    "tiny6l-gptq3-g128-actorder-static-np1": (1, TINY6L, ["--bits", 3, "--group-size", 128, "--act-order",
                                                           "--static-groups"]),
    "tiny6l-gptq4-g128-sym-np3": (3, TINY6L, ["--bits", 4, "--group-size", 128, "--sym"]),
    "synth-gptq4-g48-actorder-np2": (2, "SYNTH", ["--bits", 4, "--group-size", 48, "--act-order"]),
    "synth-gptq3-g48-fp-2x2": (4, "SYNTH", ["--bits", 3, "--group-size", 48, "--propagation", "fp",
                                            "--ranks-per-stage", 2]),
}


def digest(out_dir):
    datasets = pq.packed_datasets(out_dir)
    h = hashlib.sha256()
    for key in sorted(datasets):
        h.update(key.encode())
        h.update(datasets[key])
    return h.hexdigest(), len(datasets)


def main():
    record = "--record" in sys.argv[1:]
    work = tempfile.mkdtemp(prefix="pipequant-e2e-pin-")
    synth = os.path.join(work, "synth")
    # ragged widths: hidden 144 (3 groups of 48), intermediate 400 (a ragged last group), 3 blocks
    pq.run(["synth", "--out", synth, "--hidden-size", 144, "--intermediate-size", 400, "--num-layers", 4,
            "--num-heads", 6, "--num-kv-heads", 2, "--vocab-size", 300, "--dtype", "bf16", "--seed", 41])
    pq.run(["synth-tokens", "--out", synth + "/calib.npy", "--count", 24 * 64, "--vocab-size", 300, "--seed", 42])
    synth_args = ["--model", synth, "--calib", synth + "/calib.npy", "--seq-len", 64]
    pinned = {} if record else json.load(open(DIGESTS))
    measured, results = {}, []
    for name, (ranks, ckpt, args) in RUNS.items():
        out = os.path.join(work, name)
        pq.run(["quantize"] + (synth_args if ckpt == "SYNTH" else ckpt) + args +
               ["--micro-batch", 3, "--threads", 1, "--out", out], np=ranks)
        measured[name] = digest(out)
        if not record:
            want = pinned.get(name)
            results.append((f"{name}: {measured[name][1]} packed datasets, digest {measured[name][0][:16]} "
                            f"(pinned {want[0][:16] if want else 'none'})", want is not None and
                            list(measured[name]) == list(want) and measured[name][1] > 0))
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    if record:
        with open(DIGESTS, "w") as f:
            json.dump(measured, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(measured)} digests in {DIGESTS}")
        return
    pq.finish(results)


main()
