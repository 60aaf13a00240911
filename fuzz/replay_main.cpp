// Runs a fuzz harness once over files and directories of inputs, as libFuzzer runs one input: the normal build's
// check that the seeds and every recorded regression still pass. Usage: fuzz_replay_<name> PATH...
// A directory is read recursively (files in name order); one that does not exist is skipped (fuzz/regressions/<name>
// stays empty until a harness finds something), but replaying no input at all fails. Exit 1 when an input throws
// anything but UserError (the harness lets those escape); a crash ends the process with the input's name printed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" __attribute__((weak)) int LLVMFuzzerInitialize(int* argc, char*** argv);

namespace {

std::vector<std::string> inputs_under(const std::string& path) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) return {path};
  if (!fs::is_directory(path, ec)) {
    std::fprintf(stderr, "replay: %s does not exist, skipped\n", path.c_str());
    return files;
  }
  for (const auto& e : fs::recursive_directory_iterator(path))
    if (e.is_regular_file()) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i)
    for (auto& f : inputs_under(argv[i])) files.push_back(std::move(f));
  if (files.empty()) {
    std::fprintf(stderr, "replay: no inputs (usage: %s FILE_OR_DIR...)\n", argv[0]);
    return 1;
  }
  for (const auto& f : files) {
    // printed before the run, so that a crash shows which input it was
    std::fprintf(stderr, "replay: %s\n", f.c_str());
    const std::vector<uint8_t> bytes = pipequant::fuzz::read_file(f);
    try {
      LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "replay: %s: uncaught exception (not a UserError): %s\n", f.c_str(), e.what());
      return 1;
    } catch (...) {
      std::fprintf(stderr, "replay: %s: uncaught exception of an unknown type\n", f.c_str());
      return 1;
    }
  }
  std::fprintf(stderr, "replay: %zu inputs passed\n", files.size());
  return 0;
}
