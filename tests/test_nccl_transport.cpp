// The nccl activation transport on a GPU: one rank sends to itself (NCCL refuses two ranks of one communicator on a
// single GPU, so this is what one GPU can run; the multi-GPU path is the same send/recv code with another peer), from
// host memory (staged through the device) and from device memory (sent as it is), in several messages in flight.
// Every case skips without a GPU or without NCCL in the build; CTest label `gpu`.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/stage.hpp"
#include "comm/transport_kind.hpp"
#include "kernels/backend.hpp"

namespace pipequant::test {
namespace {

#define SKIP_WITHOUT_NCCL_GPU()                                                              \
  if (!comm::nccl_transport_built()) GTEST_SKIP() << "this build has no NCCL";               \
  if (kernels::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device"

// This rank as both its own previous and next stage.
comm::StageLayout self_loop() {
  comm::StageLayout l;
  l.stages = 2;
  l.prev = 0;
  l.next = 0;
  return l;
}

std::vector<float> pattern(int64_t count, int seed) {
  std::vector<float> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) v[static_cast<size_t>(i)] = static_cast<float>((i * 7 + seed) % 1000) - 500.0f;
  return v;
}

TEST(NcclTransport, HostMessagesArriveIntactAndInOrder) {
  SKIP_WITHOUT_NCCL_GPU();
  const auto t = comm::make_nccl_transport(self_loop(), 0);
  EXPECT_EQ(t->name(), "nccl");
  // three messages of different sizes in flight before the first receive (as micro-batches are)
  const std::vector<int64_t> counts = {1, 4097, int64_t{3} << 20};
  std::vector<std::vector<float>> sent;
  for (size_t m = 0; m < counts.size(); ++m) {
    sent.push_back(pattern(counts[m], static_cast<int>(m)));
    t->send_next(sent.back().data(), counts[m], static_cast<int>(m));
  }
  for (size_t m = 0; m < counts.size(); ++m) {
    std::vector<float> got(static_cast<size_t>(counts[m]), -1.0f);
    t->recv_prev(got.data(), counts[m], static_cast<int>(m));
    EXPECT_EQ(got, sent[m]) << "message " << m;
  }
  t->wait_sends();
  uint64_t bytes = 0;
  for (const int64_t c : counts) bytes += static_cast<uint64_t>(c) * sizeof(float);
  EXPECT_EQ(t->bytes_sent(), bytes);
  EXPECT_EQ(t->bytes_received(), bytes);
}

TEST(NcclTransport, DeviceMessagesGoWithoutStaging) {
  SKIP_WITHOUT_NCCL_GPU();
  const auto gpu = kernels::make_cuda_backend(0, 0);
  const auto t = comm::make_nccl_transport(self_loop(), 0);
  const int64_t count = (int64_t{1} << 22) + 3;
  const std::vector<float> host = pattern(count, 11);
  kernels::Buffer<float> src(*gpu, count), dst(*gpu, count);
  gpu->upload(src.data(), host.data(), sizeof(float) * static_cast<size_t>(count));
  t->send_next(src.data(), count, 0);
  t->recv_prev(dst.data(), count, 0);
  t->wait_sends();
  std::vector<float> got(static_cast<size_t>(count));
  gpu->download(got.data(), dst.data(), sizeof(float) * static_cast<size_t>(count));
  EXPECT_EQ(got, host);
}

}  // namespace
}  // namespace pipequant::test
