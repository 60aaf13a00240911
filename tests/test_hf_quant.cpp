// The Hugging Face GPTQ and AWQ layouts (io/hf_quant.hpp) against words packed by hand: every expected word below is
// written out as a literal, worked out from the layout's definition (bit i*bits of a column's stream, the AWQ nibble
// order), not produced by the code under test. Then round trips, and the quantization_config writer and parser.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "io/bitstream.hpp"
#include "io/hf_quant.hpp"
#include "tests/testdata.hpp"

namespace pipequant::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

int32_t word(uint32_t w) { return static_cast<int32_t>(w); }

using pipequant::testing::expect_user_error;

// ---------------------------------------------------------------------------------------------------------
// GPTQ qweight: one bit stream per output column along K, lowest bits first

TEST(HfGptqWeight, FourBitEightByTwo) {
  // codes [K=8][N=2]: column 0 is 1..8, column 1 is 15, 0, 9, 10, ..., 14
  const std::vector<uint8_t> codes_kn = {1, 15, 2, 0, 3, 9, 4, 10, 5, 11, 6, 12, 7, 13, 8, 14};
  const auto words = pack_columns(codes_kn.data(), 8, 2, 4);
  ASSERT_EQ(words.size(), 2u);             // qweight [1, 2]
  EXPECT_EQ(words[0], word(0x87654321u));  // k = 0 in the lowest nibble
  EXPECT_EQ(words[1], word(0xEDCBA90Fu));  // 15 first, then 0, then 9..14
  EXPECT_EQ(unpack_columns(words.data(), 8, 2, 4), codes_kn);
}

TEST(HfGptqWeight, ThreeBitThirtyTwoStraddlesTwoBoundaries) {
  // codes (7i + 3) % 8, except code 10 = 5 (bits 30-32: 0b01 ends word 0, 0b1 starts word 1) and code 21 = 3
  // (bits 63-65: 0b1 ends word 1, 0b01 starts word 2)
  const std::vector<uint8_t> codes = {3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 5, 0, 7, 6, 5, 4,
                                      3, 2, 1, 0, 7, 3, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4};
  const auto words = pack_columns(codes.data(), 32, 1, 3);
  ASSERT_EQ(words.size(), 3u);  // 96 bits
  EXPECT_EQ(words[0], word(0x53977053u));
  EXPECT_EQ(words[1], word(0xF0539771u));
  EXPECT_EQ(words[2], word(0x97705395u));
  EXPECT_EQ(words[0] >> 30 & 3, 1);                      // code 10's low bits
  EXPECT_EQ(words[1] & 1, 1);                            // code 10's high bit
  EXPECT_EQ(static_cast<uint32_t>(words[1]) >> 31, 1u);  // code 21's low bit
  EXPECT_EQ(words[2] & 3, 1);                            // code 21's high bits (0b01)
  EXPECT_EQ(unpack_columns(words.data(), 32, 1, 3), codes);
}

TEST(HfGptqWeight, TwoBitAndEightBit) {
  std::vector<uint8_t> two(16);
  for (int i = 0; i < 16; ++i) two[static_cast<size_t>(i)] = static_cast<uint8_t>(i % 4);
  const auto w2 = pack_columns(two.data(), 16, 1, 2);
  ASSERT_EQ(w2.size(), 1u);
  EXPECT_EQ(w2[0], word(0xE4E4E4E4u));  // 0,1,2,3 = 0b11100100 per byte
  EXPECT_EQ(unpack_columns(w2.data(), 16, 1, 2), two);

  // [K=4][N=2]: column 0 is 0x01, 0x80, 0xFF, 0x7F; column 1 is 0x10, 0x20, 0x30, 0x40
  const std::vector<uint8_t> eight = {0x01, 0x10, 0x80, 0x20, 0xFF, 0x30, 0x7F, 0x40};
  const auto w8 = pack_columns(eight.data(), 4, 2, 8);
  ASSERT_EQ(w8.size(), 2u);
  EXPECT_EQ(w8[0], word(0x7FFF8001u));
  EXPECT_EQ(w8[1], word(0x40302010u));
  EXPECT_EQ(unpack_columns(w8.data(), 4, 2, 8), eight);
}

TEST(HfGptqWeight, RaggedKTakesCeilRows) {
  // K = 20 at 4 bits: 80 bits, so ceil(80 / 32) = 3 rows; the last holds codes 16..19 and zero padding
  std::vector<uint8_t> codes(20);
  for (int i = 0; i < 20; ++i) codes[static_cast<size_t>(i)] = static_cast<uint8_t>((i + 1) % 16);
  const auto words = pack_columns(codes.data(), 20, 1, 4);
  ASSERT_EQ(words.size(), 3u);
  EXPECT_EQ(words[0], word(0x87654321u));
  EXPECT_EQ(words[1], word(0x0FEDCBA9u));
  EXPECT_EQ(words[2], word(0x00004321u));
  EXPECT_EQ(stream_words(20, 4), 3);
  EXPECT_EQ(unpack_columns(words.data(), 20, 1, 4), codes);
}

// ---------------------------------------------------------------------------------------------------------
// GPTQ qzeros: one bit stream per group along N; v1 stores zero - 1

TEST(HfGptqZeros, VersionOneStoresZeroMinusOne) {
  const std::vector<uint8_t> zeros = {1, 2, 3, 4, 5, 6, 7, 8};  // [G=1][N=8]
  const auto words = gptq_pack_zeros(zeros.data(), 1, 8, 4, HfQuantFormat::kGptq, "t");
  ASSERT_EQ(words.size(), 1u);
  EXPECT_EQ(words[0], word(0x76543210u));
  EXPECT_EQ(gptq_unpack_zeros(words.data(), 1, 8, 4, HfQuantFormat::kGptq),
            (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));

  // 2-bit zeros of 2 store 1 in every field: GPTQModel's v1 -> v2 conversion adds exactly this word back
  const std::vector<uint8_t> twos(16, 2);
  EXPECT_EQ(gptq_pack_zeros(twos.data(), 1, 16, 2, HfQuantFormat::kGptq, "t")[0], word(0x55555555u));

  // 3-bit, N = 11: 33 bits, two words per group; the last zero (5, stored 4 = 0b100) puts its high bit in word 1
  const std::vector<uint8_t> z3 = {1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 5};
  const auto w3 = gptq_pack_zeros(z3.data(), 1, 11, 3, HfQuantFormat::kGptq, "t");
  ASSERT_EQ(w3.size(), 2u);
  EXPECT_EQ(w3[0], word(0x111AC688u));
  EXPECT_EQ(w3[1], word(0x00000001u));
  const auto back = gptq_unpack_zeros(w3.data(), 1, 11, 3, HfQuantFormat::kGptq);
  EXPECT_EQ(back, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 5}));
}

TEST(HfGptqZeros, VersionOneReadsAllOnesAsTwoToTheBits) {
  // a stored 0xF reads as 16, as AutoGPTQ's and vLLM's v1 dequantization do ((word >> s) & 0xF) + 1
  const std::vector<int32_t> words = {word(0x0000000Fu)};
  EXPECT_EQ(gptq_unpack_zeros(words.data(), 1, 8, 4, HfQuantFormat::kGptq),
            (std::vector<int32_t>{16, 1, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(gptq_unpack_zeros(words.data(), 1, 8, 4, HfQuantFormat::kGptqV2),
            (std::vector<int32_t>{15, 0, 0, 0, 0, 0, 0, 0}));
}

TEST(HfGptqZeros, VersionOneRefusesZeroOfZero) {
  std::vector<uint8_t> zeros(16, 8);  // [G=2][N=8]
  zeros[8 + 3] = 0;                   // group 1, column 3
  EXPECT_FALSE(gptq_v1_can_hold(zeros.data(), 16));
  expect_user_error([&] { gptq_pack_zeros(zeros.data(), 2, 8, 4, HfQuantFormat::kGptq, "model.layers.0.mlp.up_proj"); },
                    {"model.layers.0.mlp.up_proj", "group 1, column 3", "gptq_v2"});
  zeros[11] = 1;
  EXPECT_TRUE(gptq_v1_can_hold(zeros.data(), 16));
}

TEST(HfGptqZeros, VersionTwoStoresZerosAsTheyAre) {
  const std::vector<uint8_t> zeros = {0, 1, 2, 3, 4, 5, 6, 7, 15, 14, 13, 12, 11, 10, 9, 8};  // [G=2][N=8]
  const auto words = gptq_pack_zeros(zeros.data(), 2, 8, 4, HfQuantFormat::kGptqV2, "t");
  ASSERT_EQ(words.size(), 2u);
  EXPECT_EQ(words[0], word(0x76543210u));
  EXPECT_EQ(words[1], word(0x89ABCDEFu));
  const auto back = gptq_unpack_zeros(words.data(), 2, 8, 4, HfQuantFormat::kGptqV2);
  EXPECT_EQ(back, std::vector<int32_t>(zeros.begin(), zeros.end()));

  const std::vector<uint8_t> z3 = {1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 5};  // 3-bit, stored as they are
  const auto w3 = gptq_pack_zeros(z3.data(), 1, 11, 3, HfQuantFormat::kGptqV2, "t");
  ASSERT_EQ(w3.size(), 2u);
  EXPECT_EQ(w3[0], word(0x5A3F58D1u));
  EXPECT_EQ(w3[1], word(0x00000001u));
}

TEST(HfGptqZeros, RoundTripsEveryWidth) {
  std::mt19937 rng(11);
  for (int bits : {2, 3, 4, 8}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    const int64_t g = 3, n = 37;
    std::uniform_int_distribution<int> dist(1, (1 << bits) - 1);  // v1 holds 1..2^bits - 1
    std::vector<uint8_t> zeros(static_cast<size_t>(g * n));
    for (auto& z : zeros) z = static_cast<uint8_t>(dist(rng));
    for (auto format : {HfQuantFormat::kGptq, HfQuantFormat::kGptqV2}) {
      const auto words = gptq_pack_zeros(zeros.data(), g, n, bits, format, "t");
      EXPECT_EQ(static_cast<int64_t>(words.size()), g * ((n * bits + 31) / 32));
      EXPECT_EQ(gptq_unpack_zeros(words.data(), g, n, bits, format), std::vector<int32_t>(zeros.begin(), zeros.end()));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// AWQ: 8 nibbles per word along N, columns in the order 0, 2, 4, 6, 1, 3, 5, 7

TEST(HfAwq, PacksEightColumnsInAwqOrder) {
  const std::vector<uint8_t> row = {1, 2, 3, 4, 5, 6, 7, 8};
  const auto words = awq_pack(row.data(), 1, 8);
  ASSERT_EQ(words.size(), 1u);
  // nibbles from the lowest: columns 0, 2, 4, 6, 1, 3, 5, 7 = 1, 3, 5, 7, 2, 4, 6, 8
  EXPECT_EQ(words[0], word(0x86427531u));
  EXPECT_EQ(awq_unpack(words.data(), 1, 8), row);
}

TEST(HfAwq, PacksTwoRowsOfSixteen) {
  // [2][16]
  const std::vector<uint8_t> codes = {1,  2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0,   // row 0
                                      15, 0, 0, 0, 0, 0, 0, 1, 0, 6,  0,  0,  0,  0,  0,  0};  // row 1
  const auto words = awq_pack(codes.data(), 2, 16);
  ASSERT_EQ(words.size(), 4u);  // [2][2]
  EXPECT_EQ(words[0], word(0x86427531u));
  EXPECT_EQ(words[1], word(0x0ECAFDB9u));  // 9, 11, 13, 15, 10, 12, 14, 0
  EXPECT_EQ(words[2], word(0x1000000Fu));  // column 0 in nibble 0, column 7 in nibble 7
  EXPECT_EQ(words[3], word(0x00060000u));  // column 9 (8 + 1) in nibble 4
  EXPECT_EQ(awq_unpack(words.data(), 2, 16), codes);
}

TEST(HfAwq, RoundTripAndRefusals) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> dist(0, 15);
  std::vector<uint8_t> codes(5 * 24);
  for (auto& c : codes) c = static_cast<uint8_t>(dist(rng));
  EXPECT_EQ(awq_unpack(awq_pack(codes.data(), 5, 24).data(), 5, 24), codes);

  expect_user_error([&] { awq_pack(codes.data(), 1, 12); }, {"multiple of 8"});
  std::vector<uint8_t> big(8, 1);
  big[5] = 16;
  expect_user_error([&] { awq_pack(big.data(), 1, 8); }, {"code 16", "(0, 5)"});
}

// ---------------------------------------------------------------------------------------------------------
// quantization_config

TEST(HfQuantConfigJson, GptqFields) {
  HfQuantConfig c;
  c.format = HfQuantFormat::kGptqV2;
  c.bits = 3;
  c.group_size = 64;
  c.desc_act = true;
  c.sym = false;
  const json j = quantization_config_json(c, "pipequant 0.1.0");
  const json want = {{"quant_method", "gptq"},
                     {"bits", 3},
                     {"group_size", 64},
                     {"desc_act", true},
                     {"sym", false},
                     {"static_groups", false},
                     {"checkpoint_format", "gptq_v2"},
                     {"true_sequential", true},
                     {"lm_head", false},
                     {"meta", {{"quantizer", {"pipequant 0.1.0"}}}}};
  EXPECT_EQ(j, want);
  EXPECT_FALSE(j.contains("damp_percent"));
  c.damp_percent = 0.01;
  EXPECT_EQ(quantization_config_json(c, "p")["damp_percent"], 0.01);
  c.format = HfQuantFormat::kGptq;
  EXPECT_EQ(quantization_config_json(c, "p")["checkpoint_format"], "gptq");
}

TEST(HfQuantConfigJson, AwqFields) {
  HfQuantConfig c;
  c.format = HfQuantFormat::kAwq;
  c.group_size = 128;
  const json want = {{"quant_method", "awq"}, {"bits", 4},         {"group_size", 128},
                     {"zero_point", true},    {"version", "gemm"}, {"modules_to_not_convert", nullptr}};
  EXPECT_EQ(quantization_config_json(c, "p"), want);
}

void expect_same(const HfQuantConfig& a, const HfQuantConfig& b) {
  EXPECT_EQ(a.format, b.format);
  EXPECT_EQ(a.bits, b.bits);
  EXPECT_EQ(a.group_size, b.group_size);
  EXPECT_EQ(a.desc_act, b.desc_act);
  EXPECT_EQ(a.sym, b.sym);
  EXPECT_EQ(a.static_groups, b.static_groups);
  EXPECT_EQ(a.zero_point, b.zero_point);
  EXPECT_EQ(a.damp_percent, b.damp_percent);
}

TEST(HfQuantConfigJson, RoundTrips) {
  std::vector<HfQuantConfig> configs;
  for (auto format : {HfQuantFormat::kGptq, HfQuantFormat::kGptqV2})
    for (int bits : {2, 3, 4, 8}) {
      HfQuantConfig c;
      c.format = format;
      c.bits = bits;
      c.group_size = bits == 3 ? -1 : 32;
      c.desc_act = bits == 4;
      c.sym = bits == 8;
      c.static_groups = bits == 2;
      if (bits == 2) c.damp_percent = 0.1;
      configs.push_back(c);
    }
  HfQuantConfig awq;
  awq.format = HfQuantFormat::kAwq;
  awq.group_size = 64;
  awq.sym = false;
  configs.push_back(awq);
  for (const auto& c : configs) {
    SCOPED_TRACE(std::string(name(c.format)) + " bits " + std::to_string(c.bits));
    const auto back = parse_quantization_config(quantization_config_json(c, "p"), "t");
    ASSERT_TRUE(back.has_value());
    expect_same(*back, c);
  }
}

TEST(HfQuantConfigJson, ReadsTheOtherSpellings) {
  // AutoAWQ's quant_config.json
  const auto awq = parse_quantization_config(
      json{{"zero_point", true}, {"q_group_size", 128}, {"w_bit", 4}, {"version", "GEMM"}}, "quant_config.json");
  ASSERT_TRUE(awq.has_value());
  EXPECT_EQ(awq->format, HfQuantFormat::kAwq);
  EXPECT_EQ(awq->bits, 4);
  EXPECT_EQ(awq->group_size, 128);
  // an older AutoGPTQ quantize_config.json: no quant_method, no checkpoint_format (v1)
  const auto old = parse_quantization_config(json{{"bits", 4},
                                                  {"group_size", 128},
                                                  {"damp_percent", 0.01},
                                                  {"desc_act", true},
                                                  {"sym", true},
                                                  {"true_sequential", true},
                                                  {"model_name_or_path", nullptr},
                                                  {"model_file_base_name", "model"}},
                                             "quantize_config.json");
  ASSERT_TRUE(old.has_value());
  EXPECT_EQ(old->format, HfQuantFormat::kGptq);
  EXPECT_TRUE(old->desc_act);
  EXPECT_EQ(old->damp_percent, 0.01);
  // GPTQModel's "format" spelling
  const auto gm = parse_quantization_config(
      json{{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 32}, {"format", "gptq_v2"}}, "q");
  ASSERT_TRUE(gm.has_value());
  EXPECT_EQ(gm->format, HfQuantFormat::kGptqV2);
  // not GPTQ or AWQ
  EXPECT_FALSE(parse_quantization_config(json{{"quant_method", "fp8"}}, "c").has_value());
  EXPECT_FALSE(parse_quantization_config(json::object(), "c").has_value());
}

TEST(HfQuantConfigJson, RefusesMalformedValues) {
  const json gptq = {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}};
  auto with = [](json j, const char* key, json v) {
    j[key] = std::move(v);
    return j;
  };
  struct Case {
    json j;
    std::string field;
  };
  const std::vector<Case> cases = {
      {with(gptq, "bits", 5), "field bits"},
      {with(gptq, "bits", "4"), "field bits"},
      {with(gptq, "group_size", 0), "field group_size"},
      {json{{"quant_method", "gptq"}, {"bits", 4}}, "field group_size"},
      {with(gptq, "desc_act", "yes"), "field desc_act"},
      {with(gptq, "checkpoint_format", "marlin"), "field checkpoint_format"},
      {with(gptq, "lm_head", true), "field lm_head"},
      {json{{"quant_method", "awq"}, {"bits", 3}, {"group_size", 128}}, "field bits"},
      {json{{"w_bit", 8}, {"q_group_size", 128}}, "field w_bit"},
      {json{{"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}, {"version", "gemv"}}, "field version"},
      {json{{"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}, {"zero_point", false}}, "field zero_point"},
      {json{{"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}, {"modules_to_not_convert", {"lm_head"}}},
       "field modules_to_not_convert"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.j.dump());
    expect_user_error([&] { parse_quantization_config(c.j, "dir/config.json: quantization_config"); },
                      {"dir/config.json: quantization_config", c.field});
  }
  expect_user_error([] { parse_quantization_config(json::array(), "x.json"); }, {"x.json", "object"});
}

class HfQuantConfigFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = pipequant::testing::scratch_dir(std::string("hf_quant_") +
                                           ::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write(const std::string& file, const json& j) { std::ofstream(dir_ / file) << j.dump(2); }
  fs::path dir_;
};

TEST_F(HfQuantConfigFiles, ConfigJsonFirst) {
  write("config.json", {{"model_type", "llama"},
                        {"quantization_config", {{"quant_method", "gptq"}, {"bits", 8}, {"group_size", 32}}}});
  write("quantize_config.json", {{"bits", 4}, {"group_size", 128}});
  const auto c = read_quantization_config(dir_.string());
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->bits, 8);
}

TEST_F(HfQuantConfigFiles, QuantizeConfigThenQuantConfig) {
  write("config.json", {{"model_type", "llama"}});
  EXPECT_FALSE(read_quantization_config(dir_.string()).has_value());
  write("quant_config.json", {{"zero_point", true}, {"q_group_size", 64}, {"w_bit", 4}, {"version", "GEMM"}});
  auto c = read_quantization_config(dir_.string());
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->format, HfQuantFormat::kAwq);
  EXPECT_EQ(c->group_size, 64);
  write("quantize_config.json", {{"bits", 2}, {"group_size", 16}, {"checkpoint_format", "gptq_v2"}});
  c = read_quantization_config(dir_.string());
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->format, HfQuantFormat::kGptqV2);
  EXPECT_EQ(c->bits, 2);
}

TEST_F(HfQuantConfigFiles, RefusesOtherMethodsAndBadFiles) {
  write("config.json", {{"quantization_config", {{"quant_method", "bitsandbytes"}}}});
  expect_user_error([&] { read_quantization_config(dir_.string()); }, {"config.json", "quant_method", "bitsandbytes"});
  write("config.json", {{"quantization_config", {{"quant_method", "gptq"}, {"bits", 6}, {"group_size", 128}}}});
  expect_user_error([&] { read_quantization_config(dir_.string()); }, {"config.json: quantization_config", "bits"});
  std::ofstream(dir_ / "config.json") << "{ not json";
  expect_user_error([&] { read_quantization_config(dir_.string()); }, {"config.json", "not valid JSON"});
}

}  // namespace
}  // namespace pipequant::io
