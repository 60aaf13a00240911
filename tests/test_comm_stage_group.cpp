// The stage-group collectives (comm/stage_group.hpp) under 1, 2 and 3 ranks, for every group size D that divides
// the world: the sample and row splits, sums with the same bits as a fixed-order reference whatever the piece
// limit, row gathers with uneven splits, broadcasts, the gather of records to rank 0 and the progress relay.
// Every rank computes every member's data from a seed, so every rank knows the exact expected result.
#include <gtest/gtest.h>
#include <mpi.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "comm/stage_group.hpp"

namespace pipequant::comm {
namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// The group sizes D this world allows: its divisors (1 and the world at least).
std::vector<int> group_sizes() {
  std::vector<int> sizes;
  for (int d = 1; d <= world_size(); ++d)
    if (world_size() % d == 0) sizes.push_back(d);
  return sizes;
}

// Piece limits: small ones that split every message (and do not divide the counts), and the default.
const std::vector<int64_t> kMaxCounts = {5, 7, kDefaultMaxCount};

// The owned_samples formula of src/hessian.cpp (chunks of 8) and the driver's row split, written out again.
std::pair<int64_t, int64_t> samples_formula(int64_t samples, int index, int ranks) {
  const int64_t chunks = (samples + 7) / 8;
  return {std::min(samples, chunks * index / ranks * 8), std::min(samples, chunks * (index + 1) / ranks * 8)};
}
std::pair<int64_t, int64_t> rows_formula(int64_t rows, int index, int ranks) {
  return {rows * index / ranks, rows * (index + 1) / ranks};
}

// Every member's owned_range in the group, in member order.
std::vector<std::pair<int64_t, int64_t>> all_ranges(const StageGroup& g, int64_t count, int64_t chunk) {
  const auto [b, e] = g.owned_range(count, chunk);
  const int64_t mine[2] = {b, e};
  std::vector<int64_t> flat(static_cast<size_t>(2 * g.size()));
  MPI_Allgather(mine, 2, MPI_INT64_T, flat.data(), 2, MPI_INT64_T, g.comm());
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t i = 0; i < flat.size(); i += 2) ranges.emplace_back(flat[i], flat[i + 1]);
  return ranges;
}

// Doubles of magnitudes 2^-40 .. 2^40 and both signs, so that the order of a sum shows in its bits.
std::vector<double> member_doubles(uint32_t seed, int stage, int member, int64_t count) {
  std::mt19937_64 rng(seed * 1000003ull + static_cast<uint64_t>(stage) * 101 + static_cast<uint64_t>(member));
  std::uniform_real_distribution<double> mantissa(1.0, 2.0);
  std::uniform_int_distribution<int> exponent(-40, 40);
  std::vector<double> v(static_cast<size_t>(count));
  for (double& x : v) x = (rng() & 1 ? -1.0 : 1.0) * std::ldexp(mantissa(rng), exponent(rng));
  return v;
}

std::vector<int64_t> member_ints(uint32_t seed, int stage, int member, int64_t count) {
  std::mt19937_64 rng(seed * 7919ull + static_cast<uint64_t>(stage) * 31 + static_cast<uint64_t>(member));
  std::uniform_int_distribution<int64_t> value(-(int64_t{1} << 50), int64_t{1} << 50);
  std::vector<int64_t> v(static_cast<size_t>(count));
  for (int64_t& x : v) x = value(rng);
  return v;
}

// member 0 + member 1 + ... left to right, element by element (or in reverse member order).
template <typename T, typename Make>
std::vector<T> sum_of_members(int members, bool reverse, Make make) {
  std::vector<T> sum = make(reverse ? members - 1 : 0);
  for (int k = 1; k < members; ++k) {
    const std::vector<T> v = make(reverse ? members - 1 - k : k);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += v[i];
  }
  return sum;
}

// The index of the first element whose bits differ, -1 if none.
int64_t first_bit_difference(const std::vector<double>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (std::bit_cast<uint64_t>(a[i]) != std::bit_cast<uint64_t>(b[i])) return static_cast<int64_t>(i);
  return a.size() == b.size() ? -1 : static_cast<int64_t>(std::min(a.size(), b.size()));
}

// Element (r, e) of the matrix the row-gather tests assemble: distinct, non-zero, exact in float and uint8.
float float_element(int64_t r, int64_t e) { return static_cast<float>(1 + r * 1000 + e); }
uint8_t byte_element(int64_t r, int64_t e) { return static_cast<uint8_t>((r * 131 + e * 7 + (e >> 13)) % 251 + 1); }

// Fills `full` [rows, row_elems] by gathering each member's rows of element(r, e); `full` starts as `sentinel`.
template <typename T, typename Element>
std::vector<T> gather_rows(const StageGroup& g, int64_t rows, int64_t row_elems, T sentinel, Element element) {
  const auto [r0, r1] = g.owned_range(rows);
  std::vector<T> mine;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t e = 0; e < row_elems; ++e) mine.push_back(element(r, e));
  std::vector<T> full(static_cast<size_t>(rows * row_elems), sentinel);
  g.all_gather_rows(mine.data(), full.data(), rows, row_elems);
  return full;
}

template <typename T, typename Element>
std::vector<T> whole_matrix(int64_t rows, int64_t row_elems, Element element) {
  std::vector<T> m;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < row_elems; ++e) m.push_back(element(r, e));
  return m;
}

TEST(StageGroup, LayoutSplitsTheWorldIntoStagesOfDRanks) {
  for (const int d : group_sizes()) {
    const StageGroup g(d);
    EXPECT_EQ(g.size(), d);
    EXPECT_EQ(g.index(), world_rank() % d);
    EXPECT_EQ(g.root(), world_rank() % d == 0);
    EXPECT_EQ(g.layout().stage, world_rank() / d);
    EXPECT_EQ(g.max_count(), kDefaultMaxCount);
    int comm_size = 0;
    MPI_Comm_size(g.comm(), &comm_size);
    EXPECT_EQ(comm_size, d);
    g.barrier();
  }
}

// owned_range is the Hessian sample split (chunks of 8) and the driver's row split (chunk 1); the members' ranges
// tile [0, count) in member order, each starting on a chunk boundary.
TEST(StageGroup, OwnedRangeMatchesTheSampleAndRowSplitsAndCoversEverythingOnce) {
  bool some_member_owns_nothing = false;
  for (const int d : group_sizes()) {
    const StageGroup g(d);
    for (const int64_t count : {0, 1, 2, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 1000, 4097}) {
      EXPECT_EQ(g.owned_range(count, 8), samples_formula(count, g.index(), d)) << count;
      EXPECT_EQ(g.owned_range(count), rows_formula(count, g.index(), d)) << count;
      for (const int64_t chunk : {1, 3, 8}) {
        const auto ranges = all_ranges(g, count, chunk);
        int64_t next = 0;
        for (const auto& [b, e] : ranges) {
          EXPECT_EQ(b, next) << "count " << count << " chunk " << chunk;
          EXPECT_LE(b, e);
          EXPECT_EQ(b % chunk == 0 || b == count, true) << "count " << count << " chunk " << chunk;
          some_member_owns_nothing |= b == e && count > 0;
          next = e;
        }
        EXPECT_EQ(next, count) << "chunk " << chunk;
      }
    }
  }
  EXPECT_TRUE(some_member_owns_nothing || world_size() == 1);  // count 1 over 2 or 3 members
}

// The sum is member 0 + member 1 + ... in that order on every member, whatever the piece limit.
TEST(StageGroup, SumOfDoublesHasTheBitsOfTheFixedOrderSum) {
  for (const int d : group_sizes()) {
    for (const int64_t count : {1, 23, 1000}) {
      for (const int64_t max_count : kMaxCounts) {
        const StageGroup g(d, max_count);
        const int stage = g.layout().stage;
        auto make = [&](int member) { return member_doubles(11, stage, member, count); };
        const std::vector<double> want = sum_of_members<double>(d, false, make);
        std::vector<double> data = make(g.index());
        g.sum(data.data(), count);
        EXPECT_EQ(first_bit_difference(data, want), -1) << "D " << d << " count " << count << " max " << max_count;
      }
    }
  }
}

// The data of the test above is order-sensitive: three members summed in reverse give other bits.
TEST(StageGroup, SumTestDataIsNonTrivialAndOrderSensitive) {
  auto make = [](int member) { return member_doubles(11, 0, member, 1000); };
  const std::vector<double> forward = sum_of_members<double>(3, false, make);
  const std::vector<double> reverse = sum_of_members<double>(3, true, make);
  EXPECT_NE(first_bit_difference(forward, reverse), -1);
  int64_t nonzero = 0;
  for (double x : forward) nonzero += x != 0.0;
  EXPECT_EQ(nonzero, 1000);
}

TEST(StageGroup, SumOfInt64IsExact) {
  for (const int d : group_sizes()) {
    for (const int64_t max_count : kMaxCounts) {
      const StageGroup g(d, max_count);
      const int stage = g.layout().stage;
      auto make = [&](int member) { return member_ints(5, stage, member, 101); };
      const std::vector<int64_t> want = sum_of_members<int64_t>(d, false, make);
      std::vector<int64_t> data = make(g.index());
      g.sum(data.data(), 101);
      EXPECT_EQ(data, want) << "D " << d << " max " << max_count;
    }
  }
}

// Rows split unevenly (rows not a multiple of D, fewer rows than members), pieces smaller than a row.
TEST(StageGroup, AllGatherRowsAssemblesTheWholeMatrixInOrder) {
  for (const int d : group_sizes()) {
    for (const int64_t max_count : kMaxCounts) {
      const StageGroup g(d, max_count);
      for (const int64_t rows : {0, 1, 2, 5, 7, 10}) {
        for (const int64_t row_elems : {1, 3, 13}) {
          EXPECT_EQ(gather_rows<float>(g, rows, row_elems, -1.0f, float_element),
                    whole_matrix<float>(rows, row_elems, float_element))
              << "D " << d << " max " << max_count << " rows " << rows << " x " << row_elems;
          EXPECT_EQ(gather_rows<uint8_t>(g, rows, row_elems, uint8_t{0}, byte_element),
                    whole_matrix<uint8_t>(rows, row_elems, byte_element))
              << "D " << d << " max " << max_count << " rows " << rows << " x " << row_elems;
        }
      }
    }
  }
}

TEST(StageGroup, BroadcastGivesEveryMemberTheRootsValues) {
  for (const int d : group_sizes()) {
    const StageGroup g(d, 5);
    const int stage = g.layout().stage;
    std::vector<int64_t> want;
    for (int64_t i = 0; i < 23; ++i) want.push_back(1000 * stage + 3 * i + 1);
    std::vector<int64_t> values = g.root() ? want : std::vector<int64_t>{-1, -2, -3};
    g.broadcast(values);
    EXPECT_EQ(values, want) << "D " << d;

    std::vector<int64_t> empty = g.root() ? std::vector<int64_t>{} : std::vector<int64_t>{7, 8};
    g.broadcast(empty);
    EXPECT_TRUE(empty.empty()) << "D " << d;

    int flag = g.root() ? 40 + stage : -1;
    g.broadcast(flag);
    EXPECT_EQ(flag, 40 + stage) << "D " << d;
  }
}

TEST(StageGroup, BroadcastOfBytesFromEachMember) {
  for (const int d : group_sizes()) {
    const StageGroup g(d, 5);  // pieces of 5: a count past the limit
    for (int from = 0; from < d; ++from) {
      // member `from` sends 13 * from + 3 bytes (its stage and index in them); the others start with other lengths
      std::vector<uint8_t> want;
      for (int i = 0; i < 13 * from + 3; ++i) want.push_back(static_cast<uint8_t>(31 * g.layout().stage + 7 * from + i));
      std::vector<uint8_t> bytes = g.index() == from ? want : std::vector<uint8_t>(static_cast<size_t>(g.index()), 9);
      g.broadcast(bytes, from);
      EXPECT_EQ(bytes, want) << "D " << d << " from member " << from;
    }
  }
}

// Rank r sends (r * 5) % 7 characters: rank 0 an empty string, the others strings of different lengths.
std::string record_of(int rank) {
  std::string s;
  for (int i = 0; i < (rank * 5) % 7; ++i) s.push_back(static_cast<char>('a' + (rank + i) % 26));
  return s;
}

TEST(StageGroup, GatherToWorldRootKeepsRankOrder) {
  const std::vector<std::string> records = gather_to_world_root(record_of(world_rank()));
  if (world_rank() != 0) {
    EXPECT_TRUE(records.empty());
    return;
  }
  ASSERT_EQ(records.size(), static_cast<size_t>(world_size()));
  for (int r = 0; r < world_size(); ++r) EXPECT_EQ(records[static_cast<size_t>(r)], record_of(r)) << "rank " << r;
}

// Every rank posts 3 + rank lines (each rank a stage root, D = 1); rank 0 prints all of them once, each rank's
// lines in the order they were posted.
TEST(ProgressRelay, RankZeroPrintsEveryPostedLineOnce) {
  std::FILE* out = world_rank() == 0 ? std::tmpfile() : stdout;
  ASSERT_NE(out, nullptr);
  int64_t total = 0;
  for (int r = 0; r < world_size(); ++r) total += 3 + r;
  {
    ProgressRelay relay(out);
    for (int i = 0; i < 3 + world_rank(); ++i)
      relay.post("rank " + std::to_string(world_rank()) + " line " + std::to_string(i) + "\n");
    relay.drain(total);
  }
  if (world_rank() != 0) return;
  std::rewind(out);
  std::vector<int> next_line(static_cast<size_t>(world_size()), 0);
  int64_t lines = 0;
  int rank = 0, line = 0;
  while (std::fscanf(out, "rank %d line %d\n", &rank, &line) == 2) {
    ASSERT_TRUE(rank >= 0 && rank < world_size());
    EXPECT_EQ(line, next_line[static_cast<size_t>(rank)]++) << "rank " << rank;
    ++lines;
  }
  std::fclose(out);
  EXPECT_EQ(lines, total);
  for (int r = 0; r < world_size(); ++r) EXPECT_EQ(next_line[static_cast<size_t>(r)], 3 + r);
}

// More than 2^31 bytes gathered at the default piece limit (about 3 GB per rank): set PIPEQUANT_BIG_TESTS=1.
TEST(StageGroup, AllGatherRowsBeyondTwoToThe31Elements) {
  const char* big = std::getenv("PIPEQUANT_BIG_TESTS");
  if (big == nullptr || std::string(big) != "1") GTEST_SKIP() << "set PIPEQUANT_BIG_TESTS=1 (needs ~3 GB per rank)";
  const StageGroup g(world_size());
  const int64_t row_elems = int64_t{1} << 20, rows = 2049;  // 2^31 + 2^20 bytes
  const auto [r0, r1] = g.owned_range(rows);
  std::vector<uint8_t> mine(static_cast<size_t>((r1 - r0) * row_elems));
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t e = 0; e < row_elems; ++e) mine[static_cast<size_t>((r - r0) * row_elems + e)] = byte_element(r, e);
  std::vector<uint8_t> full(static_cast<size_t>(rows * row_elems), 0);
  g.all_gather_rows(mine.data(), full.data(), rows, row_elems);
  // every 1048573rd element (a prime: it walks through all positions of a row) and the ends of the matrix
  std::vector<int64_t> samples = {0, rows * row_elems - 1, (int64_t{1} << 31) - 1, int64_t{1} << 31};
  for (int64_t i = 0; i < rows * row_elems; i += 1048573) samples.push_back(i);
  int64_t wrong = 0;
  for (const int64_t i : samples) wrong += full[static_cast<size_t>(i)] != byte_element(i / row_elems, i % row_elems);
  EXPECT_EQ(wrong, 0) << "of " << samples.size() << " sampled elements";
}

}  // namespace
}  // namespace pipequant::comm
