#include "src/hessian.hpp"

#include <algorithm>

#include "base/error.hpp"

namespace pipequant {

HessianAccumulator::HessianAccumulator(kernels::Backend& backend, int64_t width)
    : backend_(backend), width_(width), partial_(backend, width * width),
      sum_(static_cast<size_t>(width * width), 0.0), staging_(static_cast<size_t>(width * width), 0.0f) {
  std::fill(staging_.begin(), staging_.end(), 0.0f);
  backend_.upload(partial_.data(), staging_.data(), staging_.size() * sizeof(float));
}

void HessianAccumulator::flush_chunk() {
  if (chunk_ < 0) return;
  backend_.download(staging_.data(), partial_.data(), staging_.size() * sizeof(float));
  for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += static_cast<double>(staging_[i]);
  std::fill(staging_.begin(), staging_.end(), 0.0f);
  backend_.upload(partial_.data(), staging_.data(), staging_.size() * sizeof(float));
  chunk_ = -1;
}

void HessianAccumulator::add_sample(const float* acts, int64_t seq, int64_t sample) {
  const int64_t chunk = sample / kHessianChunk;
  PQ_ASSERT(chunk >= chunk_, "samples out of order: ", sample);
  if (chunk != chunk_) {
    flush_chunk();
    chunk_ = chunk;
  }
  backend_.hessian_accumulate(acts, seq, width_, partial_.data());
}

std::vector<float> HessianAccumulator::finish(const comm::StageGroup& group, int64_t total_tokens) {
  flush_chunk();
  if (group.size() > 1) group.sum(sum_.data(), static_cast<int64_t>(sum_.size()));
  const double scale = 2.0 / static_cast<double>(total_tokens);
  std::vector<float> h(sum_.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(sum_[i] * scale);
  return h;
}

}  // namespace pipequant
