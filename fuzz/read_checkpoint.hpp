#pragma once
// Reads every tensor of an opened checkpoint as the loaders do (raw bytes, fp32, 16-bit values) and checks that what
// was read agrees with the header: a tensor's bytes are its shape times its dtype size, and only the dtypes each
// reader converts are converted. Shared by the safetensors harnesses.

#include <string>

#include "fuzz/fuzz_util.hpp"
#include "io/safetensors.hpp"

namespace pipequant::fuzz {

inline void read_every_tensor(const io::Checkpoint& ck) {
  using io::DType;
  for (const std::string& name : ck.names()) {
    const io::TensorInfo& t = ck.info(name);
    invariant(t.numel() >= 0, "a tensor with a negative element count was accepted");
    invariant(t.nbytes == static_cast<uint64_t>(t.numel()) * io::dtype_size(t.dtype),
              "a tensor whose byte count is not its shape times its dtype size was accepted");
    refused([&] { invariant(ck.raw(name).size() == t.nbytes, "raw() returned a span of the wrong size"); });
    const bool is_half = t.dtype == DType::kF16 || t.dtype == DType::kBF16;
    const bool f32_refused =
        refused([&] { invariant(ck.read_f32(name).size() == static_cast<size_t>(t.numel()), "read_f32: wrong size"); });
    invariant(f32_refused || is_half || t.dtype == DType::kF32, "read_f32 converted a dtype other than F32/F16/BF16");
    const bool u16_refused =
        refused([&] { invariant(ck.read_u16(name).size() == static_cast<size_t>(t.numel()), "read_u16: wrong size"); });
    invariant(u16_refused || is_half, "read_u16 returned a dtype other than F16/BF16");
    ck.release(name);
  }
}

}  // namespace pipequant::fuzz
