#include "comm/stage.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <vector>

namespace pipequant::comm {

StageLayout make_stage_layout(int ranks_per_stage) {
  StageLayout l;
  MPI_Comm_rank(MPI_COMM_WORLD, &l.world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &l.world_size);
  l.ranks_per_stage = ranks_per_stage;
  l.stages = l.world_size / ranks_per_stage;
  l.stage = l.world_rank / ranks_per_stage;
  l.index = l.world_rank % ranks_per_stage;
  l.prev = l.stage > 0 ? l.world_rank - ranks_per_stage : -1;
  l.next = l.stage + 1 < l.stages ? l.world_rank + ranks_per_stage : -1;
  MPI_Comm_split(MPI_COMM_WORLD, l.stage, l.index, &l.stage_comm);
  return l;
}

void free_stage_layout(StageLayout& layout) {
  if (layout.stage_comm != MPI_COMM_NULL) MPI_Comm_free(&layout.stage_comm);
}

namespace {

// MPI counts are int: large messages go in pieces of at most this many floats.
inline constexpr int64_t kMaxPiece = 1 << 28;

class MpiTransport final : public ActivationTransport {
 public:
  explicit MpiTransport(const StageLayout& layout) : layout_(layout) {}
  ~MpiTransport() override { wait_sends(); }
  std::string name() const override { return "mpi"; }

  void send_next(const float* data, int64_t count, int tag) override {
    if (layout_.next < 0) return;
    for (int64_t off = 0; off < count; off += kMaxPiece) {
      const int n = static_cast<int>(std::min(kMaxPiece, count - off));
      MPI_Request req;
      MPI_Isend(data + off, n, MPI_FLOAT, layout_.next, tag, MPI_COMM_WORLD, &req);
      pending_.push_back(req);
    }
    bytes_sent_ += static_cast<uint64_t>(count) * sizeof(float);
  }

  void recv_prev(float* data, int64_t count, int tag) override {
    if (layout_.prev < 0) return;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t off = 0; off < count; off += kMaxPiece) {
      const int n = static_cast<int>(std::min(kMaxPiece, count - off));
      MPI_Recv(data + off, n, MPI_FLOAT, layout_.prev, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
    recv_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bytes_received_ += static_cast<uint64_t>(count) * sizeof(float);
  }

  void wait_sends() override {
    if (!pending_.empty()) MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE);
    pending_.clear();
  }

 private:
  StageLayout layout_;
  std::vector<MPI_Request> pending_;
};

}  // namespace

std::unique_ptr<ActivationTransport> make_mpi_transport(const StageLayout& layout) {
  return std::make_unique<MpiTransport>(layout);
}

namespace {

// Element i of the message of iteration `it`: small integers, exact in fp32, different every iteration.
float pattern(int64_t i, int it) { return static_cast<float>((i * 7 + it) % 1000); }

// The times (s) of the timed iterations and the elements that arrived changed, for one message size.
struct SizeTiming {
  std::vector<double> times;
  int64_t wrong = 0;
};

// One message size through `transport`: rank 0 (stage 0) does send_next + wait_sends, rank 1 (stage 1)
// recv_prev, the other ranks only meet the barriers. Rank 1 acknowledges each arrival so that rank 0's time
// covers the delivery, not only the local completion of its sends (an eager send completes at once).
SizeTiming time_size(ActivationTransport& transport, int rank, int64_t count, int iters, int warmup) {
  constexpr int kDataTag = 7, kAckTag = 8;
  std::vector<float> buf(static_cast<size_t>(count));
  SizeTiming st;
  for (int it = 0; it < warmup + iters; ++it) {
    if (rank == 0)
      for (int64_t i = 0; i < count; ++i) buf[static_cast<size_t>(i)] = pattern(i, it);
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    if (rank == 0) {
      transport.send_next(buf.data(), count, kDataTag);
      transport.wait_sends();
      MPI_Recv(nullptr, 0, MPI_BYTE, 1, kAckTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      transport.recv_prev(buf.data(), count, kDataTag);
      MPI_Send(nullptr, 0, MPI_BYTE, 0, kAckTag, MPI_COMM_WORLD);
    }
    const double dt = MPI_Wtime() - t0;
    if (it < warmup) continue;
    st.times.push_back(dt);
    if (rank == 1)
      for (int64_t i = 0; i < count; ++i)
        if (buf[static_cast<size_t>(i)] != pattern(i, it)) ++st.wrong;
  }
  MPI_Allreduce(MPI_IN_PLACE, &st.wrong, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  std::sort(st.times.begin(), st.times.end());
  return st;
}

// The nccl-tests style row of one size: median and minimum time, algbw = busbw = bytes / median.
std::string table_row(int64_t count, const SizeTiming& st) {
  const double med = st.times[st.times.size() / 2];
  const double bw = static_cast<double>(count * 4) / med / 1e9;
  char line[256];
  std::snprintf(line, sizeof(line), " %12lld %12lld %6s %10.1f %10.1f %10.3f %10.3f %8lld\n",
                static_cast<long long>(count * 4), static_cast<long long>(count), "float", med * 1e6, st.times[0] * 1e6,
                bw, bw, static_cast<long long>(st.wrong));
  return line;
}

}  // namespace

int run_transport_benchmark(TransportKind kind, int device, int64_t min_bytes, int64_t max_bytes, int iters, int warmup,
                            std::string& table) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) return 1;
  // one rank per stage: rank 0 is stage 0 and rank 1 stage 1, neighbours as in the driver
  StageLayout layout = make_stage_layout(1);
  const std::unique_ptr<ActivationTransport> transport =
      kind == TransportKind::kNccl ? make_nccl_transport(layout, device) : make_mpi_transport(layout);
  std::ostringstream os;
  os << "# pipequant transport benchmark: " << transport->name()
     << " transport, rank 0 -> rank 1 (fp32 activations from host memory"
     << (kind == TransportKind::kNccl ? ", staged through the GPUs" : "") << ")\n";
  os << "# algbw = size / time; busbw = algbw (point-to-point); time is the median of " << iters
     << " iterations in us; #wrong counts elements that arrived changed\n";
  char line[256];
  std::snprintf(line, sizeof(line), "#%12s %12s %6s %10s %10s %10s %10s %8s\n", "size(B)", "count", "type", "time(us)",
                "min(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong");
  os << line;
  int64_t total_wrong = 0;
  for (int64_t bytes = min_bytes; bytes <= max_bytes; bytes *= 2) {
    const int64_t count = std::max<int64_t>(1, bytes / 4);
    const SizeTiming st = time_size(*transport, rank, count, iters, warmup);
    total_wrong += st.wrong;
    os << table_row(count, st);
  }
  os << "# out of bounds values : " << total_wrong << (total_wrong == 0 ? " OK" : " FAILED") << "\n";
  table = os.str();
  free_stage_layout(layout);
  return total_wrong == 0 ? 0 : 1;
}

}  // namespace pipequant::comm
