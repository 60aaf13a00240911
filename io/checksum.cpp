// Checksums of output datasets: CRC-32 from zlib.
#include <zlib.h>

#include <algorithm>
#include <cstddef>

#include "io/shard.hpp"

namespace pipequant::io {

uint32_t crc32_of(const void* data, size_t bytes) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const auto* p = static_cast<const Bytef*>(data);
  // zlib takes uInt lengths: feed large buffers in pieces
  while (bytes > 0) {
    const size_t n = std::min<size_t>(bytes, 1u << 30);
    crc = crc32(crc, p, static_cast<uInt>(n));
    p += n;
    bytes -= n;
  }
  return static_cast<uint32_t>(crc);
}

}  // namespace pipequant::io
