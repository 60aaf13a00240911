#pragma once
// What the fuzz harnesses share. The parsers take paths, so each input is written to a file in a scratch directory
// under /dev/shm ($PIPEQUANT_FUZZ_SCRATCH if set, one subdirectory per process so that parallel jobs do not collide).
// A UserError is the expected refusal of a bad input; anything else escaping a harness is a bug, and is left to
// crash the run (libFuzzer records the input; replay_main.cpp names it).

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"

namespace pipequant::fuzz {

namespace detail {
inline std::string& scratch_root() {
  static std::string root;
  return root;
}
inline void remove_scratch_root() {
  std::error_code ec;
  if (!scratch_root().empty()) std::filesystem::remove_all(scratch_root(), ec);
}
// The directories of processes that crashed (a crash skips the removal at exit): <base>/<pid> with no such process.
inline void remove_dead_scratch(const std::string& base) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(base, ec)) {
    const std::string name = e.path().filename().string();
    const long pid = std::strtol(name.c_str(), nullptr, 10);
    if (pid > 0 && std::to_string(pid) == name && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
      std::filesystem::remove_all(e.path(), ec);
  }
}
}  // namespace detail

// <scratch>/<pid>/<name>, created on first use; the per-process root is removed at exit.
inline std::string scratch_dir(const std::string& name) {
  std::string& root = detail::scratch_root();
  if (root.empty()) {
    const char* env = std::getenv("PIPEQUANT_FUZZ_SCRATCH");
    const std::string base = env && *env ? env : "/dev/shm/pipequant-fuzz";
    detail::remove_dead_scratch(base);
    root = base + "/" + std::to_string(::getpid());
    std::filesystem::create_directories(root);
    // PIPEQUANT_FUZZ_KEEP_SCRATCH=1 keeps the files of the last input (the edited shard of a crash, the fixture)
    const char* keep = std::getenv("PIPEQUANT_FUZZ_KEEP_SCRATCH");
    if (!(keep && *keep == '1')) std::atexit(detail::remove_scratch_root);
  }
  const std::string dir = root + "/" + name;
  std::filesystem::create_directories(dir);
  return dir;
}

inline void write_file(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}
inline void write_file(const std::string& path, std::string_view text) { write_file(path, text.data(), text.size()); }

inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void remove_file(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove(path, ec);
}

// A property the parsed result must have; a broken one is a bug like a crash: it aborts with `what`.
inline void invariant(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz: invariant broken: %s\n", what);
    std::abort();
  }
}

// PIPEQUANT_FUZZ_VERBOSE=1 prints each refusal: what a seed reaches, and where it stops.
inline bool verbose() {
  static const bool on = [] {
    const char* v = std::getenv("PIPEQUANT_FUZZ_VERBOSE");
    return v && *v == '1';
  }();
  return on;
}

// Runs f; a UserError is a refusal (true: refused), anything else propagates.
template <typename F>
bool refused(F&& f) {
  try {
    f();
    return false;
  } catch (const UserError& e) {
    if (verbose()) std::fprintf(stderr, "refused: %s\n", e.what());
    return true;
  }
}

// The input cut at each occurrence of `separator` (n separators give n + 1 parts, some maybe empty).
inline std::vector<std::string_view> split(const uint8_t* data, size_t size, std::string_view separator) {
  std::vector<std::string_view> parts;
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  for (size_t at; (at = rest.find(separator)) != std::string_view::npos;) {
    parts.push_back(rest.substr(0, at));
    rest.remove_prefix(at + separator.size());
  }
  parts.push_back(rest);
  return parts;
}

}  // namespace pipequant::fuzz
