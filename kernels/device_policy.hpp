#pragma once
// The decisions about CUDA devices that need no device: how the runtime's device count is read, which GPU a rank
// takes and what share of its memory, what a Cholesky status means. They live here, in plain C++, so that every
// build tests them (tests/test_device_policy.cpp); kernels/cuda calls them with what the CUDA runtime reports.

#include <cstddef>
#include <cstdint>
#include <string>

namespace pipequant::kernels {

// What cudaGetDeviceCount said, sorted by what it means for the caller.
struct DeviceCountQuery {
  enum class Result {
    kDevices,   // success: `count` devices
    kNoDevice,  // a driver, no device (cudaErrorNoDevice): a CPU node
    kNoDriver,  // no NVIDIA driver library is installed at all: a CPU node
    kFailed,    // anything else: a driver older than the runtime, a broken installation, a device in a bad state
  };
  Result result = Result::kNoDriver;
  int count = 0;
  std::string error;  // kFailed: the runtime's name and text of the error
};

// The devices this process may use: `count`, or 0 on a node without GPUs. A failure is not "no GPU": on a GPU node
// with an old driver it would quietly run every job on the CPU and skip every GPU test, so it throws UserError with
// the runtime's words and what to do.
int usable_device_count(const DeviceCountQuery& query);

// The GPU a rank takes on its node (round-robin by local rank) and how many of the node's ranks take the same one.
struct DeviceShare {
  int device = 0;
  int sharing = 1;
};
DeviceShare device_share(int local_rank, int local_size, int devices);

// What the CUDA backend keeps free for the context and library-internal allocations, of the memory a rank may take:
// 1 GiB, or an eighth when that is smaller.
size_t device_memory_margin(size_t share_bytes);

// The memory budget of one rank on a device of `total_bytes` (`free_bytes` free now) shared by `sharing` ranks.
// requested_bytes > 0 (--gpu-mem, per rank) is taken as given, and refused with a UserError when the ranks
// sharing the device would together ask for more than it has. 0: an equal share of the device, never more than is
// free, less the margin. The ranks' memory pools keep freed memory up to their budgets, so the shares must add up.
size_t device_budget(size_t requested_bytes, size_t free_bytes, size_t total_bytes, int sharing, int device);

// What a Cholesky factorization's `info` says: 0 factored, i > 0 the leading minor of order i is not positive
// definite (damping may help). A negative info is an invalid argument, i.e. a bug in the caller: an internal error,
// never a quiet fallback to round-to-nearest.
bool cholesky_succeeded(int64_t info, int64_t n);

}  // namespace pipequant::kernels
