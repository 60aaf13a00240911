// Safetensors reader: real checkpoints, round trips, sharded indexes, and one test per malformed input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "io/safetensors.hpp"
#include "tests/testdata.hpp"

namespace pipequant::io {
namespace {

using nlohmann::json;
using pipequant::testing::expect_user_error;
using pipequant::testing::scratch_dir;
using pipequant::testing::testdata;

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A safetensors file with the given header text (no padding added) and data region.
void write_raw(const std::string& path, const std::string& header, const std::vector<char>& data) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

// The header and data region parsed independently of the reader under test.
struct DirectParse {
  json header;
  std::vector<char> bytes;
  uint64_t data_start = 0;
};
DirectParse direct_parse(const std::string& path) {
  DirectParse d;
  d.bytes = read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, d.bytes.data(), 8);
  d.header = json::parse(std::string(d.bytes.data() + 8, n));
  d.data_start = 8 + n;
  return d;
}

std::vector<std::byte> f32_bytes(const std::vector<float>& v) {
  std::vector<std::byte> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

TensorToWrite f32_tensor(const std::string& name, std::vector<int64_t> shape, float start) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = start + 0.25f * static_cast<float>(i);
  return {name, DType::kF32, std::move(shape), f32_bytes(v)};
}

TEST(Safetensors, Stories260KShapesAndValues) {
  const std::string dir = testdata("stories260K");
  const Checkpoint ck = Checkpoint::open(dir);
  // embed + 5 blocks x (2 norms + 7 linears) + final norm; tied, so no lm_head
  EXPECT_EQ(ck.names().size(), 1u + 5u * 9u + 1u);
  EXPECT_FALSE(ck.has("lm_head.weight"));
  EXPECT_EQ(ck.info("model.embed_tokens.weight").shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(ck.info("model.layers.0.self_attn.q_proj.weight").shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(ck.info("model.layers.0.self_attn.k_proj.weight").shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(ck.info("model.layers.4.mlp.up_proj.weight").shape, (std::vector<int64_t>{172, 64}));
  EXPECT_EQ(ck.info("model.layers.4.mlp.down_proj.weight").shape, (std::vector<int64_t>{64, 172}));
  EXPECT_EQ(ck.info("model.norm.weight").shape, (std::vector<int64_t>{64}));
  EXPECT_EQ(ck.info("model.layers.0.self_attn.k_proj.weight").dtype, DType::kF32);
  EXPECT_EQ(ck.info("model.layers.0.self_attn.k_proj.weight").nbytes, 32u * 64u * 4u);

  // the values agree with a direct parse of the file's bytes
  const DirectParse d = direct_parse(dir + "/model.safetensors");
  for (const char* name :
       {"model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"}) {
    const auto& e = d.header[name];
    const uint64_t begin = e["data_offsets"][0].get<uint64_t>();
    const std::vector<float> got = ck.read_f32(name);
    ASSERT_EQ(got.size() * 4, e["data_offsets"][1].get<uint64_t>() - begin) << name;
    std::vector<float> want(got.size());
    std::memcpy(want.data(), d.bytes.data() + d.data_start + begin, want.size() * 4);
    EXPECT_EQ(got, want) << name;
    const auto nonzero = std::count_if(got.begin(), got.end(), [](float x) { return x != 0.0f; });
    EXPECT_GT(nonzero, static_cast<long>(got.size() / 2)) << name << " is mostly zero";
  }
  // raw() points into the mapped file at the validated offset
  const auto raw = ck.raw("model.norm.weight");
  EXPECT_EQ(raw.size(), 64u * 4u);
  const uint64_t norm_begin = d.header["model.norm.weight"]["data_offsets"][0].get<uint64_t>();
  EXPECT_EQ(std::memcmp(raw.data(), d.bytes.data() + d.data_start + norm_begin, raw.size()), 0);
  EXPECT_EQ(ck.mapped_files(), std::vector<std::string>{dir + "/model.safetensors"});
}

TEST(Safetensors, TinyLlamaBf16Converts) {
  const Checkpoint ck = Checkpoint::open(testdata("tiny-llama-6L"));
  EXPECT_EQ(ck.names().size(), 1u + 6u * 9u + 1u);
  const auto& q = ck.info("model.layers.5.self_attn.q_proj.weight");
  EXPECT_EQ(q.dtype, DType::kBF16);
  EXPECT_EQ(q.shape, (std::vector<int64_t>{256, 256}));
  EXPECT_EQ(ck.info("model.layers.0.self_attn.k_proj.weight").shape, (std::vector<int64_t>{128, 256}));
  EXPECT_EQ(ck.info("model.layers.0.mlp.gate_proj.weight").shape, (std::vector<int64_t>{768, 256}));
  EXPECT_EQ(ck.info("model.embed_tokens.weight").shape, (std::vector<int64_t>{4096, 256}));

  const auto raw = ck.raw(q.name);
  const std::vector<float> f = ck.read_f32(q.name);
  ASSERT_EQ(f.size(), 256u * 256u);
  double sum_sq = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, raw.data() + 2 * i, 2);
    ASSERT_EQ(f[i], bf16_to_float(h)) << "element " << i;
    ASSERT_TRUE(std::isfinite(f[i]));
    sum_sq += static_cast<double>(f[i]) * f[i];
  }
  // a trained weight: RMS neither zero nor huge
  const double rms = std::sqrt(sum_sq / static_cast<double>(f.size()));
  EXPECT_GT(rms, 1e-3);
  EXPECT_LT(rms, 10.0);
  // the norm weights of a trained model are around 1, not exactly 1
  const std::vector<float> norm = ck.read_f32("model.norm.weight");
  EXPECT_NE(std::count(norm.begin(), norm.end(), 1.0f), static_cast<long>(norm.size()));
}

TEST(Safetensors, OpenByFilePath) {
  const std::string file = testdata("stories260K/model.safetensors");
  const Checkpoint ck = Checkpoint::open(file);
  EXPECT_TRUE(ck.has("model.layers.0.self_attn.k_proj.weight"));
  EXPECT_EQ(ck.path(), file);
}

TEST(Safetensors, RoundTripAllFloatDtypesAndMetadata) {
  const std::string dir = scratch_dir("st-roundtrip");
  const std::string file = dir + "/weights.safetensors";
  const std::vector<float> vals = {1.0f, -2.5f, 0.15625f, 65504.0f, -0.0f, 3.0e-5f};
  std::vector<std::byte> f16(vals.size() * 2), b16(vals.size() * 2);
  for (size_t i = 0; i < vals.size(); ++i) {
    const uint16_t h = float_to_fp16(vals[i]), b = float_to_bf16(vals[i]);
    std::memcpy(f16.data() + 2 * i, &h, 2);
    std::memcpy(b16.data() + 2 * i, &b, 2);
  }
  std::vector<int32_t> ints = {7, -3, 1 << 30};
  std::vector<std::byte> i32(ints.size() * 4);
  std::memcpy(i32.data(), ints.data(), i32.size());
  std::vector<TensorToWrite> ts = {
      {"b.half", DType::kF16, {2, 3}, f16}, {"a.float", DType::kF32, {3, 2}, f32_bytes(vals)},
      {"c.bf16", DType::kBF16, {6}, b16},   {"d.int", DType::kI32, {3}, i32},
      {"e.empty", DType::kF32, {0, 4}, {}},
  };
  write_safetensors(file, ts, {{"format", "pt"}});

  // header padded to a multiple of 8; tensors laid out in the given order; metadata kept
  const DirectParse d = direct_parse(file);
  EXPECT_EQ((d.data_start - 8) % 8, 0u);
  EXPECT_EQ(d.header["__metadata__"]["format"], "pt");
  EXPECT_EQ(d.header["b.half"]["data_offsets"], json({0, 12}));
  EXPECT_EQ(d.header["a.float"]["data_offsets"], json({12, 36}));
  EXPECT_EQ(d.bytes.size(), d.data_start + 12 + 24 + 12 + 12);

  const Checkpoint ck = Checkpoint::open(dir);  // the only *.safetensors in the dir
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a.float", "b.half", "c.bf16", "d.int", "e.empty"}));
  EXPECT_EQ(ck.read_f32("a.float"), vals);
  const auto half = ck.read_f32("b.half");
  const auto bf = ck.read_f32("c.bf16");
  for (size_t i = 0; i < vals.size(); ++i) {
    EXPECT_EQ(half[i], round_to_fp16(vals[i])) << i;
    EXPECT_EQ(bf[i], bf16_to_float(float_to_bf16(vals[i]))) << i;
  }
  EXPECT_EQ(half[3], 65504.0f);
  EXPECT_EQ(bf[1], -2.5f);
  EXPECT_EQ(ck.info("b.half").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ck.read_f32("e.empty").size(), 0u);
  const auto raw = ck.raw("d.int");
  std::vector<int32_t> back(3);
  std::memcpy(back.data(), raw.data(), 12);
  EXPECT_EQ(back, ints);
  expect_user_error([&] { ck.read_f32("d.int"); }, {"weights.safetensors", "d.int", "I32"});
  expect_user_error([&] { ck.info("nope.weight"); }, {dir, "nope.weight", "not found"});
}

TEST(Safetensors, WriteRejectsWrongByteCount) {
  const std::string dir = scratch_dir("st-write-bad");
  expect_user_error(
      [&] {
        write_safetensors(dir + "/x.safetensors", {{"w", DType::kF32, {2, 2}, std::vector<std::byte>(12)}});
      },
      {"x.safetensors", "w", "12 bytes", "16"});
}

// Two shards and an index: reading a tensor of one shard maps only that shard.
TEST(Safetensors, ShardedIndexMapsOnlyWhatIsRead) {
  const std::string dir = scratch_dir("st-sharded");
  const std::string f1 = "model-00001-of-00002.safetensors", f2 = "model-00002-of-00002.safetensors";
  write_safetensors(dir + "/" + f1, {f32_tensor("model.embed_tokens.weight", {4, 3}, 1.0f),
                                     f32_tensor("model.layers.0.mlp.up_proj.weight", {5, 3}, -2.0f)});
  write_safetensors(dir + "/" + f2, {f32_tensor("model.layers.1.mlp.up_proj.weight", {5, 3}, 7.0f),
                                     f32_tensor("model.norm.weight", {3}, 0.5f)});
  json index = {{"metadata", {{"total_size", 0}}},
                {"weight_map",
                 {{"model.embed_tokens.weight", f1},
                  {"model.layers.0.mlp.up_proj.weight", f1},
                  {"model.layers.1.mlp.up_proj.weight", f2},
                  {"model.norm.weight", f2}}}};
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);

  const Checkpoint ck = Checkpoint::open(dir);
  EXPECT_EQ(ck.names().size(), 4u);
  EXPECT_TRUE(ck.mapped_files().empty());
  EXPECT_EQ(ck.info("model.norm.weight").file, dir + "/" + f2);
  const auto up0 = ck.read_f32("model.layers.0.mlp.up_proj.weight");
  EXPECT_EQ(up0.size(), 15u);
  EXPECT_EQ(up0[0], -2.0f);
  EXPECT_EQ(up0[14], -2.0f + 0.25f * 14);
  EXPECT_EQ(ck.mapped_files(), std::vector<std::string>{dir + "/" + f1});
  EXPECT_EQ(ck.read_f32("model.norm.weight"), (std::vector<float>{0.5f, 0.75f, 1.0f}));
  EXPECT_EQ(ck.mapped_files().size(), 2u);

  // opening the index file itself works too
  const Checkpoint by_index = Checkpoint::open(dir + "/model.safetensors.index.json");
  EXPECT_EQ(by_index.read_f32("model.layers.1.mlp.up_proj.weight")[1], 7.25f);
}

// ---- malformed single files: each names the file and the field or tensor ----

class BadSafetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_dir(std::string("st-bad-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    file_ = dir_ + "/model.safetensors";
  }
  // Writes `header` and `data_bytes` bytes of data, then expects open() to fail naming all of `parts`.
  void expect_bad(const std::string& header, size_t data_bytes, std::initializer_list<std::string> parts) {
    write_raw(file_, header, std::vector<char>(data_bytes, 1));
    std::vector<std::string> all(parts);
    all.push_back("model.safetensors");
    expect_user_error([&] { Checkpoint::open(dir_); }, all);
  }
  std::string dir_, file_;
};

TEST_F(BadSafetensors, FileShorterThan8Bytes) {
  std::ofstream(file_, std::ios::binary) << "abc";
  expect_user_error([&] { Checkpoint::open(file_); }, {"model.safetensors", "3 bytes", "8-byte header length"});
}

TEST_F(BadSafetensors, HeaderLengthPastEndOfFile) {
  std::ofstream out(file_, std::ios::binary);
  const uint64_t n = 1000;
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << "{}";
  out.close();
  expect_user_error([&] { Checkpoint::open(file_); }, {"model.safetensors", "header length 1000", "past the end"});
}

TEST_F(BadSafetensors, HeaderLengthAbsurd) {
  std::ofstream out(file_, std::ios::binary);
  const uint64_t n = 0x7fff'ffff'ffff'ffffull;
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << "{}";
  out.close();
  expect_user_error([&] { Checkpoint::open(file_); }, {"model.safetensors", "header length", "absurd"});
}

TEST_F(BadSafetensors, HeaderNotJson) { expect_bad("{\"w\": {\"dtype\": \"F32\",", 0, {"header", "not valid JSON"}); }

TEST_F(BadSafetensors, HeaderNotObject) { expect_bad("[1, 2, 3]", 0, {"header", "array", "expected an object"}); }

TEST_F(BadSafetensors, EntryMissingDtype) {
  expect_bad(R"({"layer.w": {"shape": [2], "data_offsets": [0, 8]}})", 8, {"layer.w", "dtype", "missing"});
}

TEST_F(BadSafetensors, EntryMissingShape) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "data_offsets": [0, 8]}})", 8, {"layer.w", "shape", "missing"});
}

TEST_F(BadSafetensors, EntryMissingDataOffsets) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2]}})", 8, {"layer.w", "data_offsets", "missing"});
}

TEST_F(BadSafetensors, EntryNotObject) { expect_bad(R"({"layer.w": "F32"})", 0, {"layer.w", "expected an object"}); }

TEST_F(BadSafetensors, UnknownDtype) {
  expect_bad(R"({"layer.w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}})", 8,
             {"layer.w", "dtype \"F33\"", "unknown", "F32", "BF16", "F16"});
}

TEST_F(BadSafetensors, NegativeShape) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}})", 8,
             {"layer.w", "shape", "dimension 1", "-1", "non-negative integer"});
}

TEST_F(BadSafetensors, NonIntegerShape) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", 8,
             {"layer.w", "shape", "2.5", "non-negative integer"});
}

TEST_F(BadSafetensors, ShapeNotArray) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}})", 16, {"layer.w", "shape"});
}

TEST_F(BadSafetensors, OffsetsNotAPair) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8,
             {"layer.w", "data_offsets", "[begin, end]"});
}

TEST_F(BadSafetensors, NegativeOffset) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", 8,
             {"layer.w", "data_offsets", "non-negative"});
}

TEST_F(BadSafetensors, OffsetsPastDataRegion) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 12,
             {"layer.w", "data_offsets [0, 16]", "past the data region", "12 bytes"});
}

TEST_F(BadSafetensors, BeginAfterEnd) {
  expect_bad(R"({"layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 8]}})", 16,
             {"layer.w", "data_offsets [16, 8]", "begin > end"});
}

TEST_F(BadSafetensors, OverlappingTensors) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b.w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
             24, {"b.w", "a.w", "overlap"});
}

TEST_F(BadSafetensors, SpanDoesNotMatchShape) {
  expect_bad(R"({"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [172, 64], "data_offsets": [0, 100]}})",
             100,
             {"model.layers.0.mlp.up_proj.weight", "data_offsets [0, 100] span 100 bytes", "shape [172, 64] x F32",
              "needs 44032"});
}

TEST_F(BadSafetensors, ShapeOverflowIsCaught) {
  expect_bad(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4], "data_offsets": [0, 0]}})", 0,
             {"w", "more than 2^64"});
}

TEST_F(BadSafetensors, DuplicateTensorName) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "a.w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}})",
             24, {"header", "\"a.w\"", "twice"});
}

TEST_F(BadSafetensors, DuplicateKeyInsideAnEntry) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [4], "dtype": "F16", "data_offsets": [0, 16]}})", 16,
             {"\"dtype\"", "twice"});
}

TEST_F(BadSafetensors, HoleBetweenTensors) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b.w": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
             20, {"b.w", "bytes [8, 12)", "holes"});
}

TEST_F(BadSafetensors, HoleBeforeFirstTensor) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12, {"a.w", "bytes [0, 4)"});
}

TEST_F(BadSafetensors, TrailingBytes) {
  expect_bad(R"({"a.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 11,
             {"3 bytes after the last tensor", "a.w ends at 8", "trailing"});
}

TEST_F(BadSafetensors, UnorderedEntriesAreFine) {
  // the header's order is not the data's: only the covering matters (an empty tensor may sit anywhere in order)
  write_raw(file_, R"({"b.w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                       "e.w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                       "a.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
            std::vector<char>(8, 0));
  const Checkpoint ck = Checkpoint::open(file_);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a.w", "b.w", "e.w"}));
}

// Non-finite values: read_f32, read_u16 and require_finite name the tensor and the first bad element.
TEST_F(BadSafetensors, NonFiniteValuesAreNamedWithTheirIndex) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> f32 = {1, 2, 3, 4, 5, std::nanf(""), 7, -inf};  // [2, 4]: first bad at [1, 1]
  std::vector<uint16_t> bf16 = {float_to_bf16(1.0f), float_to_bf16(-inf), float_to_bf16(2.0f)};
  std::vector<uint16_t> f16 = {float_to_fp16(1.0f), float_to_fp16(2.0f), float_to_fp16(1e6f)};  // 1e6 -> inf
  std::vector<std::byte> b16(6), h16(6);
  std::memcpy(b16.data(), bf16.data(), 6);
  std::memcpy(h16.data(), f16.data(), 6);
  write_safetensors(file_, {{"w.f32", DType::kF32, {2, 4}, f32_bytes(f32)},
                            {"w.bf16", DType::kBF16, {3}, b16},
                            {"w.f16", DType::kF16, {3}, h16},
                            {"ok", DType::kF32, {2}, f32_bytes({1, 2})}});
  const Checkpoint ck = Checkpoint::open(file_);
  EXPECT_EQ(ck.read_f32("ok"), (std::vector<float>{1, 2}));
  expect_user_error([&] { ck.read_f32("w.f32"); }, {file_, "tensor w.f32", "element [1, 1] is nan", "finite"});
  expect_user_error([&] { ck.require_finite("w.f32"); }, {"tensor w.f32", "element [1, 1] is nan"});
  expect_user_error([&] { ck.read_u16("w.bf16"); }, {"tensor w.bf16", "element [1] is -inf"});
  expect_user_error([&] { ck.read_f32("w.bf16"); }, {"tensor w.bf16", "element [1] is -inf"});
  expect_user_error([&] { ck.read_u16("w.f16"); }, {"tensor w.f16", "element [2] is inf"});
}

TEST_F(BadSafetensors, MetadataValueNotAString) {
  expect_bad(R"({"__metadata__": {"format": 3}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 4,
             {"__metadata__", "format", "expected a string"});
}

TEST_F(BadSafetensors, MetadataIsAllowed) {
  write_raw(file_,
            R"({"__metadata__": {"format": "pt"}, "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})",
            {'\x80', '\x3f', '\x00', '\xc0'});
  const Checkpoint ck = Checkpoint::open(file_);
  EXPECT_EQ(ck.names(), std::vector<std::string>{"w"});
  EXPECT_EQ(ck.read_f32("w"), (std::vector<float>{1.0f, -2.0f}));
}

// ---- directories and indexes ----

TEST(SafetensorsOpen, MissingPath) {
  expect_user_error([] { Checkpoint::open("/nonexistent/pipequant/ckpt"); },
                    {"/nonexistent/pipequant/ckpt", "no such"});
}

TEST(SafetensorsOpen, DirectoryWithoutSafetensors) {
  const std::string dir = scratch_dir("st-empty-dir");
  expect_user_error([&] { Checkpoint::open(dir); }, {dir, "model.safetensors.index.json", "*.safetensors"});
}

TEST(SafetensorsOpen, TwoFilesWithoutIndex) {
  const std::string dir = scratch_dir("st-two-files");
  write_safetensors(dir + "/a.safetensors", {f32_tensor("x", {2}, 0.0f)});
  write_safetensors(dir + "/b.safetensors", {f32_tensor("y", {2}, 0.0f)});
  expect_user_error([&] { Checkpoint::open(dir); }, {dir, "a.safetensors", "b.safetensors", "index.json"});
}

class BadIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = scratch_dir(std::string("st-badidx-") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    write_safetensors(dir_ + "/part1.safetensors", {f32_tensor("model.norm.weight", {3}, 1.0f)});
  }
  void write_index(const std::string& text) { std::ofstream(dir_ + "/model.safetensors.index.json") << text; }
  std::string dir_;
};

TEST_F(BadIndex, MissingWeightMap) {
  write_index(R"({"metadata": {"total_size": 12}})");
  expect_user_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "weight_map", "missing"});
}

TEST_F(BadIndex, WeightMapNotObject) {
  write_index(R"({"weight_map": ["part1.safetensors"]})");
  expect_user_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "weight_map", "object"});
}

TEST_F(BadIndex, NotJson) {
  write_index("{\"weight_map\": ");
  expect_user_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "not valid JSON"});
}

TEST_F(BadIndex, TensorListedTwice) {
  write_index(
      R"({"weight_map": {"model.norm.weight": "part1.safetensors", "model.norm.weight": "part2.safetensors"}})");
  expect_user_error([&] { Checkpoint::open(dir_); }, {"model.safetensors.index.json", "model.norm.weight", "twice"});
}

TEST_F(BadIndex, TensorNotInItsFile) {
  write_index(R"({"weight_map": {"model.norm.weight": "part1.safetensors", "lm_head.weight": "part1.safetensors"}})");
  expect_user_error([&] { Checkpoint::open(dir_); },
                    {"model.safetensors.index.json", "lm_head.weight", "part1.safetensors", "no such tensor"});
}

TEST_F(BadIndex, ShardFileMissing) {
  write_index(R"({"weight_map": {"model.norm.weight": "part1.safetensors", "lm_head.weight": "part2.safetensors"}})");
  expect_user_error([&] { Checkpoint::open(dir_); },
                    {"model.safetensors.index.json", "lm_head.weight", "part2.safetensors", "does not exist"});
}

TEST_F(BadIndex, BadShardIsNamed) {
  write_raw(dir_ + "/part2.safetensors",
            R"({"lm_head.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", std::vector<char>(8));
  write_index(R"({"weight_map": {"model.norm.weight": "part1.safetensors", "lm_head.weight": "part2.safetensors"}})");
  expect_user_error([&] { Checkpoint::open(dir_); },
                    {"part2.safetensors", "lm_head.weight", "span 8 bytes", "needs 12"});
}

}  // namespace
}  // namespace pipequant::io
