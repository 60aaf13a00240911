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

std::vector<float> HessianAccumulator::finish(MPI_Comm comm, int64_t total_tokens) {
  flush_chunk();
  int size = 1;
  if (comm != MPI_COMM_NULL) MPI_Comm_size(comm, &size);
  if (size > 1) {
    // reduce to the stage root then broadcast, so that every member holds the same bits
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    std::vector<double> total(rank == 0 ? sum_.size() : 0);
    MPI_Reduce(sum_.data(), rank == 0 ? total.data() : nullptr, static_cast<int>(sum_.size()), MPI_DOUBLE, MPI_SUM, 0,
               comm);
    if (rank == 0) sum_.swap(total);
    MPI_Bcast(sum_.data(), static_cast<int>(sum_.size()), MPI_DOUBLE, 0, comm);
  }
  const double scale = 2.0 / static_cast<double>(total_tokens);
  std::vector<float> h(sum_.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(sum_[i] * scale);
  return h;
}

std::pair<int64_t, int64_t> owned_samples(int64_t samples, int index, int ranks) {
  const int64_t chunks = (samples + kHessianChunk - 1) / kHessianChunk;
  const int64_t c0 = chunks * index / ranks;
  const int64_t c1 = chunks * (index + 1) / ranks;
  return {std::min(samples, c0 * kHessianChunk), std::min(samples, c1 * kHessianChunk)};
}

}  // namespace pipequant
