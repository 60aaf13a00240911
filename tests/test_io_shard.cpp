// HDF5 shards and model.h5: bit-exact round trips of packed linears and dense tensors, attributes,
// collective writes, completion flags, checksum verification after corruption, external links in model.h5,
// and user errors (with HDF5's own printing silenced). Runs under any number of ranks: every rank writes
// collectively, rank 0 alone modifies files behind the writer's back.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "io/shard.hpp"
#include "tests/testdata.hpp"

namespace pipequant::io {
namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

void barrier() { MPI_Barrier(MPI_COMM_WORLD); }

// One scratch directory for all ranks (rank 0 makes it, the others learn its name); removed when the test
// passed, kept for a look when it failed.
class SharedDir {
 public:
  explicit SharedDir(const std::string& name) {
    path_ = world_rank() == 0 ? pipequant::testing::scratch_dir(name) : std::string();
    int n = static_cast<int>(path_.size());
    MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
    path_.resize(static_cast<size_t>(n));
    MPI_Bcast(path_.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  }
  ~SharedDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0 && !::testing::Test::HasFailure()) std::filesystem::remove_all(path_);
  }
  SharedDir(const SharedDir&) = delete;
  SharedDir& operator=(const SharedDir&) = delete;
  operator const std::string&() const { return path_; }

 private:
  std::string path_;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A packed linear with random contents in every dataset (random 32-bit words, finite random fp16 scales).
// act_order draws a random group for every column, as GPTQ with act-order does.
PackedLinear random_linear(const std::string& module, int64_t k, int64_t n, int bits, int64_t group_size,
                           bool act_order, uint32_t seed) {
  std::mt19937 rng(seed);
  PackedLinear l;
  l.module = module;
  l.in_features = k;
  l.out_features = n;
  l.bits = bits;
  l.group_size = group_size;
  l.groups = group_size < 0 ? 1 : ceil_div(k, group_size);
  l.sym = (seed & 1) != 0;
  l.act_order = act_order;
  l.static_groups = (seed & 2) != 0;
  l.damp = 0.01 * (1 + seed % 7);
  l.fallback = seed % 3 == 0 ? "damp" : "none";
  l.relative_error = std::uniform_real_distribution<double>(1e-4, 1e-2)(rng);
  l.rtn_relative_error = l.relative_error * 1.7;
  l.qweight.resize(static_cast<size_t>(ceil_div(k * bits, 32) * n));
  l.qzeros.resize(static_cast<size_t>(l.groups * ceil_div(n * bits, 32)));
  l.scales.resize(static_cast<size_t>(l.groups * n));
  l.g_idx.resize(static_cast<size_t>(k));
  for (auto& w : l.qweight) w = static_cast<int32_t>(rng());
  for (auto& w : l.qzeros) w = static_cast<int32_t>(rng());
  // positive normal halfs in [2^-14, 2^2): exponent field 1..16, random mantissa
  for (auto& s : l.scales) s = static_cast<uint16_t>(((1 + rng() % 16) << 10) | (rng() & 0x3ff));
  for (int64_t c = 0; c < k; ++c)
    l.g_idx[static_cast<size_t>(c)] =
        static_cast<int32_t>(act_order ? static_cast<int64_t>(rng() % static_cast<uint32_t>(l.groups))
                                       : (group_size < 0 ? 0 : c / group_size));
  return l;
}

// Random bit patterns (NaN and Inf included): a read that converted anything would not give them back.
DenseTensor random_dense(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, uint32_t seed) {
  std::mt19937 rng(seed);
  DenseTensor t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  int64_t count = 1;
  for (int64_t d : t.shape) count *= d;
  t.bytes.resize(static_cast<size_t>(count * (dtype == "F32" ? 4 : 2)));
  for (auto& b : t.bytes) b = static_cast<char>(rng() & 0xff);
  return t;
}

bool nontrivial(const std::vector<char>& v) {
  return std::any_of(v.begin(), v.end(), [](char c) { return c != 0; });
}

template <typename T>
bool nontrivial(const std::vector<T>& v) {
  return std::count(v.begin(), v.end(), v.empty() ? T{} : v.front()) != static_cast<std::ptrdiff_t>(v.size());
}

void expect_same(const PackedLinear& a, const PackedLinear& b) {
  EXPECT_EQ(a.module, b.module);
  EXPECT_EQ(a.in_features, b.in_features);
  EXPECT_EQ(a.out_features, b.out_features);
  EXPECT_EQ(a.groups, b.groups);
  EXPECT_EQ(a.bits, b.bits);
  EXPECT_EQ(a.group_size, b.group_size);
  EXPECT_EQ(a.sym, b.sym);
  EXPECT_EQ(a.act_order, b.act_order);
  EXPECT_EQ(a.static_groups, b.static_groups);
  EXPECT_EQ(a.damp, b.damp);
  EXPECT_EQ(a.fallback, b.fallback);
  EXPECT_EQ(a.relative_error, b.relative_error);
  EXPECT_EQ(a.rtn_relative_error, b.rtn_relative_error);
  EXPECT_EQ(a.qweight, b.qweight) << a.module << " qweight";
  EXPECT_EQ(a.qzeros, b.qzeros) << a.module << " qzeros";
  EXPECT_EQ(a.scales, b.scales) << a.module << " scales";
  EXPECT_EQ(a.g_idx, b.g_idx) << a.module << " g_idx";
}

void expect_same(const DenseTensor& a, const DenseTensor& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_TRUE(a.bytes == b.bytes) << a.name << " bytes differ";
}

// The contents of the standard test shard: two blocks, four linears of 3 and 4 bits, three dtypes.
struct Fixture {
  std::vector<std::vector<PackedLinear>> linears;       // per block
  std::vector<std::vector<DenseTensor>> block_tensors;  // per block
  std::vector<DenseTensor> tensors;
};

Fixture make_fixture() {
  Fixture f;
  // K = 172, G = 6: a ragged last group of 12 columns; 3-bit codes straddle words
  f.linears.push_back({random_linear("self_attn.q_proj", 172, 64, 4, 32, false, 11),
                       random_linear("mlp.down_proj", 172, 64, 3, 32, true, 12)});
  f.linears.push_back({random_linear("self_attn.o_proj", 64, 172, 3, -1, false, 13),
                       random_linear("mlp.gate_proj", 96, 48, 4, 16, true, 14)});
  f.block_tensors.push_back({random_dense("input_layernorm.weight", "F32", {64}, 21),
                             random_dense("self_attn.q_proj.bias", "BF16", {64}, 22)});
  f.block_tensors.push_back({random_dense("post_attention_layernorm.weight", "F16", {64}, 23)});
  f.tensors = {random_dense("model.embed_tokens.weight", "BF16", {17, 64}, 31),
               random_dense("model.norm.weight", "F32", {64}, 32), random_dense("lm_head.weight", "F16", {17, 64}, 33)};
  return f;
}

uint64_t fixture_bytes(const Fixture& f) {
  uint64_t n = 0;
  for (const auto& b : f.linears)
    for (const auto& l : b) n += packed_bytes(l);
  for (const auto& b : f.block_tensors)
    for (const auto& t : b) n += t.bytes.size();
  for (const auto& t : f.tensors) n += t.bytes.size();
  return n;
}

// Writes blocks [first, first + count) of the fixture (block i gets fixture block i % 2) and, with tensors,
// the model tensors.
void write_fixture(ShardWriter& w, const Fixture& f, int64_t first, int64_t count, bool tensors, bool complete = true) {
  for (int64_t b = first; b < first + count; ++b) {
    const size_t i = static_cast<size_t>(b % 2);
    w.begin_block(b);
    for (const auto& l : f.linears[i]) w.write_linear(b, l);
    for (const auto& t : f.block_tensors[i]) w.write_block_tensor(b, t);
    if (complete) w.mark_complete(b);
  }
  if (tensors)
    for (const auto& t : f.tensors) w.write_tensor(t);
}

std::vector<std::string> sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

TEST(ShardIo, RoundTripsLinearsAndTensorsBitExactly) {
  const SharedDir scratch("roundtrip");
  const std::string& dir = scratch;
  const std::string path = dir + "/shard-00000-of-00001.h5";
  const Fixture f = make_fixture();
  for (const auto& b : f.linears)
    for (const auto& l : b) {
      ASSERT_TRUE(nontrivial(l.qweight) && nontrivial(l.qzeros) && nontrivial(l.scales)) << l.module;
      if (l.groups > 1) {
        ASSERT_TRUE(nontrivial(l.g_idx)) << l.module;
      }
    }
  for (const auto& t : f.tensors) ASSERT_TRUE(nontrivial(t.bytes)) << t.name;
  {
    ShardWriter w(path, MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 2, true);
    EXPECT_EQ(w.bytes_written(), fixture_bytes(f));
    w.close();
  }
  barrier();
  ShardReader r(path);
  ASSERT_EQ(r.blocks(), (std::vector<int64_t>{0, 1}));
  for (int64_t b = 0; b < 2; ++b) {
    const size_t i = static_cast<size_t>(b);
    EXPECT_TRUE(r.block_complete(b));
    std::vector<std::string> want_linears, want_tensors;
    for (const auto& l : f.linears[i]) want_linears.push_back(l.module);
    for (const auto& t : f.block_tensors[i]) want_tensors.push_back(t.name);
    EXPECT_EQ(r.linears(b), sorted(want_linears));
    EXPECT_EQ(r.block_tensors(b), sorted(want_tensors));
    for (const auto& l : f.linears[i]) {
      expect_same(r.read_linear(b, l.module), l);
      const PackedLinear info = r.read_linear_info(b, l.module);
      EXPECT_TRUE(info.qweight.empty());
      EXPECT_EQ(info.groups, l.groups);
      EXPECT_EQ(packed_bytes(info), packed_bytes(l));
      const PackedLinear tables = r.read_linear_tables(b, l.module);
      EXPECT_TRUE(tables.qweight.empty() && tables.scales.empty());
      EXPECT_EQ(tables.qzeros, l.qzeros);
      EXPECT_EQ(tables.g_idx, l.g_idx);
    }
    for (const auto& t : f.block_tensors[i]) {
      expect_same(r.read_block_tensor(b, t.name), t);
      const DenseTensor info = r.read_block_tensor_info(b, t.name);
      EXPECT_TRUE(info.bytes.empty());
      EXPECT_EQ(info.dtype, t.dtype);
      EXPECT_EQ(info.shape, t.shape);
    }
    EXPECT_EQ(r.verify_block(b), std::vector<std::string>{});
  }
  std::vector<std::string> want;
  for (const auto& t : f.tensors) {
    want.push_back(t.name);
    EXPECT_TRUE(r.has_tensor(t.name));
    expect_same(r.read_tensor(t.name), t);
    const DenseTensor info = r.read_tensor_info(t.name);
    EXPECT_TRUE(info.bytes.empty());
    EXPECT_EQ(info.dtype, t.dtype);
    EXPECT_EQ(info.shape, t.shape);
  }
  EXPECT_EQ(r.tensors(), sorted(want));
  EXPECT_THROW(r.read_tensor_info("model.missing.weight"), UserError);
  EXPECT_FALSE(r.has_tensor("model.missing.weight"));
  EXPECT_EQ(r.verify_tensors(), std::vector<std::string>{});
  EXPECT_THROW(r.read_linear(0, "mlp.up_proj"), UserError);
  EXPECT_THROW(r.read_linear(5, "self_attn.q_proj"), UserError);
}

// The raw data of every write (linear, block tensor, model tensor) goes through collective MPI-IO, as
// H5Pget_mpio_no_collective_cause reports it after each write.
TEST(ShardIo, WritesAreCollectiveAndTheCauseIsQueried) {
  const SharedDir scratch("collective");
  const std::string& dir = scratch;
  const Fixture f = make_fixture();
  ShardWriter w(dir + "/shard.h5", MPI_COMM_WORLD, false);
  EXPECT_FALSE(w.last_write_was_collective());  // nothing written yet
  w.begin_block(0);
  w.write_linear(0, f.linears[0][1]);
  EXPECT_TRUE(w.last_write_was_collective());
  EXPECT_EQ(w.last_no_collective_cause(), 0u);
  w.write_block_tensor(0, f.block_tensors[0][0]);
  EXPECT_TRUE(w.last_write_was_collective());
  EXPECT_EQ(w.last_no_collective_cause(), 0u);
  for (const DenseTensor& t : f.tensors) {
    w.write_tensor(t);
    EXPECT_TRUE(w.last_write_was_collective()) << t.name;
    EXPECT_EQ(w.last_no_collective_cause(), 0u) << t.name;
  }
  w.mark_complete(0);
  w.close();
  barrier();
  ShardReader r(dir + "/shard.h5");
  for (const DenseTensor& t : f.tensors) expect_same(r.read_tensor(t.name), t);
  expect_same(r.read_linear(0, f.linears[0][1].module), f.linears[0][1]);
}

// Every rank of the communicator writes its own contiguous slice of the rows of every dataset: the slices add up to
// the whole, each rank's is its share (within a row of each dataset), and with 2 or more ranks no rank writes it all.
TEST(ShardIo, EachRankWritesItsOwnSlice) {
  const SharedDir scratch("slices");
  const std::string& dir = scratch;
  const Fixture f = make_fixture();
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  uint64_t mine = 0, total = 0;
  {
    ShardWriter w(dir + "/shard.h5", MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 2, true);
    mine = w.rank_bytes_written();
    total = w.bytes_written();
    w.close();
  }
  EXPECT_EQ(total, fixture_bytes(f));
  uint64_t sum = 0, largest = 0;
  MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&mine, &largest, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(sum, total);
  EXPECT_GT(mine, 0u) << "rank " << rank << " wrote nothing";
  if (size > 1) {
    EXPECT_LT(largest, total) << "one rank wrote everything";
  }
  barrier();
  ShardReader r(dir + "/shard.h5");
  for (int64_t b = 0; b < 2; ++b) {
    for (const auto& l : f.linears[static_cast<size_t>(b)]) expect_same(r.read_linear(b, l.module), l);
    EXPECT_EQ(r.verify_block(b), std::vector<std::string>{});
  }
  EXPECT_EQ(r.verify_tensors(), std::vector<std::string>{});
}

TEST(ShardIo, BlockWithoutMarkCompleteReadsIncompleteAndResumeReplacesIt) {
  const SharedDir scratch("incomplete");
  const std::string& dir = scratch;
  const std::string path = dir + "/shard.h5";
  const Fixture f = make_fixture();
  {
    ShardWriter w(path, MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 1, false);
    write_fixture(w, f, 1, 1, false, /*complete=*/false);  // the run dies inside block 1
  }
  barrier();
  {
    ShardReader r(path);
    EXPECT_EQ(r.blocks(), (std::vector<int64_t>{0, 1}));
    EXPECT_TRUE(r.block_complete(0));
    EXPECT_FALSE(r.block_complete(1));
    EXPECT_FALSE(r.block_complete(2));
  }
  barrier();
  // resume: block 1 is redone with other contents, block 0 stays as it was
  const PackedLinear redo = random_linear("self_attn.o_proj", 64, 172, 4, 32, false, 99);
  {
    ShardWriter w(path, MPI_COMM_WORLD, true);
    w.begin_block(1);
    w.write_linear(1, redo);
    w.mark_complete(1);
    w.close();
  }
  barrier();
  ShardReader r(path);
  EXPECT_TRUE(r.block_complete(0));
  EXPECT_TRUE(r.block_complete(1));
  EXPECT_EQ(r.linears(1), std::vector<std::string>{"self_attn.o_proj"});
  EXPECT_EQ(r.block_tensors(1), std::vector<std::string>{});
  expect_same(r.read_linear(1, "self_attn.o_proj"), redo);
  expect_same(r.read_linear(0, "mlp.down_proj"), f.linears[0][1]);
  EXPECT_EQ(r.verify_block(0), std::vector<std::string>{});
  EXPECT_EQ(r.verify_block(1), std::vector<std::string>{});
}

// A shard file removed while its writer has it open: the writes would go on into the unlinked file, so the next
// mark_complete refuses (on every rank), and an index marked complete is refused while a shard is missing.
TEST(ShardIo, AShardRemovedWhileWrittenIsNeverMarkedComplete) {
  const SharedDir scratch("removed");
  const std::string& dir = scratch;
  const std::string path = dir + "/shard-00000-of-00001.h5";
  const Fixture f = make_fixture();
  {
    ShardWriter w(path, MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 1, false);
    barrier();
    if (world_rank() == 0) std::filesystem::remove(path);
    barrier();
    write_fixture(w, f, 1, 1, false, /*complete=*/false);
    try {
      w.mark_complete(1);
      ADD_FAILURE() << "block 1 marked complete in a removed shard";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(path + ": the shard file was removed or replaced"), std::string::npos)
          << e.what();
    }
  }
  barrier();
  if (world_rank() == 0) {
    ModelIndex index;
    index.fingerprint = "0123456789abcdef";
    index.shard_files = {"shard-00000-of-00001.h5"};
    index.block_shard = {{0, 0}, {1, 0}};
    index.complete = true;
    try {
      write_model_index(dir, index);
      ADD_FAILURE() << "model.h5 marked complete without its shard";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(path + ": the shard is missing"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(model_index_exists(dir));
    index.complete = false;  // an index of a run in progress may precede its shards
    write_model_index(dir, index);
    EXPECT_TRUE(model_index_exists(dir));
  }
  barrier();
}

// Flips one bit of a dataset in place through the serial C API (no pipequant code involved).
void flip_bit(const std::string& file, const std::string& dataset, size_t byte) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  ASSERT_GE(d, 0);
  const hid_t t = H5Dget_type(d);
  const hid_t s = H5Dget_space(d);
  std::vector<char> buf(static_cast<size_t>(H5Sget_simple_extent_npoints(s)) * H5Tget_size(t));
  ASSERT_LT(byte, buf.size());
  ASSERT_GE(H5Dread(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()), 0);
  buf[byte] = static_cast<char>(buf[byte] ^ 0x10);
  ASSERT_GE(H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()), 0);
  H5Sclose(s);
  H5Tclose(t);
  H5Dclose(d);
  ASSERT_GE(H5Fclose(f), 0);
}

void delete_link(const std::string& file, const std::string& link) {
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  ASSERT_GE(H5Ldelete(f, link.c_str(), H5P_DEFAULT), 0);
  ASSERT_GE(H5Fclose(f), 0);
}

TEST(ShardIo, VerifyBlockNamesCorruptedAndMissingDatasets) {
  const SharedDir scratch("verify");
  const std::string& dir = scratch;
  const std::string path = dir + "/shard.h5";
  const Fixture f = make_fixture();
  {
    ShardWriter w(path, MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 2, true);
    w.close();
  }
  barrier();
  if (world_rank() == 0) {
    flip_bit(path, "/blocks/0/mlp.down_proj/qzeros", 5);
    flip_bit(path, "/blocks/0/input_layernorm.weight", 17);
    flip_bit(path, "/blocks/1/mlp.gate_proj/scales", 40);
    delete_link(path, "/blocks/1/self_attn.o_proj/g_idx");
    flip_bit(path, "/tensors/model.norm.weight", 3);
  }
  barrier();
  ShardReader r(path);
  EXPECT_TRUE(r.block_complete(0));  // the flag says written, the checksums say damaged
  EXPECT_EQ(r.verify_block(0), (std::vector<std::string>{"input_layernorm.weight", "mlp.down_proj/qzeros"}));
  EXPECT_EQ(r.verify_block(1), (std::vector<std::string>{"mlp.gate_proj/scales", "self_attn.o_proj/g_idx (missing)"}));
  EXPECT_EQ(r.verify_tensors(), std::vector<std::string>{"model.norm.weight"});
  EXPECT_THROW(r.verify_block(2), UserError);
}

// libhdf5 1.10 reads the first byte of an external link's value when it lists the link (H5L__extern_query), so a
// zero-length value crashes any reader of the file: the reader's child process takes the crash, and the reader refuses
// the file with one line.
TEST(ShardIo, AFileThatCrashesLibhdf5IsRefusedNotFatal) {
  const SharedDir scratch("crashes_hdf5");
  const std::string& dir = scratch;
  const std::string path = dir + "/shard.h5";
  const Fixture f = make_fixture();
  {
    ShardWriter w(path, MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 1, true);
    w.close();
  }
  barrier();
  EXPECT_NO_THROW(ShardReader{path});  // the healthy file passes its check
  barrier();
  if (world_rank() == 0) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    ASSERT_GE(H5Lcreate_ud(file, "/blocks/0/empty_external", H5L_TYPE_EXTERNAL, nullptr, 0, H5P_DEFAULT, H5P_DEFAULT),
              0);
    ASSERT_GE(H5Fclose(file), 0);
  }
  barrier();
  try {
    ShardReader r(path);
    FAIL() << "a file that crashes libhdf5 was opened";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), path + ": damaged: libhdf5 crashes reading its metadata (Segmentation fault)");
  }
}

// Reads a whole int32 dataset through a path in an open file (external links followed).
std::vector<int32_t> read_i32(hid_t file, const std::string& dataset) {
  std::vector<int32_t> out;
  const hid_t d = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0) << dataset;
  if (d < 0) return out;
  const hid_t s = H5Dget_space(d);
  out.resize(static_cast<size_t>(H5Sget_simple_extent_npoints(s)));
  EXPECT_GE(H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), 0);
  H5Sclose(s);
  H5Dclose(d);
  return out;
}

std::vector<float> read_f32(hid_t file, const std::string& dataset) {
  std::vector<float> out;
  const hid_t d = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0) << dataset;
  if (d < 0) return out;
  const hid_t s = H5Dget_space(d);
  out.resize(static_cast<size_t>(H5Sget_simple_extent_npoints(s)));
  EXPECT_GE(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), 0);
  H5Sclose(s);
  H5Dclose(d);
  return out;
}

// Two shards (blocks 0-1, then block 2 and the model tensors) and the index that links them.
ModelIndex write_two_shards(const std::string& dir, const Fixture& f) {
  ModelIndex index;
  index.config_json = R"({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3})";
  index.args_json = R"({"bits": 4, "group_size": 32})";
  index.fingerprint = "0123456789abcdef";
  index.shard_files = {"shard-00000-of-00002.h5", "shard-00001-of-00002.h5"};
  index.block_shard = {{0, 0}, {1, 0}, {2, 1}};
  for (const auto& t : f.tensors) index.tensor_shard[t.name] = 1;
  index.complete = true;
  {
    ShardWriter w(dir + "/" + index.shard_files[0], MPI_COMM_WORLD, false);
    write_fixture(w, f, 0, 2, false);
    w.close();
  }
  {
    ShardWriter w(dir + "/" + index.shard_files[1], MPI_COMM_WORLD, false);
    write_fixture(w, f, 2, 1, true);
    w.close();
  }
  barrier();
  if (world_rank() == 0) write_model_index(dir, index);
  barrier();
  return index;
}

TEST(ModelIndex, RoundTripsAndExternalLinksResolveFromAnyDirectory) {
  const SharedDir scratch("index");
  const std::string& dir = scratch;
  const Fixture f = make_fixture();
  EXPECT_FALSE(model_index_exists(dir));
  const ModelIndex index = write_two_shards(dir, f);
  ASSERT_TRUE(model_index_exists(dir));
  EXPECT_FALSE(std::filesystem::exists(dir + "/model.h5.tmp"));

  const ModelIndex back = read_model_index(dir);
  EXPECT_EQ(back.config_json, index.config_json);
  EXPECT_EQ(back.args_json, index.args_json);
  EXPECT_EQ(back.fingerprint, index.fingerprint);
  EXPECT_EQ(back.format, "gptq");
  EXPECT_EQ(back.shard_files, index.shard_files);
  EXPECT_EQ(back.block_shard, index.block_shard);
  EXPECT_EQ(back.tensor_shard, index.tensor_shard);
  EXPECT_TRUE(back.complete);

  // through the links with the plain C API: once by absolute path, once by a relative path from elsewhere
  const PackedLinear& down = f.linears[0][1];  // block 2 holds fixture block 0
  std::vector<float> norm(f.tensors[1].bytes.size() / 4);
  std::memcpy(norm.data(), f.tensors[1].bytes.data(), f.tensors[1].bytes.size());
  const std::string other = dir + "-elsewhere";
  if (world_rank() == 0) std::filesystem::create_directories(other);
  barrier();
  const auto cwd = std::filesystem::current_path();
  for (const bool relative : {false, true}) {
    std::string model = dir + "/model.h5";
    if (relative) {
      std::filesystem::current_path(other);
      model = "../" + std::filesystem::path(dir).filename().string() + "/model.h5";
    }
    const hid_t file = H5Fopen(model.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(file, 0) << model;
    EXPECT_EQ(read_i32(file, "/blocks/2/mlp.down_proj/qweight"), down.qweight) << model;
    EXPECT_EQ(read_i32(file, "/blocks/0/self_attn.q_proj/g_idx"), f.linears[0][0].g_idx) << model;
    const std::vector<float> got = read_f32(file, "/tensors/model.norm.weight");
    ASSERT_EQ(got.size(), norm.size());
    EXPECT_EQ(std::memcmp(got.data(), norm.data(), norm.size() * 4), 0) << model;
    EXPECT_GE(H5Fclose(file), 0);
    std::filesystem::current_path(cwd);
  }
  barrier();
  if (world_rank() == 0) std::filesystem::remove_all(other);
}

TEST(ModelIndex, MissingOrCorruptIndexIsUserErrorNamingIt) {
  const SharedDir scratch("badindex");
  const std::string& dir = scratch;
  EXPECT_FALSE(model_index_exists(dir));
  try {
    read_model_index(dir);
    ADD_FAILURE() << "no error for a missing model.h5";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/model.h5"), std::string::npos) << e.what();
  }
  barrier();
  if (world_rank() == 0) std::ofstream(dir + "/model.h5") << "this is not HDF5\n";
  barrier();
  ::testing::internal::CaptureStderr();
  try {
    read_model_index(dir);
    ADD_FAILURE() << "no error for a damaged model.h5";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/model.h5: cannot open"), std::string::npos) << e.what();
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

TEST(ShardIo, UnwritablePlacesAreUserErrorsAndHdf5StaysQuiet) {
  const SharedDir scratch("unwritable");
  const std::string& dir = scratch;
  if (world_rank() == 0) std::ofstream(dir + "/regular-file") << "x";
  barrier();
  ::testing::internal::CaptureStderr();
  for (const std::string& path : {dir + "/regular-file/shard-00000-of-00001.h5",
                                  std::string("/proc/pipequant-no-such-dir/shard-00000-of-00001.h5")}) {
    try {
      ShardWriter w(path, MPI_COMM_WORLD, false);
      ADD_FAILURE() << "no error creating " << path;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(path + ": cannot create file (is the directory writable?)"),
                std::string::npos)
          << e.what();
    }
  }
  try {
    write_model_index(dir + "/regular-file", ModelIndex{});
    ADD_FAILURE() << "no error writing model.h5 under a regular file";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/regular-file/model.h5.tmp: cannot create file"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(ShardReader(dir + "/no-such-shard.h5"), UserError);
  EXPECT_THROW(ShardReader(dir + "/regular-file"), UserError);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "") << "HDF5 printed diagnostics";
}

TEST(ShardIo, BadShapesAreRejectedBeforeWriting) {
  const SharedDir scratch("badshapes");
  const std::string& dir = scratch;
  ShardWriter w(dir + "/shard.h5", MPI_COMM_WORLD, false);
  PackedLinear l = random_linear("self_attn.k_proj", 172, 64, 3, 32, false, 5);
  EXPECT_THROW(w.write_linear(0, l), UserError);  // block not begun
  w.begin_block(0);
  l.qweight.pop_back();
  try {
    w.write_linear(0, l);
    ADD_FAILURE() << "no error for a short qweight";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("self_attn.k_proj: qweight has"), std::string::npos) << e.what();
  }
  DenseTensor t = random_dense("input_layernorm.weight", "F64", {4}, 6);
  EXPECT_THROW(w.write_block_tensor(0, t), UserError);
  t.dtype = "F32";
  t.shape = {5};
  EXPECT_THROW(w.write_block_tensor(0, t), UserError);
  w.mark_complete(0);
  w.close();
}

// Another reader of the format: h5py sees float16 scales, the bfloat16 bits, and CRCs that match zlib's.
TEST(ShardIo, H5pyReadsTheFormat) {
  if (std::system("/usr/bin/python3 -c 'import h5py, numpy' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no h5py";
  const SharedDir scratch("h5py");
  const std::string& dir = scratch;
  const Fixture f = make_fixture();
  write_two_shards(dir, f);
  if (world_rank() != 0) return;
  const std::string script = dir + "/check.py";
  std::ofstream(script) << R"(import sys, zlib, h5py, numpy as np
f = h5py.File(sys.argv[1] + '/model.h5', 'r')   # opened from another working directory
assert f.attrs['format'] == 'gptq' and int(f.attrs['complete']) == 1, dict(f.attrs)
assert [s.decode() if isinstance(s, bytes) else s for s in f['shards'][...]] == ['shard-00000-of-00002.h5', 'shard-00001-of-00002.h5']
assert sorted(f['blocks'].keys()) == ['0', '1', '2'], list(f['blocks'].keys())
lin = f['blocks/0/mlp.down_proj']
assert lin['scales'].dtype == np.float16, lin['scales'].dtype
assert lin['qweight'].dtype == np.int32 and lin['qweight'].shape == (17, 64), lin['qweight'].shape
assert lin['qzeros'].shape == (6, 6) and lin['g_idx'].shape == (172,)
assert int(lin.attrs['bits']) == 3 and int(lin.attrs['groups']) == 6 and int(lin.attrs['act_order']) == 1
assert lin.attrs['fallback'] in ('none', 'damp'), lin.attrs['fallback']
for name in ('qweight', 'qzeros', 'scales', 'g_idx'):
    assert zlib.crc32(lin[name][...].tobytes()) == int(lin.attrs['checksum_' + name]), name
s = lin['scales'][...]
assert np.all(np.isfinite(s)) and s.min() > 0
norm = f['tensors/model.norm.weight']
assert norm.dtype == np.float32 and norm.attrs['dtype'] == 'F32'
assert zlib.crc32(norm[...].tobytes()) == int(norm.attrs['checksum'])
# bfloat16: h5py widens it to float32 (exactly); the stored bits, read with the file type, match the CRC
emb = f['tensors/model.embed_tokens.weight']
assert emb.attrs['dtype'] == 'BF16' and emb.shape == (17, 64) and emb.id.get_type().get_size() == 2
bits = np.empty(emb.shape, dtype=np.uint16)
emb.id.read(h5py.h5s.ALL, h5py.h5s.ALL, bits, mtype=emb.id.get_type())
assert zlib.crc32(bits.tobytes()) == int(emb.attrs['checksum'])
wide = (bits.astype(np.uint32) << 16).view(np.float32)
finite = np.isfinite(wide)
assert finite.sum() > 1000 and np.array_equal(emb[...][finite], wide[finite])
assert f['blocks/1'].attrs['complete'] == 1
)";
  const std::string elsewhere = std::filesystem::temp_directory_path().string();
  const std::string cmd = "cd '" + elsewhere + "' && /usr/bin/python3 '" + script + "' '" + dir + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

}  // namespace
}  // namespace pipequant::io
