// The nccl activation transport (comm/stage.hpp): NCCL send/recv between the GPUs of consecutive stages. Built only
// where the CUDA toolkit has NCCL (PIPEQUANT_HAVE_NCCL); comm/transport_select.cpp says so elsewhere.
//
// One communicator spans the world, from a unique id that world rank 0 makes and broadcasts over MPI; each rank
// joins it on its own device. NCCL has no tags: messages between a pair arrive in the order they were sent, which
// is the order the propagation modes send and receive micro-batches in (src/propagation.cpp); `tag` is not used.
// Sends run on their own stream, receives on another, so that a middle stage's send to the next stage never waits
// behind its receive from the previous one.
//
// Pointers may be host or device memory (cudaPointerGetAttributes says which): device memory goes as it is, host
// memory through a device staging buffer of the message's size (the stage worker keeps activations on the host;
// a device-resident caller passes device pointers and nothing is staged).
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "comm/stage.hpp"

namespace pipequant::comm {

namespace {

void check_cuda(cudaError_t status, const char* what) {
  PQ_ASSERT(status == cudaSuccess, "nccl transport: ", what, ": ", cudaGetErrorName(status), ": ",
            cudaGetErrorString(status));
}

// An NCCL failure names the call; the ones a user can cause (a peer gone, a system error) are UserErrors with NCCL's
// own words, the rest internal.
void check_nccl(ncclResult_t status, const char* what) {
  if (status == ncclSuccess) return;
  if (status == ncclSystemError || status == ncclRemoteError || status == ncclUnhandledCudaError)
    fail("nccl transport: ", what, " failed: ", ncclGetErrorString(status),
         " (set NCCL_DEBUG=WARN for NCCL's account)");
  PQ_ASSERT(false, "nccl transport: ", what, ": ", ncclGetErrorString(status));
}

bool device_memory(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

// A device buffer that grows to the largest message staged through it.
class DeviceScratch {
 public:
  ~DeviceScratch() {
    if (data_ != nullptr) cudaFree(data_);
  }
  float* at_least(int64_t count) {
    const auto bytes = static_cast<size_t>(count) * sizeof(float);
    if (bytes > bytes_) {
      if (data_ != nullptr) check_cuda(cudaFree(data_), "cudaFree");
      data_ = nullptr;
      const cudaError_t status = cudaMalloc(reinterpret_cast<void**>(&data_), bytes);
      if (status != cudaSuccess) {
        cudaGetLastError();
        fail("nccl transport: cannot allocate ", bytes, " bytes of device memory to stage an activation message (",
             cudaGetErrorString(status), "); lower --micro-batch or use --transport mpi");
      }
      bytes_ = bytes;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t bytes_ = 0;
};

class NcclTransport final : public ActivationTransport {
 public:
  NcclTransport(const StageLayout& layout, int device) : layout_(layout), device_(device) {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id{};
    if (layout_.world_rank == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    check_nccl(ncclCommInitRank(&comm_, layout_.world_size, id, layout_.world_rank), "ncclCommInitRank");
    check_cuda(cudaStreamCreateWithFlags(&send_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaStreamCreateWithFlags(&recv_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }

  ~NcclTransport() override {
    cudaSetDevice(device_);
    if (!std::uncaught_exceptions()) wait_sends();
    if (comm_ != nullptr) (std::uncaught_exceptions() ? ncclCommAbort(comm_) : ncclCommDestroy(comm_));
    cudaStreamDestroy(send_stream_);
    cudaStreamDestroy(recv_stream_);
  }

  std::string name() const override { return "nccl"; }

  void send_next(const float* data, int64_t count, int /*tag*/) override {
    if (layout_.next < 0) return;
    if (layout_.next == layout_.world_rank) {  // to itself: NCCL needs the send and its receive in one group
      self_pending_.push_back({data, count});
      bytes_sent_ += static_cast<uint64_t>(count) * sizeof(float);
      return;
    }
    post_send(data, count);
    bytes_sent_ += static_cast<uint64_t>(count) * sizeof(float);
  }

  void recv_prev(float* data, int64_t count, int /*tag*/) override {
    if (layout_.prev < 0) return;
    const auto t0 = std::chrono::steady_clock::now();
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    const bool on_device = device_memory(data);
    float* dst = on_device ? data : recv_scratch_.at_least(count);
    if (layout_.prev == layout_.world_rank) {
      PQ_ASSERT(!self_pending_.empty() && self_pending_.front().count == count,
                "nccl transport: a receive from itself with no matching send of ", count, " floats");
      const Message m = self_pending_.front();
      self_pending_.erase(self_pending_.begin());
      check_nccl(ncclGroupStart(), "ncclGroupStart");
      post_send(m.data, m.count);
      check_nccl(ncclRecv(dst, static_cast<size_t>(count), ncclFloat32, layout_.prev, comm_, recv_stream_), "ncclRecv");
      check_nccl(ncclGroupEnd(), "ncclGroupEnd");
    } else {
      check_nccl(ncclRecv(dst, static_cast<size_t>(count), ncclFloat32, layout_.prev, comm_, recv_stream_), "ncclRecv");
    }
    if (!on_device)
      check_cuda(cudaMemcpyAsync(data, dst, static_cast<size_t>(count) * sizeof(float), cudaMemcpyDeviceToHost,
                                 recv_stream_),
                 "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(recv_stream_), "cudaStreamSynchronize (receive)");
    bytes_received_ += static_cast<uint64_t>(count) * sizeof(float);
    recv_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  void wait_sends() override {
    PQ_ASSERT(self_pending_.empty(), "nccl transport: ", self_pending_.size(), " sends to itself never received");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    check_cuda(cudaStreamSynchronize(send_stream_), "cudaStreamSynchronize (send)");
    send_scratch_.clear();
  }

 private:
  struct Message {
    const float* data;
    int64_t count;
  };

  // ncclSend of `count` floats on the send stream; host memory goes through a staging buffer of its own, which
  // lives until wait_sends (several sends may be in flight, as with MPI_Isend).
  void post_send(const float* data, int64_t count) {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    const float* src = data;
    if (!device_memory(data)) {
      send_scratch_.push_back(std::make_unique<DeviceScratch>());
      float* staged = send_scratch_.back()->at_least(count);
      check_cuda(cudaMemcpyAsync(staged, data, static_cast<size_t>(count) * sizeof(float), cudaMemcpyHostToDevice,
                                 send_stream_),
                 "cudaMemcpyAsync");
      src = staged;
    }
    check_nccl(ncclSend(src, static_cast<size_t>(count), ncclFloat32, layout_.next, comm_, send_stream_), "ncclSend");
  }

  StageLayout layout_;
  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t send_stream_ = nullptr;
  cudaStream_t recv_stream_ = nullptr;
  DeviceScratch recv_scratch_;
  std::vector<std::unique_ptr<DeviceScratch>> send_scratch_;
  std::vector<Message> self_pending_;
};

}  // namespace

bool nccl_transport_built() { return true; }

std::unique_ptr<ActivationTransport> make_nccl_transport(const StageLayout& layout, int device) {
  return std::make_unique<NcclTransport>(layout, device);
}

}  // namespace pipequant::comm
