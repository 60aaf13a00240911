// Bit-stream packing of b-bit codes into int32 words (io/bitstream.hpp).
#include "io/bitstream.hpp"

#include "base/error.hpp"

namespace pipequant::io {

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

// int32 and uint32 may alias each other, so the stored words are read and written as uint32.
uint32_t* as_words(std::vector<int32_t>& v) { return reinterpret_cast<uint32_t*>(v.data()); }
const uint32_t* as_words(const int32_t* p) { return reinterpret_cast<const uint32_t*>(p); }

void check_code(uint32_t code, uint32_t mask) {
  PQ_ASSERT(code <= mask, "packing: code ", code, " does not fit in the bit width (max ", mask, ")");
}

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

int64_t stream_words(int64_t codes, int bits) {
  return with_stream(bits, [codes](auto s) { return decltype(s)::words(codes); });
}

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

}  // namespace pipequant::io
