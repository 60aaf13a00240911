"""Kill soak: a multi-stage quantization killed again and again at random moments, resumed each time, must end
bit-identical to an uninterrupted run.

For each scenario (stories260K; GPTQ as 3 stages = mpirun -np 3 and as 2 stages x 2 ranks = -np 4
--ranks-per-stage 2; without --quick also AWQ 3x1 and RTN 2x2) an uninterrupted run gives the reference output
and its duration. Then, N times, the same command is started into one output directory per scenario and one
random rank gets SIGKILL at a random moment: uniform over the reference run's duration or over its span of block
work (so kills land in loading, the forward passes, the solves, the shard writes), or, one kill in five, just after
the last block's progress line (the metrics gather and the final model.h5 write).

Each kill must end every rank and mpirun within 30 s, leave model.h5 not marked complete unless every block is
complete and verifies, and leave no stop line that names a block as complete which is not; the next start of the
same command resumes. Blocks that were complete before a run and are not after it (a resume started their shard
over) are counted, not failed: work lost, the output still right. A run that ends before its kill finishes the
chain: its output must be complete and bit-identical to the reference, and the next run starts the scenario over
with --overwrite (a resume of an output whose blocks are all complete mostly runs unsignalled, to end the chain).
At the end, one uninterrupted resume per scenario must be bit-identical to the reference. Any output with a crash
(Segmentation, HDF5-DIAG, terminate called), an error line, or a block that was marked complete but fails its
checksums on resume, is a failure.

--signal term sends SIGTERM instead (to mpirun, to one rank, or to every rank as scancel does); the stop lines
must name only blocks that are complete on disk, one per stage when every rank got the signal.

usage: soak_kill.py [--kills N] [--seed S] [--quick] [--signal kill|term|mixed] [--work DIR] [--keep]
Prints one line per kill and a summary; exits 1 when any check failed.
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pq  # noqa: E402

CRASH_MARKS = ("Segmentation", "HDF5-DIAG", "terminate called")
END_LIMIT_S = 30.0  # every process of a killed run must be gone this long after the kill
STOP_LINE = re.compile(r"pipequant: stopped by (SIGTERM|SIGINT): stage (\d+) \((shard-[^)]+)\): (.*); rerun the same "
                       r"command without --overwrite to resume")
ANY_STOP_LINE = re.compile(r"pipequant: stopped by SIG(TERM|INT)")
# rank 0's progress lines and the phase each begins (None: the line itself, "block k/N")
PHASES = [("plan:", "start"), ("pipequant quantize:", "setup"), ("block ", None), ("== pipequant report", "report"),
          ("output:", "output")]


class Scenario:
    """One quantization command and its output directories: the reference and the one that is killed."""

    def __init__(self, name, np, args, work, stages):
        self.name, self.np, self.args, self.stages = name, np, args, stages
        self.reference = os.path.join(work, name + "-reference")
        self.out = os.path.join(work, name + "-soak")
        self.duration = None  # seconds of the uninterrupted run, mpirun start to exit
        self.work_span = None  # (first, last) seconds of its setup and block lines
        self.blocks = None
        self.fresh = True  # the next run starts the output over (--overwrite)

    def arguments(self, out, overwrite=False):
        return ["quantize"] + [str(a) for a in self.args] + ["--out", out] + (["--overwrite"] if overwrite else [])

    def command(self, out, overwrite=False):
        return pq.mpi_prefix(self.np) + [pq.binary()] + self.arguments(out, overwrite)


def scenarios(work, quick):
    model = pq.testdata("stories260K")
    calib = pq.testdata("text/tinystories_calib.tok512.npy")
    common = ["--model", model, "--calib", calib, "--seq-len", 128, "--nsamples", 32, "--bits", 4,
              "--group-size", 32]
    all_ = [Scenario("gptq-3x1", 3, common + ["--method", "gptq"], work, 3),
            Scenario("gptq-2x2", 4, common + ["--method", "gptq", "--ranks-per-stage", 2], work, 2)]
    if not quick:
        all_ += [Scenario("awq-3x1", 3, common + ["--method", "awq"], work, 3),
                 Scenario("rtn-2x2", 4, common + ["--method", "rtn", "--ranks-per-stage", 2], work, 2)]
    return all_


def environment():
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1")


class Run:
    """One mpirun of a command; its output lines with the time each arrived, read by a thread."""

    def __init__(self, cmd):
        self.t0 = time.time()
        # its own session: a run that hangs is ended as a group, nothing else is touched
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=environment(), start_new_session=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time() - self.t0, line))

    def output(self):
        return "".join(l for _, l in self.lines)

    def phase(self, before):
        """Where the run was `before` seconds after its start, from rank 0's last progress line: start (MPI,
        loading, planning), setup (fingerprint, resume checks, opening the shards, first inputs), block k/N (the
        line of block k is out: later blocks are in flight), report (metrics gather, model.h5), output (done)."""
        phase = "start"
        for t, l in list(self.lines):
            if t > before:
                break
            for prefix, name in PHASES:
                if l.startswith(prefix):
                    phase = name or re.sub(r"\s+", " ", l[:len("block 123/123")]).strip()
        return phase

    def rank_pids(self):
        """{world rank: pid} of mpirun's children."""
        ranks = {}
        for pid in children(self.proc.pid):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            for e in env:
                if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                    ranks[int(e.split(b"=")[1])] = pid
        return ranks

    def wait(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.reader.join(timeout=5)
        return True

    def end_group(self):
        """SIGKILL to the run's session (a run that did not end by itself)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(10)


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


def gone(pid):
    """The process has exited (a zombie whose parent has not reaped it counts as gone)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def shard_blocks(out_dir):
    """({block: complete?} over every shard that opens, [shards that do not open])."""
    import h5py
    blocks, unreadable = {}, []
    if not os.path.isdir(out_dir):
        return blocks, unreadable
    for name in sorted(os.listdir(out_dir)):
        if not (name.startswith("shard-") and name.endswith(".h5")):
            continue
        try:
            with h5py.File(os.path.join(out_dir, name), "r") as f:
                for b in f.get("blocks", {}):
                    blocks[int(b)] = int(f["blocks"][b].attrs.get("complete", 0)) == 1
        except Exception:  # a shard killed in the middle of a metadata write: the next run starts it over
            unreadable.append(name)
    return blocks, unreadable


def model_complete(out_dir):
    """1 or 0 from model.h5's complete attribute; None when there is no readable model.h5."""
    import h5py
    try:
        with h5py.File(os.path.join(out_dir, "model.h5"), "r") as f:
            return int(f.attrs["complete"])
    except Exception:
        return None


def parse_ranges(text):
    """'1-3, 5' -> {1, 2, 3, 5}."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def stop_lines(output):
    """[(signal, stage, shard file, set of blocks said complete, set said not)] of the stop lines in output."""
    found = []
    for m in STOP_LINE.finditer(output):
        words = re.sub(r"^blocks? ", "", m.group(4))
        if " complete, " in words:
            done, rest = words.split(" complete, ")
            done, todo = parse_ranges(done), parse_ranges(rest.removesuffix(" not"))
        elif words.endswith(" not complete"):
            done, todo = set(), parse_ranges(words.removesuffix(" not complete"))
        else:
            done, todo = parse_ranges(words.removesuffix(" complete")), set()
        found.append((m.group(1), int(m.group(2)), m.group(3), done, todo))
    return found


def output_problems(output):
    """Crashes and error lines in a run's output."""
    problems = [f"crash in the output ({m})" for m in CRASH_MARKS if m in output]
    errors = [l for l in output.splitlines() if "error:" in l]
    if errors:
        problems.append(f"error line: {errors[0].strip()[:200]}")
    checksum = [l for l in output.splitlines() if "fails its checksums" in l]
    if checksum:
        problems.append(f"a block marked complete fails its checksums: {checksum[0].strip()[:200]}")
    return problems


def output_state(sc, before, fresh):
    """Checks of the output directory after a run that was stopped: model.h5 complete only when every block is
    complete and verifies; a block complete before the run (in a shard that read) is still complete, unless the
    run started over. Returns (problems, summary words, {block: complete?}, blocks lost)."""
    blocks, unreadable = shard_blocks(sc.out)
    complete = model_complete(sc.out)
    problems = []
    lost = [] if fresh else sorted(b for b, c in before.items() if c and not blocks.get(b, False))
    if complete == 1:
        insp = subprocess.run([pq.binary(), "inspect", sc.out], capture_output=True, text=True, env=environment())
        if len(blocks) != sc.blocks or not all(blocks.values()) or insp.returncode != 0:
            problems.append(f"model.h5 marked complete, but blocks {sorted(b for b, c in blocks.items() if not c)} "
                            f"are not (inspect rc {insp.returncode})")
    words = f"blocks complete {sum(before.values())}->{sum(blocks.values())}/{sc.blocks}"
    if unreadable:
        words += f", unreadable {','.join(s[6:11] for s in unreadable)}"
    if lost:
        words += f", LOST {lost}"
    if complete == 1:
        words += ", model.h5 complete"
    return problems, words, blocks, lost


def stop_line_problems(output, blocks, expect_stages=None):
    """Every block a stop line names as complete is complete on disk; with expect_stages, one line per stage."""
    problems = []
    lines = stop_lines(output)
    for sig, stage, shard, done, _ in lines:
        false = sorted(b for b in done if not blocks.get(b, False))
        if false:
            problems.append(f"stop line of stage {stage} names blocks {false} complete, not complete on disk")
    if expect_stages is not None and sorted(l[1] for l in lines) != list(range(expect_stages)):
        problems.append(f"stop lines of stages {sorted(l[1] for l in lines)}, expected one for each of "
                        f"{expect_stages}")
    return problems, lines


def reference(sc):
    shutil.rmtree(sc.reference, ignore_errors=True)
    run = Run(sc.command(sc.reference))
    if not run.wait(600) or run.proc.returncode != 0:
        raise RuntimeError(f"{sc.name}: the reference run failed:\n{run.output()}")
    sc.duration = time.time() - run.t0
    sc.blocks = len(shard_blocks(sc.reference)[0])
    # the span of the blocks' work: from rank 0's setup line to the last block's line
    times = [t for t, l in run.lines if l.startswith(("pipequant quantize:", "block "))]
    sc.work_span = (times[0], times[-1]) if times else (0.0, sc.duration)
    problems = output_problems(run.output())
    if problems:
        raise RuntimeError(f"{sc.name}: the reference run: {problems}")


def phase_order(name):
    """Sort key of a phase name: start, setup, block 1/N ... block N/N, report, output."""
    if name.startswith("block"):
        return (2, int(name.split()[1].split("/")[0]))
    return ({"start": 0, "setup": 1, "report": 3, "output": 4}.get(name, 5), 0)


def choose_moment(sc, rng):
    """('uniform', seconds after the start): over the whole run a quarter of the time, else over the reference's
    span of block work (the start, MPI and loading, takes a third of these short runs); or, one time in five,
    ('end', seconds after the last block's line): the metrics gather and the final model.h5 write."""
    r = rng.random()
    if r < 0.2:
        return "end", rng.uniform(0.0, 0.3)
    if r < 0.4:
        return "uniform", rng.uniform(0.0, sc.duration)
    return "uniform", rng.uniform(*sc.work_span)


def wait_for_moment(run, sc, mode, at):
    """Waits until the moment (or the run's end). Returns False when the run ended first."""
    last = f"block {sc.blocks:3d}/{sc.blocks}"
    while run.proc.poll() is None and mode != "none":
        now = time.time() - run.t0
        if mode == "uniform" and now >= at:
            return True
        if mode == "end":
            hit = [t for t, l in list(run.lines) if l.startswith(last)]
            if hit and now >= hit[0] + at:
                return True
        time.sleep(0.005)
    return False


def signal_run(run, sc, sig, rng):
    """Sends `sig` to one random rank (SIGKILL), or for SIGTERM to mpirun, one rank or every rank. Returns
    (what was signalled, {rank: pid}) or None when the run ended first."""
    deadline = time.time() + 10
    ranks = run.rank_pids()
    while len(ranks) < sc.np and run.proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # a moment before mpirun has started every rank: wait for them
        ranks = run.rank_pids()
    if run.proc.poll() is not None or len(ranks) < sc.np:
        return None
    target = "rank" if sig == signal.SIGKILL else rng.choice(["mpirun", "rank", "every rank"])
    try:
        if target == "mpirun":
            os.kill(run.proc.pid, sig)
            what = "mpirun"
        elif target == "rank":
            r = rng.randrange(sc.np)
            os.kill(ranks[r], sig)
            what = f"rank {r}"
        else:
            for pid in ranks.values():
                os.kill(pid, sig)
            what = "every rank"
    except ProcessLookupError:
        return None
    return what, ranks


def hang_report(run, ranks):
    """What a run that did not end was doing: each process's state and kernel wait, the stacks (gdb, where there
    is one), the last lines of its output."""
    lines = []
    for name, pid in [("mpirun", run.proc.pid)] + [(f"rank {r}", p) for r, p in sorted(ranks.items())]:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            wchan = open(f"/proc/{pid}/wchan").read()
        except OSError:
            lines.append(f"    {name} (pid {pid}): gone")
            continue
        lines.append(f"    {name} (pid {pid}): state {state}, waiting in {wchan or '-'}")
        if state not in ("Z", "X") and shutil.which("gdb"):
            bt = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 12"],
                                capture_output=True, text=True, timeout=60).stdout
            lines += ["      " + l for l in bt.splitlines() if l.startswith(("#", "Thread"))][:60]
    lines.append("    last output:")
    lines += ["      " + l.rstrip() for _, l in run.lines[-15:]]
    return "\n".join(lines)


def wait_all_gone(run, ranks, limit):
    """Seconds until mpirun and every rank are gone, or None past `limit`."""
    t_kill = time.time()
    while time.time() - t_kill < limit:
        if run.proc.poll() is not None and all(gone(p) for p in ranks.values()):
            return time.time() - t_kill
        time.sleep(0.02)
    return None


class Tally:
    def __init__(self):
        self.kills = 0
        self.seconds = []
        self.failures = []
        self.started_over = {}  # why a resume started a shard over -> how often
        self.chains = 0  # runs that finished after earlier kills: output compared with the reference
        self.identical = 0
        self.phases = {}
        self.lost = 0  # blocks complete before a run and not after it: a resume started their shard over
        self.kills_losing = 0  # the runs that lost them

    def fail(self, what):
        self.failures.append(what)
        print(f"  FAIL {what}", flush=True)


# the resume's words for why it starts a shard over
START_OVER = [("cannot be read", "unreadable"), ("is missing", "missing"), ("has damaged metadata", "damaged metadata"),
              ("cannot be removed", "unfinished object not removable")]


def note_started_over(output, tally):
    for line in output.splitlines():
        if line.startswith("resume:") and "the stage starts over" in line:
            why = next((name for words, name in START_OVER if words in line), "other")
            tally.started_over[why] = tally.started_over.get(why, 0) + 1


def finished_run(sc, run, tally, label, kept):
    """A run that ended on its own: exit 0, no crash, the `kept` blocks (complete before it) resumed, the output
    complete and bit-identical to the reference."""
    out = run.output()
    problems = output_problems(out)
    if run.proc.returncode != 0:
        problems.append(f"exit code {run.proc.returncode}")
    resumed = sum(1 for l in out.splitlines() if l.startswith("block ") and "resumed" in l)
    if resumed > kept:
        problems.append(f"{resumed} blocks resumed, only {kept} were complete before the run")
    if resumed < kept:  # complete blocks of a shard the resume had to start over: work lost, not a wrong output
        tally.lost += kept - resumed
        tally.kills_losing += 1
    note_started_over(out, tally)
    if not problems:
        diff = pq.compare_outputs(sc.reference, sc.out)
        tally.chains += 1
        tally.identical += not diff
        if diff:
            problems.append(f"output differs from the reference: {diff[:3]}")
    print(f"{label} {sc.name}: finished in {time.time() - run.t0:.1f} s, "
          f"{'bit-identical' if not problems else 'FAILED'}", flush=True)
    for p in problems:
        tally.fail(f"{sc.name} {label}: {p}")


def soak_iteration(sc, rng, sig, tally, label):
    """One start of the scenario's command with a signal at a random moment. Returns True when a signal landed."""
    before = shard_blocks(sc.out)[0]
    mode, at = choose_moment(sc, rng)
    if not sc.fresh and len(before) == sc.blocks and all(before.values()) and rng.random() < 0.7:
        mode, at = "none", 0.0  # every block is complete: mostly let the resume finish, so that the chain ends
    run = Run(sc.command(sc.out, overwrite=sc.fresh))
    fresh, sc.fresh = sc.fresh, False
    if not wait_for_moment(run, sc, mode, at) or (sent := signal_run(run, sc, sig, rng)) is None:
        if not run.wait(600):
            run.end_group()
            tally.fail(f"{sc.name} {label}: an unsignalled run did not end within 600 s")
            return False
        finished_run(sc, run, tally, label, 0 if fresh else sum(before.values()))
        sc.fresh = True
        return False
    moment = time.time() - run.t0
    what, ranks = sent
    seconds = wait_all_gone(run, ranks, END_LIMIT_S)
    if seconds is None:
        leftover = [r for r, p in ranks.items() if not gone(p)]
        tally.fail(f"{sc.name} {label}: still running {END_LIMIT_S:.0f} s after the signal (ranks {leftover}, "
                   f"mpirun {'gone' if run.proc.poll() is not None else 'running'})")
        print(hang_report(run, ranks), flush=True)
        run.end_group()
        for p in ranks.values():
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    run.wait(10)
    tally.kills += 1
    where = run.phase(moment)
    tally.phases[where] = tally.phases.get(where, 0) + 1
    if seconds is not None:
        tally.seconds.append(seconds)
    out = run.output()
    problems = output_problems(out)
    note_started_over(out, tally)
    state_problems, words, blocks, lost = output_state(sc, before, fresh)
    problems += state_problems
    tally.lost += len(lost)
    tally.kills_losing += bool(lost)
    # every stage has said what it keeps once the first block's line is out (the stages met at a barrier before)
    every_stage = sig != signal.SIGKILL and not what.startswith("rank") and "output:" not in out and \
        any(l.startswith("block ") for l in out.splitlines())
    line_problems, lines = stop_line_problems(out, blocks, sc.stages if every_stage else None)
    problems += line_problems
    if sig != signal.SIGKILL:
        if run.proc.returncode == 0 and model_complete(sc.out) != 1:
            problems.append("exit code 0 after a stop")
        if not what.startswith("rank") and "plan:" in out and "output:" not in out and not ANY_STOP_LINE.search(out):
            problems.append("no stop line")
    print(f"{label} {sc.name}: {'SIGKILL' if sig == signal.SIGKILL else 'SIGTERM'} to {what} at {moment:.2f} s "
          f"({mode}, {where}), all gone after "
          f"{'%.2f s' % seconds if seconds is not None else 'NEVER'}, rc {run.proc.returncode}, {words}"
          + (f", {len(lines)} stop line(s)" if lines else "")
          + (" (started with --overwrite)" if fresh else ""), flush=True)
    for p in problems:
        tally.fail(f"{sc.name} {label}: {p}")
    return True


def final_resume(sc, tally):
    run = Run(sc.command(sc.out))
    if not run.wait(600):
        run.end_group()
        tally.fail(f"{sc.name}: the final resume did not end within 600 s")
        return False
    out = run.output()
    problems = output_problems(out)
    if run.proc.returncode != 0:
        problems.append(f"the final resume exited {run.proc.returncode}")
    diff = [] if problems else pq.compare_outputs(sc.reference, sc.out)
    if diff:
        problems.append(f"output differs from the reference: {diff[:3]}")
    resumed = sum(1 for l in out.splitlines() if l.startswith("block ") and "resumed" in l)
    print(f"final resume {sc.name}: {resumed}/{sc.blocks} blocks resumed, "
          f"{'bit-identical to the reference' if not problems else 'FAILED'}", flush=True)
    for p in problems:
        tally.fail(f"{sc.name} final resume: {p}")
    return not problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=None, help="signals that land (default 50, 6 with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the two GPTQ layouts only, 6 kills by default")
    ap.add_argument("--signal", choices=["kill", "term", "mixed"], default="kill")
    ap.add_argument("--work", help="working directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    kills = args.kills if args.kills is not None else (6 if args.quick else 50)
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="pipequant-soak-")
    os.makedirs(work, exist_ok=True)
    all_sc = scenarios(work, args.quick)
    tally = Tally()
    t_start = time.time()
    for sc in all_sc:
        reference(sc)
        print(f"reference {sc.name}: mpirun -np {sc.np}, {sc.blocks} blocks, {sc.duration:.1f} s", flush=True)
    i = 0
    while tally.kills < kills:
        sc = all_sc[i % len(all_sc)]
        sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}.get(args.signal) or \
            (signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM)
        soak_iteration(sc, rng, sig, tally, f"[{tally.kills + 1:3d}/{kills}]")
        i += 1
        if len(tally.failures) > 20:
            print("more than 20 failures: stopping", flush=True)
            break
    identical = all([final_resume(sc, tally) for sc in all_sc])
    secs = tally.seconds
    phases = ", ".join(f"{k} {v}" for k, v in sorted(tally.phases.items(), key=lambda kv: phase_order(kv[0])))
    print(f"\nsummary: {tally.kills} kills (by phase: {phases}) over "
          f"{len(all_sc)} scenarios in {time.time() - t_start:.0f} s; seconds from the signal until every process was "
          f"gone: max {max(secs) if secs else float('nan'):.2f}, mean {sum(secs) / max(len(secs), 1):.2f}; "
          f"shards started over on resume: {sum(tally.started_over.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(tally.started_over.items())) or 'none'}); "
          f"{tally.lost} complete block(s) redone by "
          f"{tally.kills_losing} run(s); {tally.identical}/{tally.chains} finished chains "
          f"and {'all' if identical else 'NOT all'} final resumes bit-identical; {len(tally.failures)} failure(s)")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if tally.failures or not identical else 0)


if __name__ == "__main__":
    main()
