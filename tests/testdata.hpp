#pragma once
// Where tests find ../shared/testdata: $PIPEQUANT_TESTDATA, else the path CMake put in
// $PIPEQUANT_TESTDATA_DEFAULT. Also a per-test scratch directory and a check of UserError messages.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "base/error.hpp"

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

// Runs fn and checks that it throws UserError whose message is one line containing every one of `parts`.
inline void expect_user_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const UserError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nlacks: " << p;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
    return;
  }
  ADD_FAILURE() << "no UserError thrown";
}

}  // namespace pipequant::testing
