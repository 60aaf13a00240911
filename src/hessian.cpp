#include "src/hessian.hpp"

#include <algorithm>

#include "base/error.hpp"

namespace pipequant {

namespace {
// Host staging of a device partial, in pieces of this many floats (64 MB).
inline constexpr int64_t kPieceFloats = int64_t{1} << 24;
}  // namespace

HessianAccumulator::HessianAccumulator(kernels::Backend& backend, int64_t width)
    : backend_(backend), width_(width), host_(backend.host_memory()) {
  if (host_)
    host_partial_.assign(static_cast<size_t>(width * width), 0.0f);
  else
    device_partial_ = kernels::Buffer<float>(backend, width * width);
  if (!host_) zero_partial();
}

void HessianAccumulator::zero_partial() {
  if (host_) {
    std::fill(host_partial_.begin(), host_partial_.end(), 0.0f);
    return;
  }
  const int64_t n = width_ * width_;
  const std::vector<float> zeros(static_cast<size_t>(std::min(n, kPieceFloats)), 0.0f);
  for (int64_t i = 0; i < n; i += kPieceFloats)
    backend_.upload(device_partial_.data() + i, zeros.data(), sizeof(float) * static_cast<size_t>(std::min(kPieceFloats, n - i)));
}

void HessianAccumulator::add_partial_to_sum() {
  const int64_t n = width_ * width_;
  if (sum_.empty()) sum_.assign(static_cast<size_t>(n), 0.0);
  if (host_) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) sum_[static_cast<size_t>(i)] += static_cast<double>(host_partial_[static_cast<size_t>(i)]);
    return;
  }
  std::vector<float> piece(static_cast<size_t>(std::min(n, kPieceFloats)));
  for (int64_t i0 = 0; i0 < n; i0 += kPieceFloats) {
    const int64_t m = std::min(kPieceFloats, n - i0);
    backend_.download(piece.data(), device_partial_.data() + i0, sizeof(float) * static_cast<size_t>(m));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i) sum_[static_cast<size_t>(i0 + i)] += static_cast<double>(piece[static_cast<size_t>(i)]);
  }
}

void HessianAccumulator::add_sample(const float* acts, int64_t seq, int64_t sample) {
  const int64_t chunk = sample / kHessianChunk;
  PQ_ASSERT(chunk >= chunk_, "samples out of order: ", sample);
  if (chunk != chunk_ && chunk_ >= 0) {  // a new chunk: the finished one goes into the fp64 sum
    add_partial_to_sum();
    zero_partial();
  }
  chunk_ = chunk;
  backend_.hessian_accumulate(acts, seq, width_, partial());
}

std::vector<float> HessianAccumulator::finish(const comm::StageGroup& group, int64_t total_tokens) {
  const double scale = 2.0 / static_cast<double>(total_tokens);
  const int64_t n = width_ * width_;
  std::vector<float> h;
  if (sum_.empty() && group.size() == 1) {
    // one chunk on one rank: the partial is the sum (its fp64 sum would hold the same values)
    if (host_) {
      h = std::move(host_partial_);
    } else {
      h.resize(static_cast<size_t>(n));
      backend_.download(h.data(), device_partial_.data(), sizeof(float) * static_cast<size_t>(n));
      device_partial_.reset();
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) h[static_cast<size_t>(i)] = static_cast<float>(static_cast<double>(h[static_cast<size_t>(i)]) * scale);
    return h;
  }
  if (chunk_ >= 0) add_partial_to_sum();
  if (sum_.empty()) sum_.assign(static_cast<size_t>(n), 0.0);
  host_partial_ = std::vector<float>();
  device_partial_.reset();
  if (group.size() > 1) group.sum(sum_.data(), n);
  h.resize(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) h[static_cast<size_t>(i)] = static_cast<float>(sum_[static_cast<size_t>(i)] * scale);
  sum_ = std::vector<double>();
  return h;
}

uint64_t HessianAccumulator::peak_bytes(int64_t width, int64_t chunks, int members) {
  const auto entries = static_cast<uint64_t>(width) * static_cast<uint64_t>(width);
  return chunks <= 1 && members == 1 ? entries * sizeof(float) : entries * (sizeof(float) + sizeof(double));
}

}  // namespace pipequant
