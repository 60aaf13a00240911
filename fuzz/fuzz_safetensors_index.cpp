// Fuzzes the sharded safetensors reader: model.safetensors.index.json and the shard files it names. The input is
// the index JSON, optionally followed by "\n#shard\n" and the bytes of model-00001-of-00002.safetensors, and by a
// second "\n#shard\n" and those of model-00002-of-00002.safetensors. Two valid shards, fixed-a.safetensors and
// fixed-b.safetensors (written once by write_safetensors), lie in the same directory, so that an index alone can
// name real files. Checkpoint::open is given the directory; then every tensor is read (read_checkpoint.hpp).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "fuzz/read_checkpoint.hpp"
#include "io/safetensors.hpp"

namespace {

using namespace pipequant;

inline constexpr std::string_view kSeparator = "\n#shard\n";
inline constexpr const char* kInputShards[] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};

// count values of `dtype` (F32, F16, BF16 or I32 bits), small and finite, as little-endian bytes
std::vector<std::byte> values(io::DType dtype, size_t count) {
  const size_t width = io::dtype_size(dtype);
  std::vector<std::byte> out(count * width);
  for (size_t i = 0; i < count; ++i) {
    const float f = 0.25f * static_cast<float>(i % 7) - 0.5f;
    uint32_t bits32;
    std::memcpy(&bits32, &f, 4);
    uint32_t v = dtype == io::DType::kF32    ? bits32
                 : dtype == io::DType::kBF16 ? bits32 >> 16
                 : dtype == io::DType::kF16  ? 0x3c00u + static_cast<uint32_t>(i % 7)  // 1.0 and a little more
                                             : static_cast<uint32_t>(i);
    std::memcpy(out.data() + i * width, &v, width);
  }
  return out;
}

io::TensorToWrite tensor(const std::string& name, io::DType dtype, std::vector<int64_t> shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return {name, dtype, std::move(shape), values(dtype, n)};
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string dir = fuzz::scratch_dir("safetensors_index");
  io::write_safetensors(dir + "/fixed-a.safetensors",
                        {tensor("model.embed_tokens.weight", io::DType::kBF16, {4, 8}),
                         tensor("model.layers.0.input_layernorm.weight", io::DType::kF32, {8})},
                        {{"format", "pt"}});
  io::write_safetensors(dir + "/fixed-b.safetensors",
                        {tensor("lm_head.weight", io::DType::kF16, {4, 8}),
                         tensor("model.norm.weight", io::DType::kF32, {8}), tensor("counts", io::DType::kI32, {3})});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = fuzz::scratch_dir("safetensors_index");
  const std::vector<std::string_view> parts = fuzz::split(data, size, kSeparator);
  fuzz::write_file(dir + "/model.safetensors.index.json", parts[0]);
  for (size_t i = 0; i < 2; ++i) {
    const std::string shard = dir + "/" + kInputShards[i];
    if (i + 1 < parts.size())
      fuzz::write_file(shard, parts[i + 1]);
    else
      fuzz::remove_file(shard);  // not left over from the input before
  }
  fuzz::refused([&] { fuzz::read_every_tensor(io::Checkpoint::open(dir)); });
  return 0;
}
