#include "src/driver_util.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "comm/mpi_env.hpp"

namespace pipequant {

namespace {

kernels::DeviceShare rank_device(const comm::NodeRanks& node) {
  const int devices = kernels::cuda_device_count();
  return devices > 0 ? kernels::device_share(node.local_rank, node.local_size, devices) : kernels::DeviceShare{};
}

}  // namespace

kernels::DeviceShare rank_device() { return rank_device(comm::node_ranks()); }

std::unique_ptr<kernels::Backend> make_backend(const RunOptions& run) {
  // the ranks on this node share its cores, and take its GPUs round-robin by local rank
  const comm::NodeRanks node = comm::node_ranks();
  const int threads = run.threads > 0 ? run.threads : std::max(1, omp_get_num_procs() / node.local_size);
  const auto budget = static_cast<size_t>(run.gpu_mem_gb * 1e9);
  const auto cuda = [&] {
    // ranks sharing a GPU split its memory (kernels/device_policy.hpp)
    const kernels::DeviceShare share = rank_device(node);
    auto backend = kernels::make_cuda_backend(share.device, budget, share.sharing);
    // solves whose Hessian does not fit the budget run on the host (docs/design.md section 4, fallback 3)
    backend->set_host_fallback(kernels::make_cpu_backend(threads));
    return backend;
  };
  switch (run.backend) {
    case BackendKind::kCpu:
      return kernels::make_cpu_backend(threads);
    case BackendKind::kCuda:
      return cuda();
    case BackendKind::kAuto:
      break;
  }
  if (kernels::cuda_device_count() > 0) return cuda();
  return kernels::make_cpu_backend(threads);
}

comm::TransportKind transport_for(const RunOptions& run, const kernels::Backend& backend,
                                  const kernels::DeviceShare& gpu) {
  int owns = backend.name() == "cuda" && gpu.sharing == 1 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &owns, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return comm::choose_transport(run.transport, owns == 1);
}

std::unique_ptr<comm::ActivationTransport> make_transport(const RunOptions& run, const kernels::Backend& backend,
                                                          const comm::StageLayout& layout) {
  const kernels::DeviceShare gpu = rank_device();
  if (transport_for(run, backend, gpu) == comm::TransportKind::kNccl)
    return comm::make_nccl_transport(layout, gpu.device);
  return comm::make_mpi_transport(layout);
}

std::optional<kernels::HalfFormat> forward_format(const RunOptions& run, const kernels::Backend& backend,
                                                  const io::ModelConfig& config) {
  switch (run.compute_dtype) {
    case ComputeDtype::kFp32:
      return std::nullopt;
    case ComputeDtype::kBf16:
      return kernels::HalfFormat::kBF16;
    case ComputeDtype::kFp16:
      return kernels::HalfFormat::kF16;
    case ComputeDtype::kAuto:
      break;
  }
  // the CPU backend is the fp32 reference; on a GPU the checkpoint's own 16-bit dtype runs on tensor cores
  if (backend.name() != "cuda") return std::nullopt;
  if (config.torch_dtype == "bfloat16") return kernels::HalfFormat::kBF16;
  if (config.torch_dtype == "float16") return kernels::HalfFormat::kF16;
  return std::nullopt;
}

std::string format_name(std::optional<kernels::HalfFormat> half) {
  if (!half) return "fp32";
  return *half == kernels::HalfFormat::kBF16 ? "bf16" : "fp16";
}

void Fingerprint::add(const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    h_ ^= p[i];
    h_ *= 1099511628211ull;
  }
}

std::string Fingerprint::hex() const {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h_));
  return buf;
}

void prepare_out_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  PQ_REQUIRE(!ec && std::filesystem::is_directory(dir), "--out ", dir, ": cannot create the output directory (",
             ec ? ec.message() : "not a directory", ")");
  const std::string probe = dir + "/.pipequant-write-test";
  {
    std::ofstream f(probe);
    PQ_REQUIRE(f.good(), "--out ", dir, ": the output directory is not writable");
  }
  std::filesystem::remove(probe, ec);
}

io::DenseTensor dense_from_checkpoint(const io::Checkpoint& ckpt, const std::string& name, const std::string& as) {
  const auto& info = ckpt.info(name);
  ckpt.require_finite(name);
  const auto raw = ckpt.raw(name);
  io::DenseTensor t;
  t.name = as;
  t.dtype = io::dtype_name(info.dtype);
  t.shape = info.shape;
  t.bytes.assign(reinterpret_cast<const char*>(raw.data()), reinterpret_cast<const char*>(raw.data()) + raw.size());
  ckpt.release(name);  // the copy is what is kept
  return t;
}

void propagate(BlockRunner& runner, std::vector<float>& x, int64_t samples, int64_t hidden) {
  std::vector<float> next(x.size());
  const int64_t seq = runner.seq();
  for_each_micro_batch(runner, x.data(), samples, hidden, Until::kOutput,
                       [&](int64_t s0, int64_t n, const float* acts) {
                         runner.backend().download(next.data() + s0 * seq * hidden, acts,
                                                   static_cast<size_t>(n * seq * hidden) * sizeof(float));
                       });
  x.swap(next);
}

void require_finite_activations(const std::vector<float>& x, int64_t b, int64_t first_sample, int64_t seq,
                                int64_t hidden, const char* sample_word) {
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t i = first_non_finite(x.data(), n);
  if (i == n) return;
  const float v = x[static_cast<size_t>(i)];
  fail("block ", b, ": its output holds ", non_finite_name(v), " at ", sample_word, " ",
       first_sample + i / (seq * hidden), ", token ", i / hidden % seq, ", channel ", i % hidden,
       " from finite inputs: the forward overflows float32 in this block (every checkpoint value is finite)");
}

void require_finite_hessian(const std::vector<float>& h, int64_t width, int64_t b, const std::string& modules) {
  const int64_t i = first_non_finite(h.data(), static_cast<int64_t>(h.size()));
  if (i == static_cast<int64_t>(h.size())) return;
  fail("block ", b, ": the Hessian of the inputs of ", modules, " holds ", non_finite_name(h[i]), " at [", i / width,
       ", ", i % width, "]: the activations overflow float32 in this block (every checkpoint value is finite); the "
       "model cannot be quantized as it is");
}

}  // namespace pipequant
