#pragma once
// Pieces shared by the quantize and eval drivers.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/stage.hpp"
#include "kernels/device_policy.hpp"
#include "base/timing.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "kernels/backend.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"

namespace pipequant {


// The backend of --backend, with the CPU threads of --threads (0: the node's cores shared by its ranks).
std::unique_ptr<kernels::Backend> make_backend(const RunOptions& run);
// This rank's CUDA device (its node's GPUs taken round-robin by local rank; 0 where there is none) and how many of
// the node's ranks share it. Collective on the world.
kernels::DeviceShare rank_device();
// What --transport resolves to for ranks on `backend` with GPU `gpu` (comm/transport_kind.hpp): nccl only where
// every rank of the world is on the CUDA backend with a GPU of its own. Collective on the world.
comm::TransportKind transport_for(const RunOptions& run, const kernels::Backend& backend,
                                  const kernels::DeviceShare& gpu);
// The activation transport of a stage worker on `backend`, as transport_for resolves it. Collective on the world.
std::unique_ptr<comm::ActivationTransport> make_transport(const RunOptions& run, const kernels::Backend& backend,
                                                          const comm::StageLayout& layout);

// The 16-bit format of the block forward's GEMMs for --compute-dtype on this backend and model (nullopt: fp32).
// Throws UserError for an unknown value.
std::optional<kernels::HalfFormat> forward_format(const RunOptions& run, const kernels::Backend& backend,
                                                  const io::ModelConfig& config);

// "fp32", "bf16" or "fp16".
std::string format_name(std::optional<kernels::HalfFormat> half);

// FNV-1a 64-bit over a sequence of byte ranges: the run's fingerprint.
class Fingerprint {
 public:
  void add(const void* data, size_t bytes);
  void add(const std::string& s) { add(s.data(), s.size()); }
  std::string hex() const;

 private:
  uint64_t h_ = 1469598103934665603ull;
};

// Creates the output directory and checks that it is writable; throws UserError naming it.
void prepare_out_dir(const std::string& dir);

// A checkpoint tensor in its source dtype, stored under the name `as`.
io::DenseTensor dense_from_checkpoint(const io::Checkpoint& ckpt, const std::string& name, const std::string& as);

// Runs `samples` samples of x through the runner in micro-batches until `until`, calling
// sink(first_sample, count, activations) for each micro-batch.
template <typename Sink>
void for_each_micro_batch(BlockRunner& runner, const float* x, int64_t samples, int64_t hidden, Until until,
                          Sink&& sink) {
  const int64_t seq = runner.seq();
  for (int64_t s0 = 0; s0 < samples; s0 += runner.micro_batch()) {
    const int64_t n = std::min(runner.micro_batch(), samples - s0);
    sink(s0, n, runner.forward(x + s0 * seq * hidden, n, until));
  }
}

// x [samples * seq, hidden] <- the block outputs of x (in place, through host staging).
void propagate(BlockRunner& runner, std::vector<float>& x, int64_t samples, int64_t hidden);

// x = [samples, seq, hidden] after block b, its first sample being number `first_sample` of the run's (a
// calibration sample or an eval window: `sample_word` names which). Throws UserError naming the block, sample,
// token and channel of the first value that is nan or infinite: a checkpoint of finite values can still overflow
// float32 in the forward, and nothing computed from it may be written or reported.
void require_finite_activations(const std::vector<float>& x, int64_t b, int64_t first_sample, int64_t seq,
                                int64_t hidden, const char* sample_word);
// H [width, width] of the inputs of `modules` of block b: throws UserError naming them and the first entry that is
// nan or infinite (a checkpoint of finite values can still overflow float32 in the forward; H shows it first).
void require_finite_hessian(const std::vector<float>& h, int64_t width, int64_t b, const std::string& modules);

}  // namespace pipequant
