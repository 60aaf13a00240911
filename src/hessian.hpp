#pragma once
// Hessian accumulation for one linear group: H = (2/n) sum over calibration tokens of x x^T.
// Determinism (docs/design.md section 8): samples are grouped into fixed chunks of kHessianChunk consecutive
// samples (by global sample index); a chunk's partial sum is accumulated in fp32 one sample at a time in
// sample order on the backend, then added into an fp64 accumulator on the host. Ranks of a stage group
// own whole chunks (StageGroup::owned_range(samples, kHessianChunk)), and their fp64 partials are summed in
// member order by the group. So the result does not depend on the micro-batch size, and the number of ranks
// only changes the order of fp64 additions before the final rounding to fp32.

#include <cstdint>
#include <vector>

#include "comm/stage_group.hpp"
#include "kernels/backend.hpp"

namespace pipequant {

inline constexpr int64_t kHessianChunk = 8;

class HessianAccumulator {
 public:
  HessianAccumulator(kernels::Backend& backend, int64_t width);
  // acts: backend memory [seq, width] of the calibration sample with global index `sample`.
  // Samples must come in increasing order.
  void add_sample(const float* acts, int64_t seq, int64_t sample);
  // Sums over the stage group (token-weighted: each member's partial is a plain sum over its tokens), scales by
  // 2 / total_tokens (the group's) and returns H [width, width] in fp32 on the host.
  std::vector<float> finish(const comm::StageGroup& group, int64_t total_tokens);

 private:
  void flush_chunk();
  kernels::Backend& backend_;
  int64_t width_;
  kernels::Buffer<float> partial_;  // fp32 partial of the current chunk (backend memory)
  std::vector<double> sum_;         // fp64 sum of finished chunks (host)
  std::vector<float> staging_;
  int64_t chunk_ = -1;              // chunk index of the samples in partial_
};

}  // namespace pipequant
