#include "src/calibration.hpp"

#include <algorithm>

#include "base/error.hpp"

namespace pipequant {

Samples calibration_samples(const io::TokenFile& file, int64_t seq, int64_t nsamples, int64_t default_max) {
  PQ_REQUIRE(seq > 0, "--seq-len must be positive, got ", seq);
  Samples s;
  s.seq = seq;
  // a [samples, seq] file is one sample per row: a row shorter than --seq-len would have to borrow from the next
  // sample, which is not what the file says
  PQ_REQUIRE(!file.two_d || file.row_length >= seq, file.path, ": shape [", file.samples, ", ", file.row_length,
             "]: rows of ", file.row_length, " tokens are shorter than --seq-len ", seq,
             " (each row is one sample; use --seq-len <= ", file.row_length, ", or a flat token stream)");
  const int64_t available = file.two_d ? file.samples : static_cast<int64_t>(file.ids.size()) / seq;
  PQ_REQUIRE(available > 0, file.path, ": ", file.ids.size(), " tokens hold no window of --seq-len ", seq);
  if (nsamples > 0) {
    PQ_REQUIRE(nsamples <= available, file.path, ": --nsamples ", nsamples, " windows of --seq-len ", seq,
               " requested, but the file holds only ", available);
    s.count = nsamples;
  } else {
    s.count = std::min(available, default_max);
  }
  s.tokens.resize(static_cast<size_t>(s.count * seq));
  for (int64_t i = 0; i < s.count; ++i) {
    const int64_t src = file.two_d ? i * file.row_length : i * seq;
    std::copy_n(file.ids.begin() + src, seq, s.tokens.begin() + i * seq);
  }
  return s;
}

Samples eval_windows(const io::TokenFile& file, int64_t seq, int64_t max_windows) {
  PQ_REQUIRE(seq > 1, "--seq-len must be at least 2 for evaluation, got ", seq);
  Samples s;
  s.seq = seq;
  s.count = static_cast<int64_t>(file.ids.size()) / seq;
  if (max_windows > 0) s.count = std::min(s.count, max_windows);
  PQ_REQUIRE(s.count > 0, file.path, ": ", file.ids.size(), " tokens hold no window of --seq-len ", seq);
  s.tokens.assign(file.ids.begin(), file.ids.begin() + s.count * seq);
  return s;
}

void check_vocab(const io::TokenFile& file, int64_t vocab_size, const std::string& config_path) {
  for (size_t i = 0; i < file.ids.size(); ++i) {
    if (file.ids[i] < vocab_size) continue;
    const auto at = static_cast<int64_t>(i);
    if (file.two_d)
      fail(file.path, ": token id ", file.ids[i], " at [", at / file.row_length, ", ", at % file.row_length,
           "] is >= vocab_size ", vocab_size, " of ", config_path);
    fail(file.path, ": token id ", file.ids[i], " at index ", at, " is >= vocab_size ", vocab_size, " of ",
         config_path);
  }
}

}  // namespace pipequant
