// Fuzzes the safetensors reader on one file: the input is the whole file (8-byte header length, JSON header, data).
// Checkpoint::open validates the header; then every tensor is read (read_checkpoint.hpp).
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.hpp"
#include "fuzz/read_checkpoint.hpp"
#include "io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace pipequant;
  static const std::string file = fuzz::scratch_dir("safetensors") + "/model.safetensors";
  fuzz::write_file(file, data, size);
  fuzz::refused([&] { fuzz::read_every_tensor(io::Checkpoint::open(file)); });
  return 0;
}
