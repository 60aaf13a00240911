// .npy reader/writer, token files and matrices: real token files, round trips, header variants, bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>

#include "io/npy.hpp"
#include "base/error.hpp"
#include "base/numeric.hpp"
#include "tests/testdata.hpp"

namespace pipequant::io {
namespace {

using pipequant::testing::scratch_dir;
using pipequant::testing::expect_user_error;
using pipequant::testing::testdata;


// A .npy file with a hand-written header: version major.0, the dict text (padded to end in '\n'), data bytes.
void write_custom(const std::string& path, int major, std::string dict, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY", 6);
  out.put(static_cast<char>(major));
  out.put(0);
  dict += '\n';
  const uint32_t n = static_cast<uint32_t>(dict.size());
  out.put(static_cast<char>(n & 0xff));
  out.put(static_cast<char>((n >> 8) & 0xff));
  if (major >= 2) {
    out.put(static_cast<char>((n >> 16) & 0xff));
    out.put(static_cast<char>((n >> 24) & 0xff));
  }
  out << dict << data;
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

TEST(Npy, RealTokenFiles) {
  const TokenFile t = read_tokens(testdata("text/tinystories_calib.tok512.npy"));
  EXPECT_EQ(t.ids.size(), 5434u);
  EXPECT_FALSE(t.two_d);
  EXPECT_EQ(t.samples, 1);
  EXPECT_EQ(t.row_length, 5434);
  EXPECT_EQ(t.ids[0], 1);  // each story starts with BOS
  EXPECT_LT(*std::max_element(t.ids.begin(), t.ids.end()), 512);
  EXPECT_GT(std::count(t.ids.begin(), t.ids.end(), 1), 5);  // several stories, several BOS

  const TokenFile big = read_tokens(testdata("text/tiny6L_calib.tok4k.npy"));
  EXPECT_EQ(big.ids.size(), 90151u);
  EXPECT_LT(*std::max_element(big.ids.begin(), big.ids.end()), 4096);
  EXPECT_GT(*std::max_element(big.ids.begin(), big.ids.end()), 512);

  const NpyArray a = read_npy(testdata("text/tinystories_eval.tok512.npy"));
  EXPECT_EQ(a.descr, "<i4");
  EXPECT_EQ(a.shape, std::vector<int64_t>{10092});
  EXPECT_EQ(a.numel(), 10092);
}

TEST(Npy, RealLogitsMatrix) {
  const Matrix m = read_matrix_f32(testdata("stories260K/reference_logits_eval_first32.npy"), "reference logits");
  EXPECT_EQ(m.rows, 32);
  EXPECT_EQ(m.cols, 512);
  ASSERT_EQ(m.data.size(), 32u * 512u);
  EXPECT_NE(std::count(m.data.begin(), m.data.end(), 0.0f), static_cast<long>(m.data.size()));
}

TEST(Npy, RoundTripF32Matrix) {
  const std::string dir = scratch_dir("npy-f32");
  std::vector<float> v(3 * 5);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.5f * static_cast<float>(i) - 3.0f;
  write_npy(dir + "/m.npy", "<f4", {3, 5}, v.data());
  // numpy's layout: the data starts 64-byte aligned
  std::ifstream in(dir + "/m.npy", std::ios::binary | std::ios::ate);
  EXPECT_EQ((static_cast<size_t>(in.tellg()) - v.size() * 4) % 64, 0u);

  const NpyArray a = read_npy(dir + "/m.npy");
  EXPECT_EQ(a.descr, "<f4");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{3, 5}));
  const Matrix m = read_matrix_f32(dir + "/m.npy", "layer input X");
  EXPECT_EQ(m.rows, 3);
  EXPECT_EQ(m.cols, 5);
  EXPECT_EQ(m.data, v);
}

TEST(Npy, MatrixConvertsF16AndF64) {
  const std::string dir = scratch_dir("npy-conv");
  const std::vector<uint16_t> h = {0x3c00, 0xc000, 0x7bff, 0x0001};  // 1, -2, 65504, 2^-24
  write_npy(dir + "/h.npy", "<f2", {2, 2}, h.data());
  EXPECT_EQ(read_matrix_f32(dir + "/h.npy", "W").data, (std::vector<float>{1.0f, -2.0f, 65504.0f, 0x1.0p-24f}));
  const std::vector<double> d = {0.1, -1e10, 3.0, 0.0};
  write_npy(dir + "/d.npy", "<f8", {1, 4}, d.data());
  const Matrix m = read_matrix_f32(dir + "/d.npy", "W");
  EXPECT_EQ(m.rows, 1);
  EXPECT_EQ(m.data, (std::vector<float>{0.1f, -1e10f, 3.0f, 0.0f}));
}

TEST(Npy, TokensInt64TwoD) {
  const std::string dir = scratch_dir("npy-i8");
  const std::vector<int64_t> ids = {1, 5, 9, 2147483647, 0, 3};
  write_npy(dir + "/t.npy", "<i8", {2, 3}, ids.data());
  const TokenFile t = read_tokens(dir + "/t.npy");
  EXPECT_TRUE(t.two_d);
  EXPECT_EQ(t.samples, 2);
  EXPECT_EQ(t.row_length, 3);
  EXPECT_EQ(t.ids, (std::vector<int32_t>{1, 5, 9, 2147483647, 0, 3}));
  EXPECT_EQ(t.path, dir + "/t.npy");
}

TEST(Npy, HeaderVariants) {
  const std::string dir = scratch_dir("npy-variants");
  const std::vector<int32_t> ids = {4, 8, 15, 16};
  // version 2.0 and 3.0, double quotes, no trailing comma, extra spaces, keys in another order
  write_custom(dir + "/v2.npy", 2, "{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", bytes_of(ids));
  write_custom(dir + "/v3.npy", 3, R"({ "shape" : ( 2 , 2 ) , "fortran_order":False, "descr":"<i4" })", bytes_of(ids));
  write_custom(dir + "/long.npy", 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (4L,)}", bytes_of(ids));
  EXPECT_EQ(read_tokens(dir + "/v2.npy").ids, ids);
  const TokenFile v3 = read_tokens(dir + "/v3.npy");
  EXPECT_EQ(v3.ids, ids);
  EXPECT_TRUE(v3.two_d);
  EXPECT_EQ(read_npy(dir + "/long.npy").shape, std::vector<int64_t>{4});
  // a scalar and an empty array parse (and are then rejected as tokens)
  write_custom(dir + "/scalar.npy", 1, "{'descr': '<i4', 'fortran_order': False, 'shape': ()}",
               bytes_of(ids).substr(0, 4));
  EXPECT_EQ(read_npy(dir + "/scalar.npy").numel(), 1);
  expect_user_error([&] { read_tokens(dir + "/scalar.npy"); }, {"scalar.npy", "1-D", "shape ()"});
  write_custom(dir + "/empty.npy", 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (0,)}", "");
  expect_user_error([&] { read_tokens(dir + "/empty.npy"); }, {"empty.npy", "no token ids"});
}

// ---- bad inputs ----

class BadNpy : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_dir(std::string("npy-bad-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    file_ = dir_ + "/tokens.npy";
  }
  std::string dir_, file_;
  std::string four_ints_ = bytes_of(std::vector<int32_t>{1, 2, 3, 4});
};

TEST_F(BadNpy, MissingFile) {
  expect_user_error([&] { read_tokens(dir_ + "/absent.npy"); }, {"absent.npy", "no such file"});
}

TEST_F(BadNpy, BadMagic) {
  std::ofstream(file_, std::ios::binary) << "PK\x03\x04 this is a zip, not npy";
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "not a .npy file"});
}

TEST_F(BadNpy, TooShort) {
  std::ofstream(file_, std::ios::binary) << "\x93NUM";
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "not a .npy file"});
}

TEST_F(BadNpy, UnknownVersion) {
  write_custom(file_, 4, "{'descr': '<i4', 'fortran_order': False, 'shape': (4,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "version 4.0", "1.0, 2.0 or 3.0"});
}

TEST_F(BadNpy, HeaderLengthPastEnd) {
  std::ofstream out(file_, std::ios::binary);
  out.write("\x93NUMPY\x01\x00\xff\x7f{'descr'", 18);
  out.close();
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "header length 32767", "past the end"});
}

TEST_F(BadNpy, HeaderNotADict) {
  write_custom(file_, 1, "['<i4', False, (4,)]", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "not a valid dict literal", "expected '{'"});
}

TEST_F(BadNpy, HeaderTruncatedDict) {
  write_custom(file_, 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (4,", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "not a valid dict literal"});
}

TEST_F(BadNpy, HeaderMissingKey) {
  write_custom(file_, 1, "{'descr': '<i4', 'shape': (4,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "'fortran_order'"});
}

TEST_F(BadNpy, BigEndian) {
  write_custom(file_, 1, "{'descr': '>i4', 'fortran_order': False, 'shape': (4,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "'>i4'", "big-endian", "little-endian"});
}

TEST_F(BadNpy, UnsupportedDescr) {
  write_custom(file_, 1, "{'descr': '<U8', 'fortran_order': False, 'shape': (1,)}", std::string(32, 'a'));
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "'<U8'", "not supported"});
}

TEST_F(BadNpy, StructuredDescr) {
  write_custom(file_, 1, "{'descr': [('a', '<i4'), ('b', '<f4')], 'fortran_order': False, 'shape': (2,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "descr", "structured"});
}

TEST_F(BadNpy, FortranOrder) {
  write_custom(file_, 1, "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 2)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "fortran_order", "C-order"});
}

TEST_F(BadNpy, DataShorterThanShape) {
  write_custom(file_, 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (5,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "data is 16 bytes", "shape (5,) x <i4 needs 20"});
}

TEST_F(BadNpy, DataLongerThanShape) {
  write_custom(file_, 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,)}", four_ints_);
  expect_user_error([&] { read_npy(file_); }, {"tokens.npy", "data is 16 bytes", "needs 12"});
}

TEST_F(BadNpy, TokensFloatDtype) {
  const std::vector<float> v = {1, 2, 3};
  write_npy(file_, "<f4", {3}, v.data());
  expect_user_error([&] { read_tokens(file_); },
                    {file_ + ": dtype <f4 not supported for token ids; expected int32 (<i4) or int64 (<i8)"});
}

TEST_F(BadNpy, TokensThreeD) {
  const std::vector<int32_t> v(8, 1);
  write_npy(file_, "<i4", {2, 2, 2}, v.data());
  expect_user_error([&] { read_tokens(file_); }, {"tokens.npy", "1-D", "2-D", "(2, 2, 2)"});
}

TEST_F(BadNpy, TokensNegative) {
  const std::vector<int32_t> v = {1, 2, 3, 4, -7, 5};
  write_npy(file_, "<i4", {2, 3}, v.data());
  expect_user_error([&] { read_tokens(file_); },
                    {"tokens.npy", "token id -7", "index 4", "row 1, column 1", "negative"});
}

TEST_F(BadNpy, TokensAboveInt32) {
  const std::vector<int64_t> v = {1, 2, 3000000000LL};
  write_npy(file_, "<i8", {3}, v.data());
  expect_user_error([&] { read_tokens(file_); }, {"tokens.npy", "token id 3000000000", "index 2", "int32"});
}

TEST_F(BadNpy, MatrixWrongRankNamesRole) {
  const std::vector<float> v = {1, 2, 3};
  write_npy(file_, "<f4", {3}, v.data());
  expect_user_error([&] { read_matrix_f32(file_, "weight W"); }, {"tokens.npy", "weight W", "2-D", "(3,)"});
}

TEST_F(BadNpy, MatrixIntDtypeNamesRole) {
  write_npy(file_, "<i4", {2, 2}, four_ints_.data());
  expect_user_error([&] { read_matrix_f32(file_, "inputs X"); }, {"tokens.npy", "inputs X", "<i4", "<f4"});
}

}  // namespace
}  // namespace pipequant::io
