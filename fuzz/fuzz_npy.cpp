// Fuzzes the .npy reader (io/npy.cpp): the input is one .npy file, read as a plain array (read_npy), as a token file
// (read_tokens: calibration and evaluation data) and as a float matrix (read_matrix_f32: `pipequant layer`). What is
// accepted must be consistent: the data is the shape times the item size, and token ids fill samples x row_length.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "io/npy.hpp"

namespace {

using namespace pipequant;

void check_array(const std::string& file) {
  const io::NpyArray a = io::read_npy(file);
  for (int64_t d : a.shape) fuzz::invariant(d >= 0, "read_npy accepted a negative dimension");
  fuzz::invariant(a.numel() >= 0, "read_npy: negative element count");
}

void check_tokens(const std::string& file) {
  const io::TokenFile t = io::read_tokens(file);
  fuzz::invariant(t.samples > 0 && t.row_length > 0, "read_tokens accepted an empty file");
  fuzz::invariant(static_cast<int64_t>(t.ids.size()) == t.samples * t.row_length,
                  "read_tokens: ids are not samples x row_length");
  for (int32_t id : t.ids) fuzz::invariant(id >= 0, "read_tokens accepted a negative id");
}

void check_matrix(const std::string& file) {
  const io::Matrix m = io::read_matrix_f32(file, "fuzz");
  fuzz::invariant(m.rows >= 0 && m.cols >= 0 && static_cast<int64_t>(m.data.size()) == m.rows * m.cols,
                  "read_matrix_f32: data is not rows x cols");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string file = fuzz::scratch_dir("npy") + "/input.npy";
  fuzz::write_file(file, data, size);
  fuzz::refused([&] { check_array(file); });
  fuzz::refused([&] { check_tokens(file); });
  fuzz::refused([&] { check_matrix(file); });
  return 0;
}
