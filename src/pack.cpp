// The packed GPTQ layout of a quantized linear (docs/design.md section 5) and its exact inverse.
//   qweight int32 [ceil(K*bits/32), N]  codes packed along K, one bit stream per output column
//   qzeros  int32 [G, ceil(N*bits/32)]  the real zero points (no -1 offset), one bit stream per group
//   scales  fp16  [G, N]
//   g_idx   int32 [K]
#include <cstdint>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "src/quant.hpp"

namespace pipequant {

namespace {

inline constexpr int64_t kWordBits = 32;

// A stream of Bits-bit codes in 32-bit words, lowest bits first: code i occupies bits [i*Bits, (i+1)*Bits) of
// the stream and straddles two words when 32 % Bits != 0 (3-bit). Word w of a stream lives at
// words[w * stride], so one type serves streams along K (stride N) and along N (stride 1).
template <int Bits>
struct CodeStream {
  static_assert(Bits >= 1 && Bits <= 8, "codes are held in uint8_t");
  static constexpr uint32_t kMask = (1u << Bits) - 1u;

  static constexpr int64_t words(int64_t codes) { return (codes * Bits + kWordBits - 1) / kWordBits; }

  // words must start zeroed; code <= kMask
  static void put(uint32_t* words, int64_t stride, int64_t i, uint32_t code) {
    const int64_t bit = i * Bits;
    const int64_t w = bit / kWordBits;
    const int off = static_cast<int>(bit % kWordBits);
    words[w * stride] |= code << off;
    if (off + Bits > kWordBits) words[(w + 1) * stride] |= code >> (kWordBits - off);
  }

  static uint32_t get(const uint32_t* words, int64_t stride, int64_t i) {
    const int64_t bit = i * Bits;
    const int64_t w = bit / kWordBits;
    const int off = static_cast<int>(bit % kWordBits);
    uint32_t v = words[w * stride] >> off;
    if (off + Bits > kWordBits) v |= words[(w + 1) * stride] << (kWordBits - off);
    return v & kMask;
  }
};
static_assert(CodeStream<2>::words(16) == 1 && CodeStream<2>::words(17) == 2);
static_assert(CodeStream<3>::words(32) == 3 && CodeStream<3>::words(11) == 2 && CodeStream<3>::words(10) == 1);
static_assert(CodeStream<4>::words(8) == 1 && CodeStream<4>::words(9) == 2);
static_assert(CodeStream<8>::words(4) == 1 && CodeStream<8>::words(5) == 2);
static_assert(sizeof(int32_t) == sizeof(uint32_t), "words are stored as int32 and handled as uint32");

// Calls f(CodeStream<bits>{}) for the supported widths.
template <typename F>
decltype(auto) with_stream(int bits, F&& f) {
  switch (bits) {
    case 2:
      return f(CodeStream<2>{});
    case 3:
      return f(CodeStream<3>{});
    case 4:
      return f(CodeStream<4>{});
    case 8:
      return f(CodeStream<8>{});
    default:
      fail("packing: bits must be 2, 3, 4 or 8, got ", bits);
  }
}

int64_t stream_words(int64_t codes, int bits) {
  return with_stream(bits, [codes](auto s) { return decltype(s)::words(codes); });
}

// int32 and uint32 may alias each other, so the stored words are read and written as uint32.
uint32_t* as_words(std::vector<int32_t>& v) { return reinterpret_cast<uint32_t*>(v.data()); }
const uint32_t* as_words(const int32_t* p) { return reinterpret_cast<const uint32_t*>(p); }

void check_code(uint32_t code, uint32_t mask) {
  PQ_ASSERT(code <= mask, "packing: code ", code, " does not fit in the bit width (max ", mask, ")");
}

}  // namespace

namespace {

// The column streams of k x n codes, code (i, c) at codes[i * step_i + c * step_c]: each column's stream is its own
// words, so columns go to the threads in blocks of 64.
std::vector<int32_t> pack_column_streams(const uint8_t* codes, int64_t k, int64_t n, int64_t step_i, int64_t step_c,
                                         int bits) {
  PQ_ASSERT(k > 0 && n > 0, "pack_columns: k ", k, " n ", n);
  std::vector<int32_t> words(static_cast<size_t>(stream_words(k, bits) * n), 0);
  uint32_t* out = as_words(words);
  with_stream(bits, [&](auto s) {
    using S = decltype(s);
#pragma omp parallel for schedule(static, 64) if (n * k > (int64_t{1} << 20))
    for (int64_t c = 0; c < n; ++c)
      for (int64_t i = 0; i < k; ++i) {
        const uint32_t code = codes[i * step_i + c * step_c];
        check_code(code, S::kMask);
        S::put(out + c, n, i, code);
      }
  });
  return words;
}

}  // namespace

std::vector<int32_t> pack_columns(const uint8_t* codes_kn, int64_t k, int64_t n, int bits) {
  return pack_column_streams(codes_kn, k, n, n, 1, bits);
}

std::vector<int32_t> pack_columns_of_rows(const uint8_t* codes_nk, int64_t k, int64_t n, int bits) {
  return pack_column_streams(codes_nk, k, n, 1, k, bits);
}

std::vector<uint8_t> unpack_columns(const int32_t* words, int64_t k, int64_t n, int bits) {
  PQ_ASSERT(k > 0 && n > 0, "unpack_columns: k ", k, " n ", n);
  std::vector<uint8_t> codes(static_cast<size_t>(k * n));
  const uint32_t* in = as_words(words);
  with_stream(bits, [&](auto s) {
    using S = decltype(s);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < n; ++c)
        codes[static_cast<size_t>(i * n + c)] = static_cast<uint8_t>(S::get(in + c, n, i));
  });
  return codes;
}

std::vector<int32_t> pack_rows(const uint8_t* codes_gn, int64_t g, int64_t n, int bits) {
  PQ_ASSERT(g > 0 && n > 0, "pack_rows: g ", g, " n ", n);
  const int64_t row_words = stream_words(n, bits);
  std::vector<int32_t> words(static_cast<size_t>(g * row_words), 0);
  uint32_t* out = as_words(words);
  with_stream(bits, [&](auto s) {
    using S = decltype(s);
    for (int64_t r = 0; r < g; ++r)
      for (int64_t c = 0; c < n; ++c) {
        const uint32_t code = codes_gn[r * n + c];
        check_code(code, S::kMask);
        S::put(out + r * row_words, 1, c, code);
      }
  });
  return words;
}

std::vector<uint8_t> unpack_rows(const int32_t* words, int64_t g, int64_t n, int bits) {
  PQ_ASSERT(g > 0 && n > 0, "unpack_rows: g ", g, " n ", n);
  const int64_t row_words = stream_words(n, bits);
  std::vector<uint8_t> codes(static_cast<size_t>(g * n));
  const uint32_t* in = as_words(words);
  with_stream(bits, [&](auto s) {
    using S = decltype(s);
    for (int64_t r = 0; r < g; ++r)
      for (int64_t c = 0; c < n; ++c)
        codes[static_cast<size_t>(r * n + c)] = static_cast<uint8_t>(S::get(in + r * row_words, 1, c));
  });
  return codes;
}

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
  for (size_t i = 0; i < ql.scales.size(); ++i) p.scales[i] = float_to_fp16(ql.scales[i]);
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
  const int64_t qweight_words = stream_words(k, p.bits) * n;
  const int64_t qzeros_words = g * stream_words(n, p.bits);
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
