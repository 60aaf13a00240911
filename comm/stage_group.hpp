#pragma once
// The collectives of a stage group (docs/design.md section 7): the D ranks of one pipeline stage split the
// calibration samples and the rows of every solve, sum their Hessians, gather the solved rows, and agree on what
// a resumed run skips. Every collective here is safe for any element count: messages larger than the chunk limit
// (max_count(), below 2^31 by default) go in pieces, so a 53248-wide Hessian (2.8e9 elements) sums like a small one.
//
// Also the job-wide exchanges of a stage worker: the progress relay and the gather of per-stage records to rank 0.

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "comm/stage.hpp"

namespace pipequant::comm {

// The largest element count one MPI call carries (MPI counts are int); it also bounds the scratch of a sum (128 MB
// of doubles), and the pieces stay large enough for full bandwidth.
inline constexpr int64_t kDefaultMaxCount = int64_t{1} << 24;

class StageGroup {
 public:
  // Collective on MPI_COMM_WORLD: splits the world into P stages of `ranks_per_stage` ranks (see StageLayout).
  explicit StageGroup(int ranks_per_stage, int64_t max_count = kDefaultMaxCount);
  ~StageGroup();
  StageGroup(const StageGroup&) = delete;
  StageGroup& operator=(const StageGroup&) = delete;

  const StageLayout& layout() const { return layout_; }
  MPI_Comm comm() const { return layout_.stage_comm; }  // the D ranks of this stage (for parallel HDF5)
  int index() const { return layout_.index; }           // this rank's member index in the group
  int size() const { return layout_.ranks_per_stage; }  // D
  bool root() const { return layout_.index == 0; }
  int64_t max_count() const { return max_count_; }

  // The split of `count` items (samples in whole chunks of `chunk`, or solve rows with chunk = 1) over the group:
  // member `index()` owns [begin, end). Chunks are split as evenly as possible, in member order.
  std::pair<int64_t, int64_t> owned_range(int64_t count, int64_t chunk = 1) const;

  // In place: every member ends with the element-wise sum of all members' `data`, added on the group root in member
  // order (member 0 + member 1 + ..., left to right) and then broadcast, so that every member holds the same bits
  // whatever the MPI library and max_count. `count` (the same on every member) may exceed 2^31.
  void sum(double* data, int64_t count) const;
  void sum(int64_t* data, int64_t count) const;

  // Row gather: member d holds rows owned_range(rows) of a [rows, row_elems] matrix (`mine`, row-major); every
  // member receives the whole matrix in `full` ([rows, row_elems]). Element counts may exceed 2^31.
  void all_gather_rows(const float* mine, float* full, int64_t rows, int64_t row_elems) const;
  void all_gather_rows(const uint8_t* mine, uint8_t* full, int64_t rows, int64_t row_elems) const;

  // The group root's values reach every member (resume agreement: which blocks verified, whether the shard reads).
  void broadcast(std::vector<int64_t>& values) const;
  void broadcast(int& value) const;
  // Member `from`'s bytes reach every member (a result one member computed: an expert it owns, quantized).
  void broadcast(std::vector<uint8_t>& bytes, int from) const;

  // No member leaves before every member has arrived (e.g. the root's checks of a shard precede its reopening).
  void barrier() const;

 private:
  StageLayout layout_;
  int64_t max_count_;
};

// Each rank's string reaches world rank 0, in rank order (other ranks get an empty vector). Collective on the world.
// Used for the per-stage metrics records.
std::vector<std::string> gather_to_world_root(const std::string& mine);

// One progress line per block on world rank 0: rank 0 prints its own stage's lines and the other stage roots send
// theirs, which rank 0 prints as they come (checked after each of its own lines, then waited for in drain()).
// `out` is where rank 0 prints (stdout in the program, a file in the tests).
class ProgressRelay {
 public:
  explicit ProgressRelay(std::FILE* out = stdout);
  // While an error unwinds the stack, rank 0 may never receive: the destructor does not wait then (the job is
  // about to be aborted).
  ~ProgressRelay();
  ProgressRelay(const ProgressRelay&) = delete;
  ProgressRelay& operator=(const ProgressRelay&) = delete;

  // A block's line, from a stage root.
  void post(const std::string& line);
  // Rank 0: prints lines until `total` have been printed; other ranks: completes their sends.
  void drain(int64_t total);

 private:
  void print(const std::string& line);
  void poll();
  void receive_one();
  void finish_sends();

  std::FILE* out_;
  int rank_ = 0;
  int64_t printed_ = 0;
  std::deque<std::string> pending_;  // buffers of the sends in flight (a deque keeps them in place)
  std::vector<MPI_Request> requests_;
};

}  // namespace pipequant::comm
