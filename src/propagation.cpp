#include "src/propagation.hpp"

#include <algorithm>

namespace pipequant {

void BlockPrefetcher::start(int64_t b) {
  if (b >= end_block_) return;
  const WeightSource* source = &source_;
  next_ = std::async(std::launch::async, [source, b] { return source->load_block(b); });
}

namespace {

// Receives micro-batch i of the stage's inputs into x (the first stage has them already); fp propagation counts
// the stage busy from its first micro-batch on.
void receive_micro_batch(StageContext& ctx, int64_t i) {
  const auto [s0, n] = ctx.batches[i];
  if (!ctx.layout.first()) ctx.transport.recv_prev(ctx.at(ctx.x, s0), ctx.floats(n), static_cast<int>(i));
  if (i == 0) ctx.metrics.busy_from_seconds = seconds_since(ctx.t_sync);
}

// Forwards n samples at `in_out` through the runner's current block, in place.
void forward_in_place(StageContext& ctx, float* in_out, int64_t n) {
  const float* out = ctx.runner.forward(in_out, n, Until::kOutput);
  ctx.backend.download(in_out, out, static_cast<size_t>(ctx.floats(n)) * sizeof(float));
}

class QuantizedPropagation final : public PropagationStrategy {
 public:
  QuantizedPropagation(const StagePlan& plan, const WeightSource& source)
      : prefetch_(source, plan.first_block + plan.blocks) {}

  void obtain_inputs(StageContext& ctx) override {
    prefetch_.start(ctx.plan.first_block);  // read while the inputs are awaited
    if (!ctx.layout.first())
      for (int64_t i = 0; i < ctx.batches.count(); ++i) {
        const auto [s0, n] = ctx.batches[i];
        ctx.transport.recv_prev(ctx.at(ctx.x, s0), ctx.floats(n), static_cast<int>(i));
      }
    ctx.metrics.busy_from_seconds = seconds_since(ctx.t_sync);  // busy once all inputs are here
  }
  BlockWeights block_weights(StageContext& ctx, int64_t b) override {
    BlockWeights w = prefetch_.take();
    prefetch_.start(b + 1);
    return w;
  }
  bool feeds_quantized() const override { return true; }
  void pass_outputs(StageContext& ctx) override {
    if (ctx.layout.last()) return;
    for (int64_t i = 0; i < ctx.batches.count(); ++i) {
      const auto [s0, n] = ctx.batches[i];
      ctx.transport.send_next(ctx.at(ctx.x, s0), ctx.floats(n), static_cast<int>(i));
    }
  }

 private:
  BlockPrefetcher prefetch_;
};

class FpResidentPropagation final : public PropagationStrategy {
 public:
  void obtain_inputs(StageContext& ctx) override {
    const auto t0 = Clock::now();
    for (int64_t b = ctx.plan.first_block; b < ctx.end_block(); ++b) blocks_.push_back(ctx.source.load_block(b));
    ctx.metrics.load_seconds += seconds_since(t0);
    sent_.resize(ctx.x.size());
    for (int64_t i = 0; i < ctx.batches.count(); ++i) {
      receive_micro_batch(ctx, i);
      if (!ctx.layout.last()) forward_and_send(ctx, i);
    }
  }
  BlockWeights block_weights(StageContext& ctx, int64_t b) override {
    return blocks_[static_cast<size_t>(b - ctx.plan.first_block)];
  }
  bool feeds_quantized() const override { return false; }
  void pass_outputs(StageContext&) override {}

 private:
  // Micro-batch i through every block of the stage, then to the next stage.
  void forward_and_send(StageContext& ctx, int64_t i) {
    const auto [s0, n] = ctx.batches[i];
    const auto t0 = Clock::now();
    float* si = ctx.at(sent_, s0);
    std::copy_n(ctx.at(ctx.x, s0), ctx.floats(n), si);
    for (const auto& block : blocks_) {
      ctx.runner.set_block(block);
      forward_in_place(ctx, si, n);
    }
    ctx.metrics.forward_seconds += seconds_since(t0);
    ctx.transport.send_next(si, ctx.floats(n), static_cast<int>(i));
  }

  std::vector<BlockWeights> blocks_;
  std::vector<float> sent_;  // outputs in flight (alive until the transport's wait_sends)
};

class FpStreamedPropagation final : public PropagationStrategy {
 public:
  FpStreamedPropagation(const StagePlan& plan, const WeightSource& source)
      : prefetch_(source, plan.first_block + plan.blocks) {}

  void obtain_inputs(StageContext& ctx) override {
    if (ctx.layout.last()) {
      for (int64_t i = 0; i < ctx.batches.count(); ++i) receive_micro_batch(ctx, i);
    } else {
      stream_blocks(ctx);
    }
    prefetch_.start(ctx.plan.first_block);  // the quantization reads the blocks again
  }
  BlockWeights block_weights(StageContext& ctx, int64_t b) override {
    BlockWeights w = prefetch_.take();
    prefetch_.start(b + 1);
    return w;
  }
  bool feeds_quantized() const override { return false; }
  void pass_outputs(StageContext&) override {}

 private:
  // Each block over all micro-batches (the inputs arrive during the first), the last block's outputs sent on.
  void stream_blocks(StageContext& ctx) {
    sent_.resize(ctx.x.size());
    prefetch_.start(ctx.plan.first_block);
    for (int64_t b = ctx.plan.first_block; b < ctx.end_block(); ++b) {
      auto t0 = Clock::now();
      const BlockWeights weights = prefetch_.take();
      prefetch_.start(b + 1);
      ctx.runner.set_block(weights);
      ctx.metrics.load_seconds += seconds_since(t0);
      for (int64_t i = 0; i < ctx.batches.count(); ++i) {
        const auto [s0, n] = ctx.batches[i];
        float* si = ctx.at(sent_, s0);
        if (b == ctx.plan.first_block) {
          receive_micro_batch(ctx, i);
          std::copy_n(ctx.at(ctx.x, s0), ctx.floats(n), si);
        }
        t0 = Clock::now();
        forward_in_place(ctx, si, n);
        ctx.metrics.forward_seconds += seconds_since(t0);
        if (b + 1 == ctx.end_block()) ctx.transport.send_next(si, ctx.floats(n), static_cast<int>(i));
      }
    }
  }

  BlockPrefetcher prefetch_;
  std::vector<float> sent_;  // outputs in flight (alive until the transport's wait_sends)
};

}  // namespace

std::unique_ptr<PropagationStrategy> make_propagation(Propagation mode, const StagePlan& plan,
                                                      const WeightSource& source) {
  if (mode == Propagation::kQuantized) return std::make_unique<QuantizedPropagation>(plan, source);
  // decided by the planner, which printed it
  if (plan.fp_blocks == "resident") return std::make_unique<FpResidentPropagation>();
  return std::make_unique<FpStreamedPropagation>(plan, source);
}

}  // namespace pipequant
