#include "comm/stage_group.hpp"

#include <algorithm>
#include <climits>
#include <exception>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace pipequant::comm {

namespace {

// The MPI datatype of an element pointer.
MPI_Datatype mpi_type(const double*) { return MPI_DOUBLE; }
MPI_Datatype mpi_type(const float*) { return MPI_FLOAT; }
MPI_Datatype mpi_type(const int64_t*) { return MPI_INT64_T; }
MPI_Datatype mpi_type(const uint8_t*) { return MPI_UINT8_T; }

// Calls piece(offset, n) for consecutive pieces of at most max_count of `count` elements (MPI counts are int).
template <typename F>
void for_each_piece(int64_t count, int64_t max_count, F&& piece) {
  for (int64_t off = 0; off < count; off += max_count) piece(off, static_cast<int>(std::min(max_count, count - off)));
}

template <typename T>
void broadcast_pieces(T* data, int64_t count, int root, MPI_Comm comm, int64_t max_count) {
  for_each_piece(count, max_count, [&](int64_t off, int n) { MPI_Bcast(data + off, n, mpi_type(data), root, comm); });
}

// Member `member` of `members`: whole chunks of `chunk` items, split as evenly as possible in member order.
std::pair<int64_t, int64_t> split_range(int64_t count, int64_t chunk, int member, int members) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  const int64_t c0 = chunks * member / members;
  const int64_t c1 = chunks * (member + 1) / members;
  return {std::min(count, c0 * chunk), std::min(count, c1 * chunk)};
}

// The root adds the members' data in member order (member 0 + member 1 + ...), so that the bits of the sum do
// not depend on the MPI library's reduction tree; then every member gets the root's result.
template <typename T>
void sum_in_member_order(T* data, int64_t count, const StageLayout& layout, int64_t max_count) {
  PQ_ASSERT(count >= 0, "sum of ", count, " elements");
  if (layout.ranks_per_stage == 1 || count == 0) return;
  constexpr int kTag = 7301;
  if (layout.index == 0) {
    std::vector<T> piece(static_cast<size_t>(std::min(count, max_count)));
    for_each_piece(count, max_count, [&](int64_t off, int n) {
      for (int member = 1; member < layout.ranks_per_stage; ++member) {
        MPI_Recv(piece.data(), n, mpi_type(data), member, kTag, layout.stage_comm, MPI_STATUS_IGNORE);
        for (int i = 0; i < n; ++i) data[off + i] += piece[static_cast<size_t>(i)];
      }
    });
  } else {
    for_each_piece(count, max_count,
                   [&](int64_t off, int n) { MPI_Send(data + off, n, mpi_type(data), 0, kTag, layout.stage_comm); });
  }
  broadcast_pieces(data, count, 0, layout.stage_comm, max_count);
}

// Each member in turn broadcasts its rows; every member copies its own rows into `full` first.
template <typename T>
void gather_rows_by_broadcast(const T* mine, T* full, int64_t rows, int64_t row_elems, const StageLayout& layout,
                              int64_t max_count) {
  for (int member = 0; member < layout.ranks_per_stage; ++member) {
    const auto [r0, r1] = split_range(rows, 1, member, layout.ranks_per_stage);
    T* slice = full + r0 * row_elems;  // rows [r0, r1) of full [rows, row_elems]
    const int64_t count = (r1 - r0) * row_elems;
    if (member == layout.index && count > 0 && mine != slice) std::copy(mine, mine + count, slice);
    broadcast_pieces(slice, count, member, layout.stage_comm, max_count);
  }
}

}  // namespace

StageGroup::StageGroup(int ranks_per_stage, int64_t max_count) : max_count_(max_count) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  PQ_REQUIRE(ranks_per_stage >= 1 && world % ranks_per_stage == 0, "--ranks-per-stage ", ranks_per_stage,
             " does not divide the ", world, " MPI ranks: use a divisor of the rank count");
  PQ_ASSERT(max_count >= 1 && max_count <= INT_MAX, "max_count ", max_count, " is not an MPI count");
  layout_ = make_stage_layout(ranks_per_stage);
}

StageGroup::~StageGroup() { free_stage_layout(layout_); }

std::pair<int64_t, int64_t> StageGroup::owned_range(int64_t count, int64_t chunk) const {
  PQ_ASSERT(count >= 0 && chunk >= 1, "owned_range(", count, ", ", chunk, ")");
  return split_range(count, chunk, index(), size());
}

void StageGroup::sum(double* data, int64_t count) const { sum_in_member_order(data, count, layout_, max_count_); }

void StageGroup::sum(int64_t* data, int64_t count) const { sum_in_member_order(data, count, layout_, max_count_); }

void StageGroup::all_gather_rows(const float* mine, float* full, int64_t rows, int64_t row_elems) const {
  gather_rows_by_broadcast(mine, full, rows, row_elems, layout_, max_count_);
}

void StageGroup::all_gather_rows(const uint8_t* mine, uint8_t* full, int64_t rows, int64_t row_elems) const {
  gather_rows_by_broadcast(mine, full, rows, row_elems, layout_, max_count_);
}

void StageGroup::broadcast(std::vector<int64_t>& values) const {
  int64_t n = static_cast<int64_t>(values.size());
  MPI_Bcast(&n, 1, MPI_INT64_T, 0, layout_.stage_comm);
  values.resize(static_cast<size_t>(n));
  broadcast_pieces(values.data(), n, 0, layout_.stage_comm, max_count_);
}

void StageGroup::broadcast(int& value) const { MPI_Bcast(&value, 1, MPI_INT, 0, layout_.stage_comm); }

void StageGroup::broadcast(std::vector<uint8_t>& bytes, int from) const {
  PQ_ASSERT(from >= 0 && from < size(), "broadcast from member ", from, " of ", size());
  int64_t n = static_cast<int64_t>(bytes.size());
  MPI_Bcast(&n, 1, MPI_INT64_T, from, layout_.stage_comm);
  bytes.resize(static_cast<size_t>(n));
  broadcast_pieces(bytes.data(), n, from, layout_.stage_comm, max_count_);
}

void StageGroup::barrier() const { MPI_Barrier(layout_.stage_comm); }

std::vector<std::string> gather_to_world_root(const std::string& mine) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  PQ_ASSERT(mine.size() <= static_cast<size_t>(INT_MAX), "a record of ", mine.size(), " bytes");
  int len = static_cast<int>(mine.size());
  std::vector<int> lens(static_cast<size_t>(world));
  MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  // MPI_Gatherv places the records by int displacements: their total must fit an int
  int64_t total = 0;
  for (const int l : lens) total += l;
  PQ_ASSERT(total <= INT_MAX, "the gathered records (", total, " bytes) exceed 2^31 - 1 bytes");
  std::vector<int> displs(static_cast<size_t>(world), 0);
  for (size_t r = 1; r < displs.size(); ++r) displs[r] = displs[r - 1] + lens[r - 1];
  std::string all(static_cast<size_t>(rank == 0 ? total : 0), '\0');
  MPI_Gatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, 0, MPI_COMM_WORLD);
  std::vector<std::string> records;
  if (rank != 0) return records;
  for (int r = 0; r < world; ++r)
    records.push_back(all.substr(static_cast<size_t>(displs[static_cast<size_t>(r)]),
                                 static_cast<size_t>(lens[static_cast<size_t>(r)])));
  return records;
}

// ---------------------------------------------------------------------------------------------------------
// ProgressRelay

namespace {
constexpr int kProgressTag = 7201;
}  // namespace

ProgressRelay::ProgressRelay(std::FILE* out) : out_(out) { MPI_Comm_rank(MPI_COMM_WORLD, &rank_); }

ProgressRelay::~ProgressRelay() {
  if (std::uncaught_exceptions() == 0) finish_sends();
}

void ProgressRelay::post(const std::string& line) {
  if (rank_ == 0) {
    print(line);
    poll();
    return;
  }
  pending_.push_back(line);
  requests_.emplace_back();
  MPI_Isend(pending_.back().data(), static_cast<int>(pending_.back().size()), MPI_CHAR, 0, kProgressTag, MPI_COMM_WORLD,
            &requests_.back());
}

void ProgressRelay::drain(int64_t total) {
  while (rank_ == 0 && printed_ < total) receive_one();
  finish_sends();
}

void ProgressRelay::print(const std::string& line) {
  std::fputs(line.c_str(), out_);
  std::fflush(out_);
  ++printed_;
}

// Prints whatever lines have already arrived, without waiting.
void ProgressRelay::poll() {
  int arrived = 1;
  while (arrived) {
    MPI_Iprobe(MPI_ANY_SOURCE, kProgressTag, MPI_COMM_WORLD, &arrived, MPI_STATUS_IGNORE);
    if (arrived) receive_one();
  }
}

void ProgressRelay::receive_one() {
  MPI_Status status;
  MPI_Probe(MPI_ANY_SOURCE, kProgressTag, MPI_COMM_WORLD, &status);
  int count = 0;
  MPI_Get_count(&status, MPI_CHAR, &count);
  std::string line(static_cast<size_t>(count), '\0');
  MPI_Recv(line.data(), count, MPI_CHAR, status.MPI_SOURCE, kProgressTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  print(line);
}

void ProgressRelay::finish_sends() {
  if (!requests_.empty()) MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
  requests_.clear();
  pending_.clear();
}

}  // namespace pipequant::comm
