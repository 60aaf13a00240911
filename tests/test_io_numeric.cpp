// fp16 / bf16 conversions (base/numeric.hpp) against known bit patterns, rounding, and exhaustive round trips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "base/numeric.hpp"

namespace pipequant {
namespace {

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

TEST(Fp16, KnownValues) {
  EXPECT_EQ(fp16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(fp16_to_float(0xbc00), -1.0f);
  EXPECT_EQ(fp16_to_float(0x4000), 2.0f);
  EXPECT_EQ(fp16_to_float(0x3555), 0x1.554p-2f);   // nearest fp16 to 1/3
  EXPECT_EQ(fp16_to_float(0x7bff), 65504.0f);      // largest finite
  EXPECT_EQ(fp16_to_float(0x0400), 0x1.0p-14f);    // smallest normal
  EXPECT_EQ(fp16_to_float(0x0001), 0x1.0p-24f);    // smallest subnormal
  EXPECT_EQ(fp16_to_float(0x03ff), 0x1.ff8p-15f);  // largest subnormal = 1023 * 2^-24
  EXPECT_EQ(fp16_to_float(0x8001), -0x1.0p-24f);
  EXPECT_EQ(bits_of(fp16_to_float(0x0000)), 0x00000000u);
  EXPECT_EQ(bits_of(fp16_to_float(0x8000)), 0x80000000u);  // -0 keeps its sign
  EXPECT_EQ(fp16_to_float(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(fp16_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(fp16_to_float(0x7e00)));
  EXPECT_TRUE(std::isnan(fp16_to_float(0x7c01)));
}

TEST(Fp16, FromFloatKnownValues) {
  EXPECT_EQ(float_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_fp16(0x1.0p-14f), 0x0400);
  EXPECT_EQ(float_to_fp16(0x1.0p-24f), 0x0001);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_fp16(1e6f), 0x7c00);  // overflow -> inf
  EXPECT_EQ(float_to_fp16(-1e6f), 0xfc00);
  EXPECT_EQ(float_to_fp16(1e-10f), 0x0000);  // underflow -> 0
  const uint16_t nan = float_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
}

TEST(Fp16, RoundToNearestEven) {
  // halfway between 1 (0x3c00, even) and 1 + 2^-10 (0x3c01): to even
  EXPECT_EQ(float_to_fp16(1.0f + 0x1.0p-11f), 0x3c00);
  // halfway between 0x3c01 (odd) and 0x3c02: up to even
  EXPECT_EQ(float_to_fp16(1.0f + 3 * 0x1.0p-11f), 0x3c02);
  // just above halfway rounds up
  EXPECT_EQ(float_to_fp16(1.0f + 0x1.0p-11f + 0x1.0p-20f), 0x3c01);
  // 65519 is below the halfway point 65520 to the next (unrepresentable) step: stays finite
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);
  // subnormals: 2^-25 is halfway between 0 and 0x0001 -> 0 (even); 3 * 2^-25 -> 0x0002 (even)
  EXPECT_EQ(float_to_fp16(0x1.0p-25f), 0x0000);
  EXPECT_EQ(float_to_fp16(3 * 0x1.0p-25f), 0x0002);
  EXPECT_EQ(float_to_fp16(0x1.0p-25f + 0x1.0p-35f), 0x0001);
  // the largest subnormal plus half a step rounds up into the smallest normal
  EXPECT_EQ(float_to_fp16(0x1.ffcp-15f), 0x0400);
  EXPECT_EQ(round_to_fp16(0.1f), 0x1.998p-4f);
}

TEST(Fp16, EveryValueRoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = fp16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_fp16(f), h) << std::hex << "0x" << h;
  }
}

TEST(Bf16, KnownValues) {
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xbf80), -1.0f);
  EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
  EXPECT_EQ(bf16_to_float(0x7f7f), 0x1.fep127f);  // largest finite
  EXPECT_EQ(bf16_to_float(0x0001), 0x1.0p-133f);  // smallest subnormal
  EXPECT_EQ(bf16_to_float(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7fc0)));
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(3.14159265f), 0x4049);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
}

TEST(Bf16, RoundToNearestEven) {
  // halfway between 1 (0x3f80, even) and 1 + 2^-7: to even
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);
  // halfway between 0x3f81 (odd) and 0x3f82: up
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1.0p-8f + 0x1.0p-20f), 0x3f81);
  // the largest float rounds past the largest bf16 to infinity
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  // NaN stays NaN (a NaN with only low mantissa bits set must not become infinity)
  uint32_t low_nan = 0x7f800001u;
  float f;
  std::memcpy(&f, &low_nan, 4);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
}

TEST(Bf16, EveryValueRoundTrips) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), h) << std::hex << "0x" << h;
  }
}

}  // namespace
}  // namespace pipequant
