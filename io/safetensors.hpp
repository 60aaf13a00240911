#pragma once
// Reader for Hugging Face safetensors checkpoints: one `model.safetensors` or several shards listed by
// `model.safetensors.index.json`. Headers are read and validated when the checkpoint is opened (every field
// against the file size); the data files are memory-mapped lazily, when a tensor of theirs is first read,
// so a rank maps only the files that hold its own tensors.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace pipequant::io {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

// "F32", "BF16", ... as safetensors spells them.
const char* dtype_name(DType d);
size_t dtype_size(DType d);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string file;     // path of the .safetensors file holding it
  uint64_t offset = 0;  // absolute byte offset of the data in that file
  uint64_t nbytes = 0;
  int64_t numel() const;
};

class MappedFile;  // defined in safetensors.cpp

class Checkpoint {
 public:
  // `path` is a checkpoint directory (model.safetensors.index.json or model.safetensors, or the only
  // *.safetensors file in it) or one .safetensors file. Throws UserError naming the file and field.
  static Checkpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws UserError "checkpoint <path>: tensor <name> not found".
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;
  // The raw bytes of a tensor, from the mapped file.
  std::span<const std::byte> raw(const std::string& name) const;
  // The tensor converted to fp32 (F32, F16, BF16; others throw UserError naming the dtype; a value that is not finite
  // throws UserError naming the tensor and its index).
  std::vector<float> read_f32(const std::string& name) const;
  // Same, into caller memory of info(name).numel() floats.
  void read_f32(const std::string& name, float* out) const;
  // The raw 16-bit values of an F16 or BF16 tensor (others throw UserError naming the dtype).
  std::vector<uint16_t> read_u16(const std::string& name) const;
  // Throws UserError naming the tensor and the index of its first value that is nan or infinite (floating-point
  // dtypes; others have none). read_f32 and read_u16 check what they return the same way.
  void require_finite(const std::string& name) const;
  // Drops the tensor's mapped pages from this process's memory (they count in its resident set once read; the
  // page cache keeps them). Reading the tensor again maps them back in.
  void release(const std::string& name) const;
  // Paths of the files mapped so far (tests check that a rank maps only what it needs).
  std::vector<std::string> mapped_files() const;

 private:
  std::string path_;
  std::map<std::string, TensorInfo> tensors_;
  mutable std::map<std::string, std::shared_ptr<MappedFile>> maps_;
  mutable std::shared_ptr<std::mutex> mutex_ = std::make_shared<std::mutex>();
};

// Writes a single-file safetensors checkpoint (used by `pipequant synth` and by tests).
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;  // already in dtype, little-endian
};
void write_safetensors(const std::string& file, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Streaming form, for checkpoints too large to hold in memory twice: tensors are described up front and
// `fill(i, out)` writes tensor i's bytes (dtype, little-endian; out.size() = numel x dtype size) when its
// turn comes, so only one tensor is in memory at a time.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};
void write_safetensors(const std::string& file, const std::vector<TensorSpec>& specs,
                       const std::function<void(size_t index, std::span<std::byte> out)>& fill,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace pipequant::io
