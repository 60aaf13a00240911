#pragma once
// Bit streams of b-bit codes in int32 words, lowest bits first: code i occupies bits [i*b, (i+1)*b) of its stream
// and straddles two words when 32 % b != 0 (3-bit). This is GPTQ's qweight/qzeros packing; the internal packed
// layout (src/pack.cpp, docs/design.md section 5) and the Hugging Face GPTQ layout (io/hf_quant.hpp) both use it.

#include <cstdint>
#include <vector>

namespace pipequant::io {

// Words of one stream of `codes` codes of `bits` bits: ceil(codes * bits / 32). Asserts bits is 2, 3, 4 or 8.
int64_t stream_words(int64_t codes, int bits);

// Along K: codes [k][n] -> words [ceil(k*bits/32)][n], one stream per column.
std::vector<int32_t> pack_columns(const uint8_t* codes_kn, int64_t k, int64_t n, int bits);
// The same words from codes [n][k] (a QuantizedLinear's q): pack_columns of their transpose, without making it.
std::vector<int32_t> pack_columns_of_rows(const uint8_t* codes_nk, int64_t k, int64_t n, int bits);
// words [ceil(k*bits/32)][n] -> codes [k][n]
std::vector<uint8_t> unpack_columns(const int32_t* words, int64_t k, int64_t n, int bits);
// Along N: codes [g][n] -> words [g][ceil(n*bits/32)], one stream per row.
std::vector<int32_t> pack_rows(const uint8_t* codes_gn, int64_t g, int64_t n, int bits);
// words [g][ceil(n*bits/32)] -> codes [g][n]
std::vector<uint8_t> unpack_rows(const int32_t* words, int64_t g, int64_t n, int bits);

}  // namespace pipequant::io
