#pragma once
// Hessian accumulation for one linear group: H = (2/n) sum over calibration tokens of x x^T.
// Determinism (docs/design.md section 8): samples are grouped into fixed chunks of kHessianChunk consecutive
// samples (by global sample index); a chunk's partial sum is accumulated in fp32 one sample at a time in
// sample order on the backend, then added into an fp64 accumulator on the host. Ranks of a stage group
// own whole chunks (StageGroup::owned_range(samples, kHessianChunk)), and their fp64 partials are summed in
// member order by the group. So the result does not depend on the micro-batch size, and the number of ranks
// only changes the order of fp64 additions before the final rounding to fp32.
// Memory: one fp32 [width, width] partial (on a host backend it becomes H itself); the fp64 sum is allocated only
// when a second chunk or the stage group's sum needs it. With one chunk on one rank (a 405B down_proj: 11.3 GB),
// H costs 4 bytes per entry; otherwise 12 at the peak (fp32 partial or result, plus the fp64 sum).

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
  // What finish() holds at its peak, in bytes, for `chunks` chunks on this rank of a group of `members`.
  static uint64_t peak_bytes(int64_t width, int64_t chunks, int members);

 private:
  float* partial() { return host_ ? host_partial_.data() : device_partial_.data(); }
  void add_partial_to_sum();  // the current chunk's partial into the fp64 sum (allocated on first use)
  void zero_partial();
  kernels::Backend& backend_;
  int64_t width_;
  bool host_;                              // backend memory is host memory
  std::vector<float> host_partial_;        // fp32 partial of the current chunk (host backend)
  kernels::Buffer<float> device_partial_;  // ... (device backend)
  std::vector<double> sum_;                // fp64 sum of finished chunks (host), when needed
  int64_t chunk_ = -1;                     // chunk index of the samples in the partial
};

}  // namespace pipequant
