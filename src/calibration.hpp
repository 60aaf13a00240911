#pragma once
// Turning a token file into samples of seq_len tokens, validated against the model's vocabulary.

#include <cstdint>
#include <string>
#include <vector>

#include "io/npy.hpp"

namespace pipequant {

struct Samples {
  int64_t count = 0;
  int64_t seq = 0;
  std::vector<int32_t> tokens;  // [count, seq]
};

// Calibration: a 2-D file gives its first `nsamples` rows cut to seq (rows shorter than seq are an error); a 1-D
// stream is cut into non-overlapping
// windows from the start. nsamples <= 0 means up to `default_max` (all that fit, at most that many).
// Throws UserError when there are fewer than requested, or no window at all.
Samples calibration_samples(const io::TokenFile& file, int64_t seq, int64_t nsamples, int64_t default_max);
// Evaluation: non-overlapping windows of seq tokens of the whole file (rows concatenated), remainder dropped.
Samples eval_windows(const io::TokenFile& file, int64_t seq, int64_t max_windows);
// Throws UserError "<file>: token id X at index I is >= vocab_size V (<config>)".
void check_vocab(const io::TokenFile& file, int64_t vocab_size, const std::string& config_path);

}  // namespace pipequant
