#pragma once
// Where tests find ../shared/testdata: $PIPEQUANT_TESTDATA, else the path CMake put in
// $PIPEQUANT_TESTDATA_DEFAULT. Also a per-test scratch directory.
#include <cstdlib>
#include <filesystem>
#include <string>

#include <unistd.h>

namespace pipequant::testing {

inline std::string testdata(const std::string& rel) {
  const char* dir = std::getenv("PIPEQUANT_TESTDATA");
  if (!dir || !*dir) dir = std::getenv("PIPEQUANT_TESTDATA_DEFAULT");
  std::string base = (dir && *dir) ? dir : "../shared/testdata";
  return base + "/" + rel;
}

// A fresh empty directory under the system temp dir, unique per process and name.
inline std::string scratch_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("pipequant-test-" + std::to_string(::getpid()) + "-" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

}  // namespace pipequant::testing
