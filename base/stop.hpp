#pragma once
// Stopping on SIGTERM or SIGINT: a scheduler's scancel or time limit (SIGTERM to every task), mpirun passing on a
// user's kill (SIGTERM to every rank), Ctrl-C. One thread waits for the signal (blocked in every thread started
// after main begins; a handler passes it on from the few started before), says on each stage's root which blocks
// of its shard are durable, and ends the job through end_job
// (MPI_Abort) with 128 + the signal's number, whatever the other threads are blocked in (a receive, a collective,
// collective HDF5 I/O). Nothing is written on the way out: a block is complete only if ShardWriter::mark_complete
// flushed its marker, and the files survive the abort as they survive a kill -9.
//
// The line, one per stage:
//   pipequant: stopped by SIGTERM: stage 1 (shard-00001-of-00003.h5): blocks 1-2 complete, 3 not; rerun the same
//   command without --overwrite to resume

#include <cstdint>
#include <set>
#include <string>

namespace pipequant {

// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread created after it (MPI's, HDF5's,
// OpenMP's), installs a handler that passes them to the thread that waits for them (threads a library started
// before main, such as OpenBLAS's pool, do not block them), and starts that thread. Call first in main, before
// MPI_Init. A signal that is ignored on entry (SIGINT of a background job of a shell without job control) stays
// ignored.
void install_stop_on_signal();

// The command has returned and the process is about to finalize MPI and exit: a stop signal from here on says the
// stage's line but does not end the process (it ends within moments with the command's own exit code, or is ended
// with the job by the ranks still working). When a stop has begun first, this waits until the stop has ended the
// job.
void note_finishing();

// The stage this process writes, for the stop line. reports: this rank prints the line (its group root).
// durable: the blocks an earlier run completed and this run keeps (verified on resume).
void note_stage(int stage, const std::string& shard_path, int64_t first_block, int64_t blocks, bool reports,
                const std::set<int64_t>& durable);

// Held by ShardWriter::mark_complete around the write and flush of a block's complete marker. A stop waits for
// one in progress (a few seconds at most), reports the blocks durable then, and lets no later marker be written:
// the constructor of the next one waits until the job has ended.
class DurableMark {
 public:
  DurableMark();
  ~DurableMark();
  DurableMark(const DurableMark&) = delete;
  DurableMark& operator=(const DurableMark&) = delete;
  // The marker of `block` in `shard_path` is written and flushed.
  void done(const std::string& shard_path, int64_t block);
};

// What this rank says when stopped by `sig`: its stage's line on a group root ("pipequant: stopped by SIGTERM:
// stage ..."), "pipequant: stopped by SIGTERM" on world rank 0 before any stage is known (loading, planning, or a
// command without shards), an empty string otherwise.
std::string stop_line(int sig);

// "1-3, 5": sorted block indices as ranges (empty for none).
std::string block_ranges(const std::set<int64_t>& blocks);

// The stop line's text after "stopped by SIGNAL: " for a stage whose blocks [first, first + count) are
// `durable`: "stage 1 (shard-00001-of-00003.h5): blocks 1-2 complete, 3 not; rerun the same command without
// --overwrite to resume".
std::string stage_stop_report(int stage, const std::string& shard_file, int64_t first, int64_t count,
                              const std::set<int64_t>& durable);

}  // namespace pipequant
