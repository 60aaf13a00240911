#include "kernels/device_policy.hpp"

#include <algorithm>

#include "base/error.hpp"

namespace pipequant::kernels {

int usable_device_count(const DeviceCountQuery& query) {
  switch (query.result) {
    case DeviceCountQuery::Result::kDevices:
      return std::max(query.count, 0);
    case DeviceCountQuery::Result::kNoDevice:
    case DeviceCountQuery::Result::kNoDriver:
      return 0;
    case DeviceCountQuery::Result::kFailed:
      break;
  }
  fail("CUDA: the NVIDIA driver is installed but cannot be used (", query.error,
       "); update the driver to one that supports this build's CUDA runtime, or run with --backend cpu");
}

DeviceShare device_share(int local_rank, int local_size, int devices) {
  PQ_ASSERT(devices > 0 && local_size > 0 && local_rank >= 0 && local_rank < local_size, "device_share: rank ",
            local_rank, " of ", local_size, ", ", devices, " devices");
  DeviceShare share;
  share.device = local_rank % devices;
  // local ranks d, d + devices, d + 2 devices, ... below local_size
  share.sharing = (local_size - share.device + devices - 1) / devices;
  return share;
}

size_t device_memory_margin(size_t share_bytes) { return std::min(size_t{1} << 30, share_bytes / 8); }

size_t device_budget(size_t requested_bytes, size_t free_bytes, size_t total_bytes, int sharing, int device) {
  PQ_ASSERT(sharing > 0, "device_budget: ", sharing, " ranks");
  const auto ranks = static_cast<size_t>(sharing);
  if (requested_bytes > 0) {
    PQ_REQUIRE(requested_bytes <= total_bytes / ranks, "--gpu-mem ", static_cast<double>(requested_bytes) / 1e9,
               " (per rank): ", sharing, " ranks of this node share CUDA device ", device, ", which has ",
               static_cast<double>(total_bytes) / 1e9, " GB; give each at most ",
               static_cast<double>(total_bytes / ranks) / 1e9, " GB or run fewer ranks per node");
    return requested_bytes;
  }
  const size_t share = std::min(free_bytes, total_bytes / ranks);
  return share - device_memory_margin(share);
}

bool cholesky_succeeded(int64_t info, int64_t n) {
  PQ_ASSERT(info >= 0 && info <= n, "Cholesky of order ", n, ": info ", info,
            " (a negative info is an invalid argument to the factorization: a bug, not a property of the Hessian)");
  return info == 0;
}

}  // namespace pipequant::kernels
