#include "src/cli.hpp"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "base/timing.hpp"
#include "comm/stage.hpp"
#include "io/npy.hpp"
#include "io/shard.hpp"
#include "src/bench_gptq.hpp"
#include "src/bench_hdf5.hpp"
#include "src/driver_util.hpp"
#include "src/export.hpp"
#include "src/inspect.hpp"
#include "src/pipeline.hpp"
#include "src/planner.hpp"
#include "src/quant.hpp"
#include "src/synth.hpp"
#include "src/version.hpp"

namespace po = boost::program_options;

namespace pipequant {

namespace {

using Args = std::vector<std::string>;  // the words after the command

const char* kUsage =
    "usage: pipequant <command> [options]   (pipequant <command> --help for its options)\n"
    "commands:\n"
    "  quantize      quantize a Llama checkpoint (GPTQ, AWQ or RTN) into packed HDF5 shards\n"
    "  eval          perplexity of a checkpoint (also GPTQ/AWQ ones), or of a quantized output\n"
    "  inspect OUT   table of the blocks and linears of a quantized output, checksums verified\n"
    "  export OUT    a Hugging Face GPTQ or AWQ checkpoint directory from a quantized output\n"
    "  plan          the stages and memory per rank of a quantize run, for any world size (one process)\n"
    "  layer         quantize one matrix W [out, in] with inputs X [tokens, in]\n"
    "  synth         write a synthetic Llama checkpoint with deterministic random weights\n"
    "  synth-tokens  write a synthetic token file (.npy int32)\n"
    "  bench gptq    benchmark the GPTQ solve\n"
    "  bench hessian  Hessian accumulation rate next to the sgemm rate\n"
    "  bench transport  activation transport bandwidth between two ranks (nccl-tests style table)\n"
    "  bench hdf5    shard write bandwidth, every rank its slice (IOR style table)\n"
    "  version       print the version\n";

// What an option is to the output of a run. Every option declares it where it is added, so that a new option
// cannot change the resume fingerprint unnoticed, nor change the output without being fingerprinted. Only
// quantize records and fingerprints options; the other commands declare roles too, as they share options with it.
enum class Role {
  kResult,  // changes the packed output: fingerprinted, and recorded in model.h5
  kInput,   // an input path: recorded in model.h5, not fingerprinted (its content is)
  kRun,     // layout, performance, where the output goes: neither
};

struct Command {
  std::string name;
  po::options_description desc;
  po::positional_options_description positional;
  po::variables_map vm;
  std::map<std::string, Role> roles;  // the role of each option of desc, by its long name

  explicit Command(const std::string& n) : name(n), desc("pipequant " + n + " options") {}

  // Adds an option with a value and its role; returns *this, to chain as po's add_options() does.
  Command& add(const char* option, Role role, const po::value_semantic* value, const std::string& help) {
    desc.add_options()(option, value, help.c_str());
    roles[desc.options().back()->long_name()] = role;
    return *this;
  }
  // Adds an option without a value (--help).
  Command& add(const char* option, Role role, const std::string& help) {
    desc.add_options()(option, help.c_str());
    roles[desc.options().back()->long_name()] = role;
    return *this;
  }
};

// Boost.Program_options (1.74) words an error by replacing each placeholder (%value%, ...) with the offending text
// until none is left, so text that holds the placeholder itself makes what() loop forever. It is refused first.
void refuse_placeholders(const std::string& text, const std::string& where) {
  for (const char* token :
       {"%canonical_option%", "%option%", "%original_token%", "%prefix%", "%value%", "%invalid_line%"})
    PQ_REQUIRE(text.find(token) == std::string::npos, where, ": '", token,
               "' is not allowed in options (the option parser's error messages use it as a placeholder)");
}

// Parses args and the optional --config file; true when --help was asked.
bool parse(Command& cmd, const Args& args) {
  cmd.add("help,h", Role::kRun, "show this help")
      .add("config", Role::kRun, po::value<std::string>(), "read options from FILE (`name = value` lines)");
  for (const auto& a : args) refuse_placeholders(a, "pipequant " + cmd.name);
  try {
    po::store(po::command_line_parser(args).options(cmd.desc).positional(cmd.positional).run(), cmd.vm);
    if (cmd.vm.count("config")) {
      const std::string path = cmd.vm["config"].as<std::string>();
      // a FIFO would block the open and /dev/zero would never end: only regular files of option lines
      std::error_code ec;
      PQ_REQUIRE(std::filesystem::is_regular_file(path, ec), "--config ", path, ": not found or not a regular file");
      constexpr uintmax_t kMaxConfigBytes = 1 << 20;
      const uintmax_t bytes = std::filesystem::file_size(path, ec);
      PQ_REQUIRE(!ec, "--config ", path, ": cannot read its size");
      PQ_REQUIRE(bytes <= kMaxConfigBytes, "--config ", path, ": ", bytes, " bytes, more than the ", kMaxConfigBytes,
                 " a file of options may have");
      std::ifstream f(path);
      PQ_REQUIRE(f.good(), "--config ", path, ": cannot open the file");
      const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      refuse_placeholders(text, "--config " + path);
      std::istringstream lines(text);
      try {
        po::store(po::parse_config_file(lines, cmd.desc), cmd.vm);
      } catch (const po::error& e) {
        fail("pipequant ", cmd.name, ": --config ", path, ": ", e.what(), " (names as in pipequant ", cmd.name,
             " --help, without the dashes)");
      }
    }
    if (cmd.vm.count("help")) return true;
    po::notify(cmd.vm);
  } catch (const po::error& e) {
    fail("pipequant ", cmd.name, ": ", e.what(), " (see pipequant ", cmd.name, " --help)");
  }
  return false;
}

void print_help(const Command& cmd) {
  if (world_rank() == 0) std::cout << cmd.desc << std::endl;
}

template <typename T>
T required(const po::variables_map& vm, const std::string& name, const std::string& command) {
  PQ_REQUIRE(vm.count(name), "pipequant ", command, ": the option '--", name, "' is required (see pipequant ", command,
             " --help)");
  return vm[name].as<T>();
}

// "gptq | rtn": the values of an enum option, for its help.
template <typename E, size_t N>
std::string choices(const std::array<E, N>& values) {
  return spellings(values, " | ", " | ");
}

// The value of an enum option (a string to Boost), checked against the spellings of `values`.
template <typename E, size_t N>
E enum_option(const po::variables_map& vm, const std::string& option, const std::array<E, N>& values) {
  return parse_enum("--" + option, vm[option].as<std::string>(), values);
}

// An option in GB (1e9 bytes): finite and in [0, 1e9] (an exabyte), so that its byte count is a uint64 (a cast
// from inf or 1e300 would be undefined).
double gb_option(const po::variables_map& vm, const std::string& option) {
  const double gb = vm[option].as<double>();
  PQ_REQUIRE(std::isfinite(gb) && gb >= 0.0 && gb <= 1e9, "--", option, " must be >= 0 and at most 1e9 (GB), got ", gb);
  return gb;
}

// A parsed option's value as JSON.
nlohmann::json json_value(const std::string& option, const boost::any& v) {
  if (const auto* s = boost::any_cast<std::string>(&v)) return *s;
  if (const auto* i = boost::any_cast<int>(&v)) return *i;
  if (const auto* l = boost::any_cast<int64_t>(&v)) return *l;
  if (const auto* d = boost::any_cast<double>(&v)) return *d;
  if (const auto* b = boost::any_cast<bool>(&v)) return *b;
  PQ_ASSERT(false, "option --", option, ": a value type json_value does not write");
  return nullptr;
}

// The options of the given roles that have a value (given, or by default), as JSON by option name.
nlohmann::json options_json(const Command& cmd, std::initializer_list<Role> roles) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [option, value] : cmd.vm)
    if (std::find(roles.begin(), roles.end(), cmd.roles.at(option)) != roles.end())
      j[option] = json_value(option, value.value());
  return j;
}

// JSON text of recorded options. Paths are bytes, not always UTF-8: an invalid byte is written as U+FFFD instead of
// making dump() throw (nlohmann's type_error 316).
std::string json_text(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void add_quant_options(Command& cmd) {
  cmd.add("method", Role::kResult, po::value<std::string>()->default_value("gptq"), choices(kMethods))
      .add("bits", Role::kResult, po::value<int>()->default_value(4), "bits per weight: 2, 3, 4 or 8")
      .add("group-size", Role::kResult, po::value<int64_t>()->default_value(128),
           "input channels per group; -1 = one group per row")
      .add("sym", Role::kResult, po::bool_switch(), "symmetric grid (default asymmetric)")
      .add("act-order", Role::kResult, po::bool_switch(), "process columns by decreasing Hessian diagonal")
      .add("static-groups", Role::kResult, po::bool_switch(),
           "with --act-order: groups fixed in natural order before the solve")
      .add("damp", Role::kResult, po::value<double>()->default_value(0.01), "damping, relative to mean(diag(H))")
      .add("damp-retries", Role::kResult, po::value<int>()->default_value(QuantConfig{}.damp_retries),
           "times the damping is multiplied by 10 when the Cholesky fails, before falling back to RTN")
      .add("block-size", Role::kResult, po::value<int64_t>()->default_value(128), "GPTQ lazy-update block width");
}

QuantConfig quant_config(const po::variables_map& vm) {
  QuantConfig q;
  q.method = enum_option(vm, "method", kMethods);
  q.bits = vm["bits"].as<int>();
  q.group_size = vm["group-size"].as<int64_t>();
  q.sym = vm["sym"].as<bool>();
  q.act_order = vm["act-order"].as<bool>();
  q.static_groups = vm["static-groups"].as<bool>();
  q.damp = vm["damp"].as<double>();
  q.damp_retries = vm["damp-retries"].as<int>();
  q.block_size = vm["block-size"].as<int64_t>();
  validate(q);
  return q;
}

void add_run_options(Command& cmd) {
  cmd.add("backend", Role::kRun, po::value<std::string>()->default_value("auto"), choices(kBackendKinds))
      .add("threads", Role::kRun, po::value<int>()->default_value(0),
           "CPU threads per rank (0 = the node's cores shared by its ranks)")
      .add("micro-batch", Role::kRun, po::value<int64_t>()->default_value(4), "samples per forward call")
      .add("gpu-mem", Role::kRun, po::value<double>()->default_value(0.0),
           "CUDA device memory budget per rank in GB (1e9 bytes); 0 = what is free, less a margin")
      // 16-bit GEMMs round differently from fp32 ones: the dtype changes the output
      .add("compute-dtype", Role::kResult, po::value<std::string>()->default_value("auto"),
           "GEMMs of the block forward: " + choices(kComputeDtypes) +
               " (auto: the checkpoint's bf16/fp16 on cuda, fp32 on cpu)");
}

RunOptions run_options(const po::variables_map& vm) {
  RunOptions r;
  r.backend = enum_option(vm, "backend", kBackendKinds);
  r.threads = vm["threads"].as<int>();
  r.micro_batch = vm["micro-batch"].as<int64_t>();
  r.gpu_mem_gb = gb_option(vm, "gpu-mem");
  r.compute_dtype = enum_option(vm, "compute-dtype", kComputeDtypes);
  PQ_REQUIRE(r.micro_batch > 0, "--micro-batch must be positive, got ", r.micro_batch);
  PQ_REQUIRE(r.threads >= 0, "--threads must be >= 0, got ", r.threads);
  return r;
}

void add_quantize_options(Command& cmd) {
  cmd.add("model", Role::kInput, po::value<std::string>(), "checkpoint directory (config.json, *.safetensors)")
      .add("calib", Role::kInput, po::value<std::string>(), "calibration tokens (.npy int32/int64, [N, L] or flat)")
      .add("seq-len", Role::kResult, po::value<int64_t>(), "tokens per calibration sample")
      .add("nsamples", Role::kResult, po::value<int64_t>()->default_value(0),
           "calibration samples (0 = all windows, at most 128)")
      .add("out", Role::kRun, po::value<std::string>(), "output directory")
      .add("propagation", Role::kResult, po::value<std::string>()->default_value("quantized"),
           choices(kPropagations) +
               " (quantized: block i+1 sees quantized block i; fp: inputs from the unquantized model)")
      // no defaults on the command line: absent, they stay out of the recorded arguments, and outputs of dense
      // models written before they existed still resume
      .add("moe-calibration", Role::kResult, po::value<std::string>(),
           choices(kMoeCalibrations) +
               " (default routed; Mixture-of-Experts: each expert's Hessian from the tokens routed to it, or from "
               "every token)")
      .add("moe-min-tokens", Role::kResult, po::value<int64_t>(),
           "default " + std::to_string(kDefaultMoeMinTokens) +
               "; --moe-calibration routed: an expert routed fewer calibration tokens (over the whole job) gets the "
               "all-token Hessian; the report and inspect name it")
      .add("overwrite", Role::kRun, po::bool_switch(), "replace an existing output")
      .add("metrics", Role::kRun, po::value<std::string>(), "write JSON-lines metrics to FILE")
      .add("ranks-per-stage", Role::kRun, po::value<int>()->default_value(1),
           "D: ranks per pipeline stage (world = P stages x D; a Mixture-of-Experts block's experts are spread "
           "over them)")
      .add("blocks-per-stage", Role::kRun, po::value<std::string>()->default_value(""),
           "blocks of each stage: N, or a,b,c (default: balanced by weight bytes)")
      .add("dry-run", Role::kRun, po::bool_switch(), "print the plan and stop")
      .add("fp-resident-gb", Role::kRun, po::value<double>()->default_value(16.0),
           "--propagation fp: keep the stage's blocks in host memory when their fp32 copies fit this many GB per "
           "rank (every micro-batch flows through them as it arrives); above it, stream the blocks one at a time")
      .add("host-mem", Role::kRun, po::value<double>()->default_value(0.0),
           "host memory per rank in GB (1e9 bytes): refuse before any work a plan that needs more; 0 = not checked")
      .add("transport", Role::kRun, po::value<std::string>()->default_value("auto"),
           "activations between stages: auto, nccl or mpi (auto: nccl where every rank has a GPU of its own on the "
           "cuda backend, mpi otherwise; the output is the same bits either way)");
  add_quant_options(cmd);
  add_run_options(cmd);
}

QuantizeOptions quantize_options(const Command& cmd) {
  const po::variables_map& vm = cmd.vm;
  QuantizeOptions o;
  o.model_dir = required<std::string>(vm, "model", cmd.name);
  o.calib_path = required<std::string>(vm, "calib", cmd.name);
  o.seq_len = required<int64_t>(vm, "seq-len", cmd.name);
  o.out_dir = required<std::string>(vm, "out", cmd.name);
  o.nsamples = vm["nsamples"].as<int64_t>();
  PQ_REQUIRE(o.seq_len > 0, "--seq-len must be positive, got ", o.seq_len);
  PQ_REQUIRE(o.nsamples >= 0, "--nsamples must be >= 0, got ", o.nsamples);
  o.quant = quant_config(vm);
  o.propagation = enum_option(vm, "propagation", kPropagations);
  if (vm.count("moe-calibration")) o.moe_calibration = enum_option(vm, "moe-calibration", kMoeCalibrations);
  if (vm.count("moe-min-tokens")) o.moe_min_tokens = vm["moe-min-tokens"].as<int64_t>();
  PQ_REQUIRE(o.moe_min_tokens >= 1, "--moe-min-tokens must be at least 1, got ", o.moe_min_tokens);
  o.overwrite = vm["overwrite"].as<bool>();
  if (vm.count("metrics")) o.metrics_path = vm["metrics"].as<std::string>();
  o.run = run_options(vm);
  o.ranks_per_stage = vm["ranks-per-stage"].as<int>();
  o.blocks_per_stage = vm["blocks-per-stage"].as<std::string>();
  o.dry_run = vm["dry-run"].as<bool>();
  o.fp_resident_bytes = static_cast<uint64_t>(gb_option(vm, "fp-resident-gb") * 1e9);
  o.host_mem_gb = gb_option(vm, "host-mem");
  o.run.transport = comm::transport_from_name(vm["transport"].as<std::string>());
  o.args_json = json_text(options_json(cmd, {Role::kResult, Role::kInput}));
  o.fingerprint_args_json = json_text(options_json(cmd, {Role::kResult}));
  return o;
}

int cmd_quantize(const Args& args) {
  if (const auto options = parse_quantize_options(args)) run_quantize(*options);
  return 0;
}

void add_plan_options(Command& cmd) {
  cmd.add("model", Role::kInput, po::value<std::string>(), "checkpoint directory (config.json, *.safetensors)")
      .add("world", Role::kRun, po::value<int>()->default_value(world_size()),
           "ranks of the quantize job planned for (default: the ranks running this)")
      .add("ranks-per-stage", Role::kRun, po::value<int>()->default_value(1),
           "D: ranks per pipeline stage (world = P stages x D)")
      .add("blocks-per-stage", Role::kRun, po::value<std::string>()->default_value(""),
           "blocks of each stage: N, or a,b,c (default: balanced by weight bytes)")
      .add("seq-len", Role::kResult, po::value<int64_t>(), "tokens per calibration sample")
      .add("nsamples", Role::kResult, po::value<int64_t>()->default_value(128),
           "calibration samples of the job (quantize takes all windows of its file, at most 128)")
      .add("micro-batch", Role::kRun, po::value<int64_t>()->default_value(RunOptions{}.micro_batch),
           "samples per forward call")
      .add("propagation", Role::kResult, po::value<std::string>()->default_value("quantized"), choices(kPropagations))
      .add("fp-resident-gb", Role::kRun, po::value<double>()->default_value(16.0),
           "--propagation fp: the stage's blocks are kept in host memory when twice their source bytes fit this")
      .add("backend", Role::kRun, po::value<std::string>()->default_value("auto"),
           choices(kBackendKinds) + " (auto: cuda when this machine sees a device, as quantize decides)")
      .add("compute-dtype", Role::kResult, po::value<std::string>()->default_value("auto"),
           "GEMMs of the block forward: " + choices(kComputeDtypes) + " (16-bit: the weights on the device are 16-bit)")
      .add("gpu-mem", Role::kRun, po::value<double>()->default_value(0.0),
           "device memory per rank in GB (1e9 bytes), cuda backend: checked, and solves that do not fit it are "
           "planned on the host as quantize runs them; 0 = not checked")
      .add("host-mem", Role::kRun, po::value<double>()->default_value(0.0),
           "host memory per rank in GB (1e9 bytes) to check the plan against; 0 = not checked")
      .add("json", Role::kRun, po::bool_switch(), "print one JSON object instead of the table")
      .add("verbose", Role::kRun, po::bool_switch(), "print each stage's memory terms");
}

PlanOptions plan_options(const Command& cmd) {
  const po::variables_map& vm = cmd.vm;
  PlanOptions o;
  o.model_dir = required<std::string>(vm, "model", cmd.name);
  o.seq_len = required<int64_t>(vm, "seq-len", cmd.name);
  o.world = vm["world"].as<int>();
  o.ranks_per_stage = vm["ranks-per-stage"].as<int>();
  o.blocks_per_stage = vm["blocks-per-stage"].as<std::string>();
  o.nsamples = vm["nsamples"].as<int64_t>();
  o.propagation = enum_option(vm, "propagation", kPropagations);
  o.fp_resident_bytes = static_cast<uint64_t>(gb_option(vm, "fp-resident-gb") * 1e9);
  o.run.backend = enum_option(vm, "backend", kBackendKinds);
  o.run.compute_dtype = enum_option(vm, "compute-dtype", kComputeDtypes);
  o.run.micro_batch = vm["micro-batch"].as<int64_t>();
  o.run.gpu_mem_gb = gb_option(vm, "gpu-mem");
  o.host_mem_gb = gb_option(vm, "host-mem");
  o.json = vm["json"].as<bool>();
  o.verbose = vm["verbose"].as<bool>();
  PQ_REQUIRE(o.world > 0, "--world must be positive, got ", o.world);
  PQ_REQUIRE(o.seq_len > 0, "--seq-len must be positive, got ", o.seq_len);
  PQ_REQUIRE(o.nsamples > 0, "--nsamples must be positive, got ", o.nsamples);
  PQ_REQUIRE(o.run.micro_batch > 0, "--micro-batch must be positive, got ", o.run.micro_batch);
  return o;
}

// One process plans any world size from config.json and the safetensors headers (no tensor data is read); under
// mpirun only rank 0 prints. Exit code 1 when the plan does not fit --host-mem / --gpu-mem.
int cmd_plan(const Args& args) {
  if (const auto options = parse_plan_options(args)) return run_plan(*options, std::cout);
  return 0;
}

int cmd_eval(const Args& args) {
  Command cmd("eval");
  cmd.add("model", Role::kInput, po::value<std::string>(),
          "checkpoint directory (its config.json is used): unquantized, or a GPTQ or AWQ checkpoint "
          "(quantization_config), dequantized on load")
      .add("quantized", Role::kInput, po::value<std::string>(), "a quantized output directory, dequantized on the fly")
      .add("tokens", Role::kInput, po::value<std::string>(), "evaluation tokens (.npy int32/int64)")
      .add("seq-len", Role::kResult, po::value<int64_t>(), "tokens per non-overlapping window")
      .add("max-windows", Role::kResult, po::value<int64_t>()->default_value(0),
           "evaluate at most this many windows (0 = all)");
  add_run_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  EvalOptions o;
  o.model_dir = required<std::string>(cmd.vm, "model", cmd.name);
  o.tokens_path = required<std::string>(cmd.vm, "tokens", cmd.name);
  o.seq_len = required<int64_t>(cmd.vm, "seq-len", cmd.name);
  if (cmd.vm.count("quantized")) o.quantized_dir = cmd.vm["quantized"].as<std::string>();
  o.max_windows = cmd.vm["max-windows"].as<int64_t>();
  o.run = run_options(cmd.vm);
  run_eval(o);
  return 0;
}

int cmd_inspect(const Args& args) {
  Command cmd("inspect");
  cmd.add("out", Role::kInput, po::value<std::string>(), "quantized output directory");
  cmd.positional.add("out", 1);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  const std::string out = required<std::string>(cmd.vm, "out", cmd.name);
  if (world_rank() != 0) return 0;
  return run_inspect(out, std::cout);
}

int cmd_export(const Args& args) {
  Command cmd("export");
  cmd.add("out", Role::kInput, po::value<std::string>(), "quantized output directory (complete)")
      .add("to", Role::kRun, po::value<std::string>(), "checkpoint directory to write (must not exist or be empty)")
      .add("format", Role::kResult, po::value<std::string>(), choices(kExportFormats))
      .add("model", Role::kInput, po::value<std::string>(),
           "source model directory for the tokenizer files (default: the --model recorded in OUT/model.h5)")
      .add("checkpoint-format", Role::kResult, po::value<std::string>()->default_value("auto"),
           choices(kCheckpointFormats) + " (GPTQ zeros; gptq: zero - 1, gptq_v2: the zero, auto: gptq if it can)")
      .add("max-shard-gb", Role::kRun, po::value<double>()->default_value(5.0),
           "largest .safetensors file in GB (1e9 bytes); more files and an index beyond it")
      .add("overwrite", Role::kRun, po::bool_switch(), "replace a --to directory that is not empty");
  cmd.positional.add("out", 1);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  ExportOptions o;
  o.out_dir = required<std::string>(cmd.vm, "out", cmd.name);
  o.to_dir = required<std::string>(cmd.vm, "to", cmd.name);
  o.format = parse_enum("--format", required<std::string>(cmd.vm, "format", cmd.name), kExportFormats);
  o.checkpoint_format = enum_option(cmd.vm, "checkpoint-format", kCheckpointFormats);
  if (cmd.vm.count("model")) o.model_dir = cmd.vm["model"].as<std::string>();
  const double gb = gb_option(cmd.vm, "max-shard-gb");
  PQ_REQUIRE(gb > 0.0, "--max-shard-gb must be positive, got ", gb);
  o.max_shard_bytes = static_cast<uint64_t>(gb * 1e9);
  o.overwrite = cmd.vm["overwrite"].as<bool>();
  run_export(o);
  return 0;
}

// H = 2/n X^T X of the inputs X [tokens, in], accumulated on the backend.
std::vector<float> layer_hessian(kernels::Backend& backend, const io::Matrix& x) {
  kernels::Buffer<float> h_dev(backend, x.cols * x.cols);
  std::vector<float> h(static_cast<size_t>(x.cols * x.cols), 0.0f);
  backend.upload(h_dev.data(), h.data(), h.size() * 4);
  backend.hessian_accumulate(x.data.data(), x.rows, x.cols, h_dev.data());
  backend.download(h.data(), h_dev.data(), h.size() * 4);
  for (auto& v : h) v *= static_cast<float>(2.0 / static_cast<double>(x.rows));
  return h;
}

// Writes the packed layer to the HDF5 file `out` as linear "layer" of block 0.
void write_layer(const std::string& out, const QuantizedLinear& ql, const QuantConfig& q) {
  io::PackedLinear p = pack(ql, "layer", q);
  io::ShardWriter writer(out, MPI_COMM_SELF, false);
  writer.begin_block(0);
  writer.write_linear(0, p);
  writer.mark_complete(0);
  writer.close();
  std::printf("packed: %s:/blocks/0/layer\n", out.c_str());
}

int cmd_layer(const Args& args) {
  Command cmd("layer");
  cmd.add("weight", Role::kInput, po::value<std::string>(), "W.npy float32 [out, in]")
      .add("inputs", Role::kInput, po::value<std::string>(), "X.npy float32 [tokens, in]")
      .add("out", Role::kRun, po::value<std::string>(), "write the packed result to FILE (HDF5)")
      .add("threads", Role::kRun, po::value<int>()->default_value(0), "CPU threads (0 = all cores)");
  add_quant_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  const std::string wpath = required<std::string>(cmd.vm, "weight", cmd.name);
  const std::string xpath = required<std::string>(cmd.vm, "inputs", cmd.name);
  const QuantConfig q = quant_config(cmd.vm);
  PQ_REQUIRE(q.method != Method::kAwq,
             "layer: --method awq scales a linear's inputs, which only a whole block can fold "
             "into what precedes it; use `pipequant quantize --method awq`");
  const io::Matrix w = io::read_matrix_f32(wpath, "--weight");
  const io::Matrix x = io::read_matrix_f32(xpath, "--inputs");
  PQ_REQUIRE(x.cols == w.cols, xpath, ": shape [", x.rows, ", ", x.cols, "] does not match the weight ", wpath, " [",
             w.rows, ", ", w.cols, "]: expected [tokens, ", w.cols, "]");
  PQ_REQUIRE(x.rows > 0, xpath, ": no input rows");
  auto backend = kernels::make_cpu_backend(cmd.vm["threads"].as<int>());
  const auto t_h = Clock::now();
  const std::vector<float> h = layer_hessian(*backend, x);
  const double hessian_seconds = seconds_since(t_h);
  const QuantizedLinear ql = q.method == Method::kGptq
                                 ? gptq_quantize(*backend, w.data.data(), w.rows, w.cols, h.data(), q, "layer")
                                 : rtn_quantize(*backend, w.data.data(), w.rows, w.cols, h.data(), q);
  for (const auto& line : ql.log) std::printf("warning: %s\n", line.c_str());
  std::printf("shape: %lld x %lld (out x in), %lld tokens, %s %d-bit group %lld\n", static_cast<long long>(w.rows),
              static_cast<long long>(w.cols), static_cast<long long>(x.rows), name(q.method), q.bits,
              static_cast<long long>(q.group_size));
  std::printf("hessian_seconds: %.6f\n", hessian_seconds);
  std::printf("fallback: %s\n", name(ql.fallback));
  std::printf("relative_error: %.9g\n", ql.relative_error);
  std::printf("solve_seconds: %.6f\n", ql.solve_seconds);
  if (cmd.vm.count("out")) write_layer(cmd.vm["out"].as<std::string>(), ql, q);
  return 0;
}

// "1024,4096" as integers of at least `minimum`; throws UserError naming `flag` for an item that is not one.
std::vector<int64_t> parse_int_list(const std::string& list, const char* flag, int64_t minimum) {
  std::vector<int64_t> values;
  std::stringstream ss(list);
  for (std::string s; std::getline(ss, s, ',');) {
    if (s.empty()) continue;
    size_t used = 0;
    int64_t k = 0;
    try {
      k = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    PQ_REQUIRE(used == s.size() && k >= minimum, flag, ": '", s, "' is not ",
               minimum > 0 ? "a positive number" : "a non-negative integer");
    values.push_back(k);
  }
  return values;
}

// The architectures name of synth's --architecture, a model_type.
std::string synth_architecture(const std::string& word) {
  const std::string architecture = io::architecture_of_model_type(word);
  PQ_REQUIRE(!architecture.empty(),
             "synth: --architecture must be llama, mistral, qwen2, qwen3, mixtral, qwen2_moe or qwen3_moe, got '", word,
             "'");
  return architecture;
}

// synth's expert options (--num-experts, ...) into s.
void synth_expert_options(const po::variables_map& vm, SynthOptions& s) {
  s.num_experts = vm["num-experts"].as<int64_t>();
  s.experts_per_token = vm["experts-per-token"].as<int64_t>();
  s.moe_intermediate_size = vm["moe-intermediate-size"].as<int64_t>();
  s.norm_topk_prob = vm["norm-topk-prob"].as<bool>();
  s.mlp_only_layers = parse_int_list(vm["mlp-only-layers"].as<std::string>(), "--mlp-only-layers", 0);
  s.decoder_sparse_step = vm["decoder-sparse-step"].as<int64_t>();
  s.shared_expert_intermediate_size = vm["shared-expert-intermediate-size"].as<int64_t>();
}

int cmd_synth(const Args& args) {
  Command cmd("synth");
  cmd.add("out", Role::kRun, po::value<std::string>(), "output checkpoint directory")
      .add("hidden-size", Role::kResult, po::value<int64_t>(), "")
      .add("intermediate-size", Role::kResult, po::value<int64_t>(), "")
      .add("num-layers", Role::kResult, po::value<int64_t>(), "")
      .add("num-heads", Role::kResult, po::value<int64_t>(), "")
      .add("num-kv-heads", Role::kResult, po::value<int64_t>(), "")
      .add("vocab-size", Role::kResult, po::value<int64_t>(), "")
      .add("dtype", Role::kResult, po::value<std::string>()->default_value("bf16"), "bf16 | fp16 | fp32")
      .add("seed", Role::kResult, po::value<uint64_t>()->default_value(0), "random seed")
      .add("tie-word-embeddings", Role::kResult, po::bool_switch(), "no lm_head tensor; the embedding is reused")
      .add("architecture", Role::kResult, po::value<std::string>()->default_value("llama"),
           "llama | mistral | qwen2 | qwen3 | mixtral | qwen2_moe | qwen3_moe (qwen2: random biases on q/k/v_proj, as "
           "its attention has; qwen3: per-head q/k norms; the last three: experts, as the options below say)")
      .add("attention-bias", Role::kResult, po::bool_switch(), "random biases on q/k/v/o_proj (attention_bias true)")
      .add("mlp-bias", Role::kResult, po::bool_switch(), "random biases on gate/up/down_proj (mlp_bias true)")
      .add("num-experts", Role::kResult, po::value<int64_t>()->default_value(0),
           "experts per MoE block (mixtral, qwen2_moe, qwen3_moe)")
      .add("experts-per-token", Role::kResult, po::value<int64_t>()->default_value(0),
           "experts the router picks per token (num_experts_per_tok)")
      .add("moe-intermediate-size", Role::kResult, po::value<int64_t>()->default_value(0),
           "each expert's width (qwen2_moe, qwen3_moe; mixtral's is --intermediate-size)")
      .add("norm-topk-prob", Role::kResult, po::bool_switch(),
           "renormalize the top-k routing weights to sum 1 (qwen2_moe, qwen3_moe; mixtral always does)")
      .add("mlp-only-layers", Role::kResult, po::value<std::string>()->default_value(""),
           "comma-separated blocks with the dense MLP of width --intermediate-size (qwen2_moe, qwen3_moe)")
      .add("decoder-sparse-step", Role::kResult, po::value<int64_t>()->default_value(1),
           "experts in blocks b with (b + 1) % step == 0 (qwen2_moe, qwen3_moe)")
      .add("shared-expert-intermediate-size", Role::kResult, po::value<int64_t>()->default_value(0),
           "the shared expert's width (qwen2_moe)");
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  SynthOptions s;
  s.out_dir = required<std::string>(cmd.vm, "out", cmd.name);
  s.hidden_size = required<int64_t>(cmd.vm, "hidden-size", cmd.name);
  s.intermediate_size = required<int64_t>(cmd.vm, "intermediate-size", cmd.name);
  s.num_layers = required<int64_t>(cmd.vm, "num-layers", cmd.name);
  s.num_heads = required<int64_t>(cmd.vm, "num-heads", cmd.name);
  s.num_kv_heads = required<int64_t>(cmd.vm, "num-kv-heads", cmd.name);
  s.vocab_size = required<int64_t>(cmd.vm, "vocab-size", cmd.name);
  s.dtype = cmd.vm["dtype"].as<std::string>();
  s.seed = cmd.vm["seed"].as<uint64_t>();
  s.tie_word_embeddings = cmd.vm["tie-word-embeddings"].as<bool>();
  s.architecture = synth_architecture(cmd.vm["architecture"].as<std::string>());
  s.attention_bias = cmd.vm["attention-bias"].as<bool>();
  s.mlp_bias = cmd.vm["mlp-bias"].as<bool>();
  synth_expert_options(cmd.vm, s);
  if (world_rank() == 0) {
    write_synthetic_checkpoint(s);
    std::printf("synth: wrote %s (config.json, model.safetensors)\n", s.out_dir.c_str());
  }
  return 0;
}

int cmd_synth_tokens(const Args& args) {
  Command cmd("synth-tokens");
  cmd.add("out", Role::kRun, po::value<std::string>(), "output .npy file")
      .add("count", Role::kResult, po::value<int64_t>(), "number of tokens")
      .add("vocab-size", Role::kResult, po::value<int64_t>(), "vocabulary size")
      .add("seed", Role::kResult, po::value<uint64_t>()->default_value(0), "random seed");
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  const auto out = required<std::string>(cmd.vm, "out", cmd.name);
  const auto count = required<int64_t>(cmd.vm, "count", cmd.name);
  const auto vocab = required<int64_t>(cmd.vm, "vocab-size", cmd.name);
  PQ_REQUIRE(count > 0, "--count must be positive, got ", count);
  PQ_REQUIRE(vocab > 1, "--vocab-size must be > 1, got ", vocab);
  if (world_rank() == 0) {
    write_synthetic_tokens(out, count, vocab, cmd.vm["seed"].as<uint64_t>());
    std::printf("synth-tokens: wrote %s (%lld tokens)\n", out.c_str(), static_cast<long long>(count));
  }
  return 0;
}

int cmd_bench_transport(const Args& args) {
  Command cmd("bench transport");
  cmd.add("min-bytes", Role::kRun, po::value<int64_t>()->default_value(1024), "smallest message")
      .add("max-bytes", Role::kRun, po::value<int64_t>()->default_value(64 << 20), "largest message (sizes double)")
      .add("iters", Role::kRun, po::value<int>()->default_value(20), "timed iterations per size")
      .add("warmup", Role::kRun, po::value<int>()->default_value(5), "untimed iterations per size")
      .add("transport", Role::kRun, po::value<std::string>()->default_value("mpi"),
           "mpi, nccl, or auto (nccl where both ranks have a GPU of their own)");
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  PQ_REQUIRE(world_size() >= 2, "pipequant bench transport: needs 2 ranks (mpirun -np 2 pipequant bench transport)");
  const comm::TransportKind kind = comm::transport_from_name(cmd.vm["transport"].as<std::string>());
  RunOptions run;
  run.backend = kind == comm::TransportKind::kMpi ? BackendKind::kCpu : BackendKind::kAuto;
  run.transport = kind;
  const kernels::DeviceShare gpu = rank_device();
  const comm::TransportKind chosen = transport_for(run, *make_backend(run), gpu);
  std::string table;
  const int rc = comm::run_transport_benchmark(chosen, gpu.device, cmd.vm["min-bytes"].as<int64_t>(),
                                               cmd.vm["max-bytes"].as<int64_t>(), cmd.vm["iters"].as<int>(),
                                               cmd.vm["warmup"].as<int>(), table);
  if (world_rank() == 0) std::fputs(table.c_str(), stdout);
  return rc;
}

int cmd_bench_hdf5(const Args& args) {
  Command cmd("bench hdf5");
  cmd.add("dir", Role::kRun, po::value<std::string>()->default_value("."),
          "directory for the test file (on the file system to measure; removed afterwards)")
      .add("mib", Role::kRun, po::value<int64_t>()->default_value(256), "MiB written per iteration by all ranks")
      .add("reps", Role::kRun, po::value<int>()->default_value(3), "timed iterations after one warm-up");
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  return run_bench_hdf5(cmd.vm["dir"].as<std::string>(), cmd.vm["mib"].as<int64_t>(), cmd.vm["reps"].as<int>(),
                        std::cout);
}

int cmd_bench_hessian(const Args& args) {
  Command cmd("bench hessian");
  cmd.add("widths", Role::kRun, po::value<std::string>()->default_value("1024,4096"),
          "comma-separated Hessian widths K (in_features)")
      .add("tokens", Role::kRun, po::value<int64_t>()->default_value(4096), "rows of X per call")
      .add("reps", Role::kRun, po::value<int>()->default_value(3), "timed repetitions after one warm-up");
  add_run_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  const std::vector<int64_t> widths = parse_int_list(cmd.vm["widths"].as<std::string>(), "--widths", 1);
  const auto backend = make_backend(run_options(cmd.vm));  // collective (node-local ranks)
  if (world_rank() != 0) return 0;
  return run_bench_hessian(*backend, widths, cmd.vm["tokens"].as<int64_t>(), cmd.vm["reps"].as<int>(), std::cout);
}

int cmd_bench_gptq(const Args& args) {
  Command cmd("bench gptq");
  cmd.add("shapes", Role::kRun, po::value<std::string>()->default_value("1024x1024,4096x4096,4096x11008,11008x4096"),
          "comma-separated OUTxIN shapes")
      .add("reps", Role::kRun, po::value<int>()->default_value(3), "timed repetitions after one warm-up")
      .add("bits", Role::kRun, po::value<int>()->default_value(4), "bits")
      .add("group-size", Role::kRun, po::value<int64_t>()->default_value(128), "group size (-1 = per row)")
      .add("group", Role::kRun, po::bool_switch(),
           "the shapes are one linear group sharing one Hessian (same IN, e.g. 1024x4096,256x4096,256x4096): time "
           "one gptq_quantize per linear against one shared factor with a solve per linear");
  add_run_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return 0;
  }
  std::vector<std::string> shapes;
  std::stringstream ss(cmd.vm["shapes"].as<std::string>());
  for (std::string s; std::getline(ss, s, ',');)
    if (!s.empty()) shapes.push_back(s);
  const auto backend = make_backend(run_options(cmd.vm));  // collective (node-local ranks)
  if (world_rank() != 0) return 0;
  return run_bench_gptq(*backend, shapes, cmd.vm["reps"].as<int>(), cmd.vm["bits"].as<int>(),
                        cmd.vm["group-size"].as<int64_t>(), cmd.vm["group"].as<bool>(), std::cout);
}

// args[0] names the benchmark; its options follow.
int cmd_bench(const Args& args) {
  const std::string which = args.empty() ? std::string() : args[0];
  const Args rest(args.begin() + (args.empty() ? 0 : 1), args.end());
  if (which == "transport") return cmd_bench_transport(rest);
  if (which == "hessian") return cmd_bench_hessian(rest);
  if (which == "hdf5") return cmd_bench_hdf5(rest);
  PQ_REQUIRE(which == "gptq",
             "pipequant bench: expected a benchmark name: gptq, hessian, transport or hdf5 (e.g. pipequant bench gptq "
             "--shapes 4096x4096)");
  return cmd_bench_gptq(rest);
}

}  // namespace

std::optional<QuantizeOptions> parse_quantize_options(const std::vector<std::string>& args) {
  Command cmd("quantize");
  add_quantize_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return std::nullopt;
  }
  return quantize_options(cmd);
}

std::optional<PlanOptions> parse_plan_options(const std::vector<std::string>& args) {
  Command cmd("plan");
  add_plan_options(cmd);
  if (parse(cmd, args)) {
    print_help(cmd);
    return std::nullopt;
  }
  return plan_options(cmd);
}

int run_cli(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" || std::string(argv[1]) == "help") {
    if (world_rank() == 0) std::fputs(kUsage, stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  const Args args(argv + 2, argv + argc);
  if (command == "quantize") return cmd_quantize(args);
  if (command == "plan") return cmd_plan(args);
  if (command == "eval") return cmd_eval(args);
  if (command == "inspect") return cmd_inspect(args);
  if (command == "export") return cmd_export(args);
  if (command == "layer") return cmd_layer(args);
  if (command == "synth") return cmd_synth(args);
  if (command == "synth-tokens") return cmd_synth_tokens(args);
  if (command == "bench") return cmd_bench(args);
  if (command == "version" || command == "--version") {
    if (world_rank() == 0) std::printf("pipequant %s\n", version());
    return 0;
  }
  fail("unknown command '", command, "'\n", kUsage);
}

}  // namespace pipequant
