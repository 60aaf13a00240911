#pragma once
// Shapes as error messages print them: "[4096, 11008]".

#include <cstdint>
#include <string>
#include <vector>

namespace pipequant {

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace pipequant
