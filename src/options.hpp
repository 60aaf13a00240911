#pragma once
// The options of the quantize and eval commands as typed values. The CLI (src/cli.cpp) parses and checks them
// once; everything past it reads these types and never a string to compare.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/transport_kind.hpp"
#include "base/error.hpp"
#include "src/quant.hpp"

namespace pipequant {

// How each block's calibration inputs are obtained (docs/design.md section 2).
enum class Propagation {
  kQuantized,  // block i+1 sees the outputs of the already-quantized block i (the GPTQ paper's)
  kFp,         // block inputs come from the unquantized model: every stage works at once
};

enum class BackendKind { kAuto, kCpu, kCuda };

// Which tokens each expert's Hessian sees (docs/design.md section 4).
enum class MoeCalibration {
  kRouted,  // the tokens the router sends to it (an expert with fewer than --moe-min-tokens: all tokens)
  kAll,     // every token, whatever the router picks (the block's output is still the routed mixture)
};

// The GEMMs of the block forward: the checkpoint's 16-bit dtype on the cuda backend (auto), or as named.
enum class ComputeDtype { kAuto, kFp32, kBf16, kFp16 };

// The spellings of the command line ("quantized", "cuda", "bf16", ...), also used in reports.
const char* name(Propagation p);
const char* name(BackendKind b);
const char* name(ComputeDtype d);
const char* name(Method m);
const char* name(MoeCalibration m);

// Every value of each enum, in the order help texts and error messages list their spellings.
inline constexpr std::array kMethods{Method::kGptq, Method::kRtn, Method::kAwq};
inline constexpr std::array kPropagations{Propagation::kQuantized, Propagation::kFp};
inline constexpr std::array kMoeCalibrations{MoeCalibration::kRouted, MoeCalibration::kAll};
inline constexpr std::array kBackendKinds{BackendKind::kAuto, BackendKind::kCpu, BackendKind::kCuda};
inline constexpr std::array kComputeDtypes{ComputeDtype::kAuto, ComputeDtype::kFp32, ComputeDtype::kBf16,
                                           ComputeDtype::kFp16};

// The spellings of `values` joined by `sep`, the last two by `last_sep`: "auto | cpu | cuda", "auto, cpu or cuda".
template <typename E, size_t N>
std::string spellings(const std::array<E, N>& values, const char* sep, const char* last_sep) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += std::string(i == 0 ? "" : i + 1 == N ? last_sep : sep) + name(values[i]);
  return s;
}

// The one of `values` spelled `text`; throws UserError "--backend: expected auto, cpu or cuda, got 'x'" (for
// option "--backend") when none is.
template <typename E, size_t N>
E parse_enum(const std::string& option, const std::string& text, const std::array<E, N>& values) {
  for (const E v : values)
    if (text == name(v)) return v;
  fail(option, ": expected ", spellings(values, ", ", " or "), ", got '", text, "'");
}

struct RunOptions {
  BackendKind backend = BackendKind::kAuto;
  int threads = 0;          // CPU threads, 0 = the node's cores shared by its ranks
  int64_t micro_batch = 4;  // samples per forward call
  double gpu_mem_gb = 0.0;  // CUDA allocator budget per rank in GB (1e9 bytes); 0 = free memory less a margin
  ComputeDtype compute_dtype = ComputeDtype::kAuto;
  comm::TransportKind transport = comm::TransportKind::kAuto;  // activations between stages (quantize)
};

// An expert routed fewer calibration tokens than this gets the all-token Hessian instead (--moe-min-tokens).
inline constexpr int64_t kDefaultMoeMinTokens = 128;

struct QuantizeOptions {
  std::string model_dir;
  std::string calib_path;
  std::string out_dir;
  int64_t seq_len = 2048;
  int64_t nsamples = 0;  // 0: all windows of the file, at most 128
  QuantConfig quant;
  Propagation propagation = Propagation::kQuantized;
  MoeCalibration moe_calibration = MoeCalibration::kRouted;
  int64_t moe_min_tokens = kDefaultMoeMinTokens;
  bool overwrite = false;
  std::string metrics_path;
  int ranks_per_stage = 1;       // D: ranks of one stage group (world = P stages x D)
  std::string blocks_per_stage;  // "" = balance by bytes; "N" or "a,b,c"
  bool dry_run = false;          // print the plan and stop
  // fp propagation keeps a stage's blocks in host memory when their fp32 copies (counted as twice the source
  // bytes) fit this, and streams them one at a time otherwise
  uint64_t fp_resident_bytes = uint64_t{16} * 1000 * 1000 * 1000;
  RunOptions run;
  double host_mem_gb = 0.0;  // host memory per rank the plan must fit, GB (1e9 bytes); 0 = not checked

  // The command line as JSON, stored in model.h5 (inputs and every option that changes the result).
  std::string args_json;
  // The options that change the result (declared so beside each option in the CLI), as JSON: the arguments
  // part of the resume fingerprint. Input paths are not among them (their contents are fingerprinted).
  std::string fingerprint_args_json;
};

// `pipequant plan`: the layout and calibration shape quantize would run with, and the budgets to check them against.
struct PlanOptions {
  std::string model_dir;
  int world = 1;                 // ranks of the job planned for (P stages x D)
  int ranks_per_stage = 1;       // D
  std::string blocks_per_stage;  // "" = balance by bytes; "N" or "a,b,c"
  int64_t seq_len = 2048;
  int64_t nsamples = 128;  // calibration samples of the whole job
  Propagation propagation = Propagation::kQuantized;
  uint64_t fp_resident_bytes = uint64_t{16} * 1000 * 1000 * 1000;  // as QuantizeOptions::fp_resident_bytes
  RunOptions run;            // backend, micro_batch, gpu_mem_gb and compute_dtype (threads are not planned)
  double host_mem_gb = 0.0;  // as QuantizeOptions::host_mem_gb
  int64_t group_size = 128;  // quantization groups (the solve's tables)
  bool json = false;         // one JSON object instead of the table
  bool verbose = false;      // each stage's memory terms too
};

struct EvalOptions {
  std::string model_dir;
  std::string quantized_dir;  // empty: the original checkpoint
  std::string tokens_path;
  int64_t seq_len = 2048;
  int64_t max_windows = 0;  // 0: all
  RunOptions run;
};

}  // namespace pipequant
