#pragma once
// Stage communicators and the activation transport between pipeline stages (docs/design.md section 7).
// World = P stages x D ranks; rank r is member r % D of stage r / D and exchanges activations with the
// member of the same index in the neighbouring stages only.

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/transport_kind.hpp"

namespace pipequant::comm {

struct StageLayout {
  int world_rank = 0;
  int world_size = 1;
  int stages = 1;           // P
  int ranks_per_stage = 1;  // D
  int stage = 0;
  int index = 0;                        // member index inside the stage group
  int prev = -1;                        // world rank of the peer in the previous stage, -1 for the first stage
  int next = -1;                        // world rank of the peer in the next stage, -1 for the last stage
  MPI_Comm stage_comm = MPI_COMM_NULL;  // the D ranks of this stage
  bool first() const { return stage == 0; }
  bool last() const { return stage == stages - 1; }
};

// Collective on MPI_COMM_WORLD. The caller frees stage_comm with free_stage_layout.
StageLayout make_stage_layout(int ranks_per_stage);
void free_stage_layout(StageLayout& layout);

// Moves activations (host fp32 buffers) to the next stage and from the previous one. Sends are posted
// and return at once (the buffer must stay alive until wait_sends); receives block until the data is in.
// Implementations: `mpi` (host-staged, here) and `nccl` (GPU to GPU, with the CUDA backend).
class ActivationTransport {
 public:
  virtual ~ActivationTransport() = default;
  virtual std::string name() const = 0;
  virtual void send_next(const float* data, int64_t count, int tag) = 0;
  virtual void recv_prev(float* data, int64_t count, int tag) = 0;
  virtual void wait_sends() = 0;
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }
  double recv_wait_seconds() const { return recv_wait_seconds_; }  // time blocked in recv_prev

 protected:
  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
  double recv_wait_seconds_ = 0.0;
};

std::unique_ptr<ActivationTransport> make_mpi_transport(const StageLayout& layout);

// The nccl transport (comm/nccl/nccl_transport.cpp): activations GPU to GPU over one NCCL communicator of the whole
// world, this rank on CUDA device `device`; host pointers are staged through device memory, device pointers go as
// they are. Collective on MPI_COMM_WORLD. NCCL refuses two ranks of one communicator on the same GPU: every rank
// needs its own (choose_transport). Throws UserError where the build has no NCCL.
std::unique_ptr<ActivationTransport> make_nccl_transport(const StageLayout& layout, int device);

// Point-to-point bandwidth between world ranks 0 and 1 through the transport the driver uses (`kind`, mpi or nccl;
// rank 0 as stage 0 and rank 1 as stage 1; nccl on CUDA device `device`), as an nccl-tests style table (size,
// count, type, time, algbw, busbw) that the caller prints on rank 0. Collective on the world; ranks beyond 1 only
// meet the barriers.
int run_transport_benchmark(TransportKind kind, int device, int64_t min_bytes, int64_t max_bytes, int iters, int warmup,
                            std::string& table);

}  // namespace pipequant::comm
