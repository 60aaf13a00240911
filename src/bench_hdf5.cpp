#include "src/bench_hdf5.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "base/timing.hpp"
#include "comm/world.hpp"
#include "io/shard.hpp"

namespace pipequant {

namespace {

inline constexpr int64_t kRowBytes = 1 << 16;  // the dataset is [rows, 16384] fp32: 64 KiB rows

// Deterministic, iteration-dependent values: a read-back of another iteration's data does not pass.
io::DenseTensor bench_tensor(int64_t rows, int iter) {
  io::DenseTensor t;
  t.name = "bench.data";
  t.dtype = "F32";
  t.shape = {rows, kRowBytes / 4};
  std::vector<float> values(static_cast<size_t>(rows * kRowBytes / 4));
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 100003) * 0.5f + static_cast<float>(iter);
  const char* p = reinterpret_cast<const char*>(values.data());
  t.bytes.assign(p, p + values.size() * sizeof(float));
  return t;
}

struct Times {
  double open = 0, transfer = 0, close = 0;
  double total() const { return open + transfer + close; }
};

// Every rank writes its slice (ShardWriter splits the rows among the communicator's ranks); times are the slowest
// rank's, after a barrier, as IOR takes them.
Times write_once(const std::string& path, const io::DenseTensor& t, bool& collective) {
  Times tm;
  comm::world_barrier();
  auto t0 = Clock::now();
  io::ShardWriter w(path, MPI_COMM_WORLD, false);
  tm.open = seconds_since(t0);
  t0 = Clock::now();
  w.write_tensor(t);
  comm::world_barrier();
  tm.transfer = seconds_since(t0);
  collective = w.last_write_was_collective();
  t0 = Clock::now();
  w.close();
  comm::world_barrier();
  tm.close = seconds_since(t0);
  return tm;
}

// Rank 0 reads the dataset back and compares every byte.
Times read_back(const std::string& path, const io::DenseTensor& want, bool& same) {
  Times tm;
  auto t0 = Clock::now();
  io::ShardReader r(path);
  tm.open = seconds_since(t0);
  t0 = Clock::now();
  const io::DenseTensor got = r.read_tensor(want.name);
  tm.transfer = seconds_since(t0);
  same = got.bytes == want.bytes && got.shape == want.shape && r.verify_tensors().empty();
  return tm;
}

void print_row(std::ostream& os, const char* access, double bytes, const Times& tm, int iter) {
  char line[200];
  std::snprintf(line, sizeof(line), "%-6s %10.2f %12.0f %10.0f %9.4f %9.4f %9.4f %9.4f %5d\n", access,
                bytes / (1 << 20) / tm.total(), bytes / 1024 / world_size(), static_cast<double>(kRowBytes) / 1024,
                tm.open, tm.transfer, tm.close, tm.total(), iter);
  os << line;
}

}  // namespace

int run_bench_hdf5(const std::string& dir, int64_t mib, int reps, std::ostream& os) {
  PQ_REQUIRE(mib > 0, "--mib must be positive, got ", mib);
  PQ_REQUIRE(reps > 0, "--reps must be positive, got ", reps);
  const bool root = world_rank() == 0;
  if (root) std::filesystem::create_directories(dir);
  comm::world_barrier();
  const std::string path = dir + "/pipequant-bench-hdf5-" + std::to_string(world_size()) + ".h5";
  const int64_t rows = std::max<int64_t>(1, mib * (1 << 20) / kRowBytes);
  const double bytes = static_cast<double>(rows * kRowBytes);
  if (root) {
    os << "# pipequant bench hdf5: " << world_size() << " rank(s) write one " << rows << " x " << kRowBytes
       << " byte dataset through the shard writer (collective MPI-IO, each rank its slice of the rows), rank 0 reads "
          "it back\n";
    os << "# bw = dataset bytes / total; block = bytes per rank; xfer = row; times in s, the slowest rank's; "
          "1 warm-up, then "
       << reps << " iterations\n";
    os << "access    bw(MiB/s)   block(KiB)  xfer(KiB)   open(s) wr/rd(s)  close(s)  total(s)  iter\n";
  }
  int failures = 0;
  for (int iter = -1; iter < reps; ++iter) {
    const io::DenseTensor t = bench_tensor(rows, iter + 1);
    bool collective = false, same = true;
    const Times w = write_once(path, t, collective);
    const Times r = root ? read_back(path, t, same) : Times{};
    comm::world_barrier();
    if (!root || iter < 0) continue;
    failures += (collective ? 0 : 1) + (same ? 0 : 1);
    print_row(os, "write", bytes, w, iter);
    print_row(os, "read", bytes, r, iter);
  }
  if (root) {
    std::filesystem::remove(path);
    os << "# validation: " << (failures == 0 ? "every write collective, every read-back identical: OK" : "FAILED")
       << "\n";
  }
  int result = failures > 0 ? 1 : 0;
  comm::broadcast_from_world_root(result);
  return result;
}

}  // namespace pipequant
