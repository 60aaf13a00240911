// The packed GPTQ layout of a quantized linear (docs/design.md section 5) and its exact inverse.
//   qweight int32 [ceil(K*bits/32), N]  codes packed along K, one bit stream per output column
//   qzeros  int32 [G, ceil(N*bits/32)]  the real zero points (no -1 offset), one bit stream per group
//   scales  fp16  [G, N]
//   g_idx   int32 [K]
#include <cstdint>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "io/bitstream.hpp"
#include "src/quant.hpp"

namespace pipequant {

io::PackedLinear pack(const QuantizedLinear& ql, const std::string& module, const QuantConfig& config) {
  const int64_t k = ql.cols;
  const int64_t n = ql.rows;
  const int64_t g = ql.groups;
  PQ_ASSERT(k > 0 && n > 0 && g > 0, "pack: ", module, ": shape [", n, ", ", k, "] with ", g, " groups");
  PQ_ASSERT(static_cast<int64_t>(ql.q.size()) == n * k && static_cast<int64_t>(ql.g_idx.size()) == k &&
                static_cast<int64_t>(ql.scales.size()) == g * n && static_cast<int64_t>(ql.zeros.size()) == g * n,
            "pack: ", module, ": inconsistent sizes");
  io::PackedLinear p;
  p.module = module;
  p.in_features = k;
  p.out_features = n;
  p.groups = g;
  p.bits = ql.bits;
  p.group_size = config.group_size;
  p.sym = config.sym;
  p.act_order = config.act_order;
  p.static_groups = config.static_groups;
  p.damp = ql.damp_used;
  p.fallback = name(ql.fallback);
  p.relative_error = ql.relative_error;

  // qweight streams run along K: codes [N, K] packed as their transpose, without making it
  p.qweight = pack_columns_of_rows(ql.q.data(), k, n, ql.bits);

  std::vector<uint8_t> zero_codes(static_cast<size_t>(g * n));
  const float maxq = static_cast<float>((1 << ql.bits) - 1);
  for (size_t i = 0; i < zero_codes.size(); ++i) {
    const float z = ql.zeros[i];
    PQ_ASSERT(z >= 0.0f && z <= maxq && z == static_cast<float>(static_cast<int>(z)), "pack: ", module, ": zero point ",
              z, " is not an integer in [0, ", maxq, "]");
    zero_codes[i] = static_cast<uint8_t>(z);
  }
  p.qzeros = pack_rows(zero_codes.data(), g, n, ql.bits);

  p.scales.resize(ql.scales.size());
  for (size_t i = 0; i < ql.scales.size(); ++i) {
    p.scales[i] = float_to_fp16(ql.scales[i]);
    // a weight group too wide for an fp16 scale (range / maxq above 65504) has no packed form
    PQ_REQUIRE((p.scales[i] & 0x7c00u) != 0x7c00u, module, ": the scale of group ", static_cast<int64_t>(i) / n,
               ", row ", static_cast<int64_t>(i) % n, " is ", ql.scales[i],
               ", beyond what the fp16 scales of the format can hold (65504): the weights are too large");
  }
  p.g_idx = ql.g_idx;
  return p;
}

QuantizedLinear unpack(const io::PackedLinear& p) {
  const int64_t k = p.in_features;
  const int64_t n = p.out_features;
  const int64_t g = p.groups;
  const std::string where = "packed linear " + p.module;
  PQ_REQUIRE(p.bits == 2 || p.bits == 3 || p.bits == 4 || p.bits == 8, where, ": bits must be 2, 3, 4 or 8, got ",
             p.bits);
  PQ_REQUIRE(k > 0 && n > 0 && g > 0, where, ": shape [", n, ", ", k, "] with ", g, " groups is not valid");
  const int64_t qweight_words = io::stream_words(k, p.bits) * n;
  const int64_t qzeros_words = g * io::stream_words(n, p.bits);
  PQ_REQUIRE(static_cast<int64_t>(p.qweight.size()) == qweight_words, where, ": qweight has ", p.qweight.size(),
             " words, expected ", qweight_words, " (ceil(K*bits/32) x N)");
  PQ_REQUIRE(static_cast<int64_t>(p.qzeros.size()) == qzeros_words, where, ": qzeros has ", p.qzeros.size(),
             " words, expected ", qzeros_words, " (G x ceil(N*bits/32))");
  PQ_REQUIRE(static_cast<int64_t>(p.scales.size()) == g * n, where, ": scales has ", p.scales.size(),
             " values, expected ", g * n, " (G x N)");
  PQ_REQUIRE(static_cast<int64_t>(p.g_idx.size()) == k, where, ": g_idx has ", p.g_idx.size(), " values, expected ", k,
             " (K)");
  for (int64_t c = 0; c < k; ++c) {
    const int32_t gi = p.g_idx[static_cast<size_t>(c)];
    PQ_REQUIRE(gi >= 0 && gi < g, where, ": g_idx[", c, "] = ", gi, " is outside [0, ", g, ")");
  }

  QuantizedLinear ql;
  ql.rows = n;
  ql.cols = k;
  ql.groups = g;
  ql.bits = p.bits;
  ql.damp_used = p.damp;
  ql.fallback = fallback_from_name(p.fallback, where);
  ql.relative_error = p.relative_error;
  const std::vector<uint8_t> codes_kn = unpack_columns(p.qweight.data(), k, n, p.bits);
  ql.q.resize(static_cast<size_t>(n * k));
  for (int64_t c = 0; c < k; ++c)
    for (int64_t r = 0; r < n; ++r) ql.q[static_cast<size_t>(r * k + c)] = codes_kn[static_cast<size_t>(c * n + r)];
  const std::vector<uint8_t> zero_codes = unpack_rows(p.qzeros.data(), g, n, p.bits);
  ql.zeros.assign(zero_codes.begin(), zero_codes.end());
  ql.scales.resize(p.scales.size());
  for (size_t i = 0; i < p.scales.size(); ++i) ql.scales[i] = fp16_to_float(p.scales[i]);
  ql.g_idx = p.g_idx;
  return ql;
}

}  // namespace pipequant
