#pragma once
// NumPy .npy files (format 1.0/2.0/3.0, little-endian, C order): token files, layer inputs and weights.

#include <cstdint>
#include <string>
#include <vector>

namespace pipequant::io {

struct NpyArray {
  std::string descr;            // e.g. "<f4", "<i4", "<i8"
  std::vector<int64_t> shape;
  std::vector<char> data;       // raw little-endian bytes, C order
  int64_t numel() const;
};

// Throws UserError naming the file and what is wrong (magic, header, descr, fortran_order, shape x size).
NpyArray read_npy(const std::string& path);
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data);

// A float32 matrix [rows, cols] (a 2-D "<f4", or "<f2"/"<f8" converted); `what` names the role in errors.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;
};
Matrix read_matrix_f32(const std::string& path, const std::string& what);

// Token ids: int32 or int64, 1-D stream or 2-D [samples, seq]. Throws UserError for other dtypes/ranks,
// negative ids, or ids that do not fit in int32.
struct TokenFile {
  std::string path;
  std::vector<int32_t> ids;  // all ids, C order
  int64_t samples = 0;       // rows of a 2-D file; 1 for a 1-D stream
  int64_t row_length = 0;    // columns of a 2-D file; the length of a 1-D stream
  bool two_d = false;
};
TokenFile read_tokens(const std::string& path);

}  // namespace pipequant::io
