"""Kill soak, the short version (scripts/soak_kill.py runs the long one): stories260K quantized as 3 stages (-np 3)
and as 2 stages x 2 ranks (-np 4), each SIGKILLed (one random rank, a random moment) and resumed until 4 kills have
landed; every kill ends the whole job within 30 s and leaves model.h5 complete only when every block is; the final
resumes are bit-identical to uninterrupted runs. A shard with a half-written object (what a kill during a metadata
flush leaves) is started over on resume. Then the clean stop: SIGTERM to mpirun in the middle of a 3-stage run (of
a synthetic model with slower blocks), and to every rank of the 2x2 run (as scancel sends it): one line per stage
that names exactly the blocks complete on disk, a non-zero exit, every process gone within 30 s, and the same
command resumes to a bit-identical output."""
import os
import random
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.environ.get("PIPEQUANT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "scripts"))
import pq  # noqa: E402
import soak_kill as soak  # noqa: E402

KILLS = 4
work = tempfile.mkdtemp(prefix="pipequant-e2e-soak-")
results = []
t_start = time.time()
scenarios = soak.scenarios(work, quick=True)  # gptq-3x1, gptq-2x2
for sc in scenarios:
    soak.reference(sc)

# SIGKILL of one rank at random moments, each run resuming the last (a run that ends first must be bit-identical)
rng = random.Random(2)
tally = soak.Tally()
starts = 0
while tally.kills < KILLS and starts < 4 * KILLS:
    soak.soak_iteration(scenarios[starts % 2], rng, signal.SIGKILL, tally, f"[{tally.kills + 1}/{KILLS}]")
    starts += 1
results.append((f"{tally.kills} kills landed in {starts} starts", tally.kills == KILLS))
results.append((f"every process gone within {soak.END_LIMIT_S:.0f} s of each kill (max "
                f"{max(tally.seconds, default=float('nan')):.2f} s)", len(tally.seconds) == tally.kills))
for sc in scenarios:
    results.append((f"{sc.name}: the final resume is bit-identical to the uninterrupted run",
                    soak.final_resume(sc, tally)))
results.append(("no run showed a crash or an error, no kill left model.h5 complete before its blocks" +
                (f": {tally.failures[:3]}" if tally.failures else ""), not tally.failures))


def stop_by_sigterm(sc, target, after):
    """Starts the scenario afresh, sends SIGTERM to `target` (mpirun or every rank) once the progress line `after`
    is out, and checks the stop lines against the shards, the exit and the time to end; then resumes it."""
    run = soak.Run(sc.command(sc.out, overwrite=True))
    deadline = time.time() + 120
    while time.time() < deadline and run.proc.poll() is None and \
            not any(l.startswith(after) for _, l in list(run.lines)):
        time.sleep(0.01)
    ranks = run.rank_pids()
    if run.proc.poll() is not None or len(ranks) != sc.np:
        results.append((f"{sc.name}: SIGTERM to {target}: the run was in flight", False))
        return
    for pid in [run.proc.pid] if target == "mpirun" else ranks.values():
        os.kill(pid, signal.SIGTERM)
    seconds = soak.wait_all_gone(run, ranks, soak.END_LIMIT_S)
    if seconds is None:
        run.end_group()
    run.wait(10)
    out = run.output()
    blocks, _ = soak.shard_blocks(sc.out)
    lines = soak.stop_lines(out)
    name = f"{sc.name}: SIGTERM to {target}"
    results.append((f"{name}: exit code {run.proc.returncode} (non-zero)", run.proc.returncode != 0))
    results.append((f"{name}: every process gone after {seconds if seconds is None else round(seconds, 2)} s",
                    seconds is not None and seconds < soak.END_LIMIT_S))
    results.append((f"{name}: one stop line per stage ({sorted(l[1] for l in lines)})",
                    sorted(l[1] for l in lines) == list(range(sc.stages))))
    for sig, stage, shard, done, todo in lines:
        on_disk = {b for b in done | todo if blocks.get(b, False)}
        exact = done == on_disk or (done <= on_disk and "still being flushed" in out)
        results.append((f"{name}: stage {stage} ({shard}) says blocks {sorted(done)} complete, "
                        f"{sorted(todo)} not; complete on disk {sorted(on_disk)}", sig == "SIGTERM" and exact))
    said = set().union(*(l[3] for l in lines)) if lines else set()
    results.append((f"{name}: some blocks complete, some not ({sorted(said)} of {sc.blocks})",
                    0 < len(said) < sc.blocks))
    results.append((f"{name}: model.h5 not complete", soak.model_complete(sc.out) == 0))
    results.append((f"{name}: no crash or error in the output: {soak.output_problems(out)}",
                    not soak.output_problems(out)))
    p = pq.run(sc.arguments(sc.out), np=sc.np, check=False)
    resumed = sum(1 for l in p.stdout.splitlines() if l.startswith("block ") and "resumed" in l)
    diff = pq.compare_outputs(sc.reference, sc.out) if p.returncode == 0 else ["the resume failed"]
    results.append((f"{name}: the same command resumes the {sum(blocks.values())} complete blocks ({resumed}) to a "
                    f"bit-identical output" + (f": {diff[:3]}" if diff else ""),
                    resumed == sum(blocks.values()) and not diff))


# what the long soak found: a kill in the middle of a shard's last metadata flush left /tensors pointing at an object
# header that was never written, and every resume failed replacing it. A zeroed header stands for it: the resume
# starts that stage over and ends bit-identical.
sc = scenarios[0]
shard = os.path.join(sc.out, "shard-00000-of-00003.h5")
import h5py  # noqa: E402
with h5py.File(shard, "r") as f:
    header = h5py.h5o.get_info(f["tensors/model.embed_tokens.weight"].id).addr
with open(shard, "r+b") as f:
    f.seek(header)
    f.write(bytes(64))
p = pq.run(sc.arguments(sc.out), np=sc.np, check=False)
diff = pq.compare_outputs(sc.reference, sc.out) if p.returncode == 0 else ["the resume failed"]
results.append(("a half-written object in a shard: its stage starts over, the rest resumes, bit-identical" +
                (f": {diff[:3]} {(p.stdout + p.stderr)[-500:]}" if diff else ""),
                not diff and "shard-00000-of-00003.h5: what an interrupted run left unfinished cannot be removed"
                in p.stdout and "resumed" in p.stdout))

# mpirun passes SIGTERM on to the ranks a second after it gets it (SIGCONT first): a model whose blocks take longer
# than stories260K's keeps the run in flight until then
model = os.path.join(work, "synth")
calib = os.path.join(work, "calib.npy")
pq.run(["synth", "--out", model, "--hidden-size", 192, "--intermediate-size", 512, "--num-layers", 6, "--num-heads", 4,
        "--num-kv-heads", 2, "--vocab-size", 512, "--dtype", "bf16", "--seed", 5])
pq.run(["synth-tokens", "--out", calib, "--count", 32 * 128 + 7, "--vocab-size", 512, "--seed", 6])
longer = soak.Scenario("synth-3x1", 3, ["--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 32,
                                        "--method", "gptq", "--group-size", 64], work, 3)
soak.reference(longer)
stop_by_sigterm(longer, "mpirun", "block   1/")
stop_by_sigterm(scenarios[1], "every rank", "block   2/")

print(f"e2e_soak: {time.time() - t_start:.0f} s")
shutil.rmtree(work, ignore_errors=True)
pq.finish(results)
