#include "base/stop.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <thread>

#include "base/abort.hpp"

namespace pipequant {

namespace {

// How long a stop waits for a complete marker being flushed (one collective flush: well under a second unless the
// file system hangs), and how long it gives MPI_Abort before this process leaves on its own.
inline constexpr auto kMarkWait = std::chrono::seconds(3);
inline constexpr unsigned kEndGraceSeconds = 10;

struct StageNote {
  bool known = false;
  int stage = 0;
  std::string shard_path;
  int64_t first = 0;
  int64_t count = 0;
  bool reports = false;
  std::set<int64_t> durable;
};

struct StopState {
  std::timed_mutex mark_gate;  // held across a marker's write and flush; a stop takes it for good
  std::atomic<bool> stopping{false};
  std::mutex end_gate;                 // the stop or the command's return, whichever takes it first
  std::atomic<bool> finishing{false};  // the command has returned: only MPI_Finalize and the exit are left
  std::mutex note_mutex;               // guards note
  StageNote note;
};

// Never destroyed: the signal thread may still read it while the process exits.
StopState& state() {
  static StopState* s = new StopState;
  return *s;
}

const char* signal_name(int sig) { return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal"; }

[[noreturn]] void stop_job(int sig) {
  const int code = 128 + sig;
  // the last resort when the job does not end: a flush that hangs on a broken file system, an abort that hangs
  std::thread([code] {
    sleep(kEndGraceSeconds);
    std::_Exit(code);
  }).detach();
  StopState& s = state();
  s.stopping = true;
  // taken for good when free within kMarkWait: no marker is written after the line is said. A marker still being
  // flushed after that is said as not complete; it may yet become durable, which a resume verifies.
  if (!s.mark_gate.try_lock_for(kMarkWait))
    std::fprintf(stderr, "%s a block's complete marker is still being flushed\n", rank_label().c_str());
  const std::string line = stop_line(sig);
  if (!line.empty()) std::fprintf(stderr, "%s\n", line.c_str());
  end_job(code);
}

// A finishing rank's line, said on the first signal only.
void say_stage_once(int sig) {
  static std::atomic<bool> said{false};
  bool known = false;
  {
    std::lock_guard<std::mutex> lock(state().note_mutex);
    known = state().note.known;
  }
  if (!known || said.exchange(true)) return;
  const std::string line = stop_line(sig);
  if (!line.empty()) std::fprintf(stderr, "%s\n", line.c_str());
}

// The handler only passes the signal's number to the waiting thread: a write to a pipe is all that is safe in a
// handler. A handler, not sigwait alone: threads started before main (OpenBLAS's pool, from its library
// constructor) do not block the signals, and the kernel may deliver them there.
int stop_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = write(stop_pipe[1], &b, 1);  // non-blocking: a full pipe already holds one
  errno = saved;
}

[[noreturn]] void wait_for_stop(sigset_t set) {
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);  // the one thread of pipequant's own that takes them
  for (;;) {
    unsigned char sig = 0;
    if (read(stop_pipe[0], &sig, 1) != 1) continue;
    // Either the stop or the end of the command comes first. Once the command has returned, MPI is being finalized
    // and the process ends as it would, after saying its stage's line (its blocks are complete; the other ranks
    // may still be working): a rank that aborts inside MPI_Finalize, or exits non-zero after it, can leave mpirun
    // waiting for ever (the soak once saw mpirun stay after every rank was stopped around MPI_Finalize). Once a
    // stop has begun, the gate stays taken and the command cannot return into MPI_Finalize.
    std::unique_lock<std::mutex> gate(state().end_gate);
    if (state().finishing) {
      gate.unlock();
      say_stage_once(sig);
      continue;
    }
    gate.release();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);  // a second signal stays pending while this one is said
    stop_job(sig);
  }
}

}  // namespace

std::string stop_line(int sig) {
  StopState& s = state();
  std::lock_guard<std::mutex> lock(s.note_mutex);
  const std::string head = std::string("pipequant: stopped by ") + signal_name(sig);
  if (s.note.known) {
    if (!s.note.reports) return std::string();
    const std::string file = std::filesystem::path(s.note.shard_path).filename().string();
    return head + ": " + stage_stop_report(s.note.stage, file, s.note.first, s.note.count, s.note.durable);
  }
  return world_rank() == 0 ? head : std::string();
}

void install_stop_on_signal() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (pipe2(stop_pipe, O_CLOEXEC) != 0) return;  // no pipe, no clean stop: the signals keep their default
    fcntl(stop_pipe[1], F_SETFL, O_NONBLOCK);
    sigset_t set;
    sigemptyset(&set);
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    action.sa_flags = SA_RESTART;
    sigfillset(&action.sa_mask);
    for (int sig : {SIGTERM, SIGINT}) {
      struct sigaction previous {};
      if (sigaction(sig, nullptr, &previous) != 0 || previous.sa_handler == SIG_IGN) continue;
      sigaddset(&set, sig);
      sigaction(sig, &action, nullptr);
    }
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread(wait_for_stop, set).detach();
  });
}

void note_finishing() {
  std::lock_guard<std::mutex> gate(state().end_gate);  // waits for ever when a stop has begun: the job is ending
  state().finishing = true;
}

void note_stage(int stage, const std::string& shard_path, int64_t first_block, int64_t blocks, bool reports,
                const std::set<int64_t>& durable) {
  StopState& s = state();
  std::lock_guard<std::mutex> lock(s.note_mutex);
  s.note = StageNote{true, stage, shard_path, first_block, blocks, reports, durable};
}

DurableMark::DurableMark() {
  StopState& s = state();
  s.mark_gate.lock();
  // a stop is being said: this marker must not be written; the job ends within seconds
  while (s.stopping) std::this_thread::sleep_for(std::chrono::seconds(1));
}

DurableMark::~DurableMark() { state().mark_gate.unlock(); }

void DurableMark::done(const std::string& shard_path, int64_t block) {
  StopState& s = state();
  std::lock_guard<std::mutex> lock(s.note_mutex);
  if (s.note.known && s.note.shard_path == shard_path) s.note.durable.insert(block);
}

std::string block_ranges(const std::set<int64_t>& blocks) {
  std::string out;
  for (auto it = blocks.begin(); it != blocks.end();) {
    const int64_t first = *it;
    int64_t last = first;
    for (++it; it != blocks.end() && *it == last + 1; ++it) last = *it;
    if (!out.empty()) out += ", ";
    out += std::to_string(first);
    if (last != first) {
      out += '-';
      out += std::to_string(last);
    }
  }
  return out;
}

std::string stage_stop_report(int stage, const std::string& shard_file, int64_t first, int64_t count,
                              const std::set<int64_t>& durable) {
  std::set<int64_t> done, open;
  for (int64_t b = first; b < first + count; ++b) (durable.count(b) ? done : open).insert(b);
  const auto blocks = [](const std::set<int64_t>& b) {
    return std::string(b.size() == 1 ? "block " : "blocks ") + block_ranges(b);
  };
  std::string s = "stage " + std::to_string(stage) + " (" + shard_file + "): ";
  if (open.empty())
    s += count == 0 ? "no blocks" : blocks(done) + " complete";
  else if (done.empty())
    s += blocks(open) + " not complete";
  else
    s += blocks(done) + " complete, " + block_ranges(open) + " not";
  return s + "; rerun the same command without --overwrite to resume";
}

}  // namespace pipequant
