#pragma once
// How a stage obtains each block's calibration inputs (docs/design.md section 2): three strategies behind one
// interface.
//   quantized    the stage waits for the previous stage's outputs, computed through its quantized blocks; after
//                its own last block it sends its outputs on. Stages run one after another.
//   fp resident  the stage's unquantized blocks are held in host memory; each micro-batch is forwarded through all
//                of them as soon as it arrives and sent on, so every stage works at once.
//   fp streamed  the same with the blocks read one at a time (each over all micro-batches), when their fp32
//                copies exceed --fp-resident-gb; they are read again for the quantization.
// Block weights are read (and converted to fp32) on a helper thread while the previous block computes.

#include <cstdint>
#include <future>
#include <memory>
#include <utility>
#include <vector>

#include "base/timing.hpp"
#include "comm/stage.hpp"
#include "src/model.hpp"
#include "src/options.hpp"
#include "src/planner.hpp"
#include "src/report.hpp"

namespace pipequant {

// This rank's calibration samples cut into micro-batches: micro-batch i is samples [first, first + count) of the
// rank's own.
struct MicroBatches {
  int64_t samples = 0;  // this rank's
  int64_t size = 1;     // samples per micro-batch
  int64_t count() const { return (samples + size - 1) / size; }
  std::pair<int64_t, int64_t> operator[](int64_t i) const { return {i * size, std::min(size, samples - i * size)}; }
};

// What a strategy works with; owned by the stage worker.
struct StageContext {
  const comm::StageLayout& layout;
  const StagePlan& plan;
  const WeightSource& source;
  comm::ActivationTransport& transport;
  BlockRunner& runner;
  kernels::Backend& backend;
  std::vector<float>& x;  // this rank's activations [samples * seq, hidden]: the current block's inputs
  MicroBatches batches;
  int64_t seq = 0;
  int64_t hidden = 0;
  StageMetrics& metrics;
  Clock::time_point t_sync;  // the job-wide start (busy spans are measured from it)

  int64_t end_block() const { return plan.first_block + plan.blocks; }
  float* at(std::vector<float>& buf, int64_t sample) const { return buf.data() + sample * seq * hidden; }
  int64_t floats(int64_t samples) const { return samples * seq * hidden; }
};

// Reads block weights ahead, on a helper thread: at most two blocks' weights are in host memory at once.
class BlockPrefetcher {
 public:
  BlockPrefetcher(const WeightSource& source, int64_t end_block) : source_(source), end_block_(end_block) {}
  // Starts reading block b (nothing past the stage's last block).
  void start(int64_t b);
  // The block started last; waits for it.
  BlockWeights take() { return next_.get(); }

 private:
  const WeightSource& source_;
  int64_t end_block_;
  std::future<BlockWeights> next_;
};

class PropagationStrategy {
 public:
  virtual ~PropagationStrategy() = default;
  // Before the first block: ctx.x receives the stage's inputs (from the previous stage, or already embedded on the
  // first); the fp strategies also forward them through the stage's unquantized blocks and send the outputs on.
  virtual void obtain_inputs(StageContext& ctx) = 0;
  // The unquantized weights of block b, asked for in block order.
  virtual BlockWeights block_weights(StageContext& ctx, int64_t b) = 0;
  // Whether the block's later linears and the next blocks see the quantized weights.
  virtual bool feeds_quantized() const = 0;
  // After the last block: the stage's outputs go to the next stage (the fp strategies have sent theirs already).
  virtual void pass_outputs(StageContext& ctx) = 0;
};

std::unique_ptr<PropagationStrategy> make_propagation(Propagation mode, const StagePlan& plan, const WeightSource& source);

}  // namespace pipequant
