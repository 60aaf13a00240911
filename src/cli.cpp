#include "src/cli.hpp"

#include <omp.h>

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "comm/mpi_env.hpp"
#include "comm/stage.hpp"
#include "io/npy.hpp"
#include "io/shard.hpp"
#include "base/abort.hpp"
#include "base/error.hpp"
#include "src/bench_gptq.hpp"
#include "src/driver_util.hpp"
#include "src/inspect.hpp"
#include "src/pipeline.hpp"
#include "src/quant.hpp"
#include "src/synth.hpp"
#include "src/version.hpp"

namespace po = boost::program_options;

namespace pipequant {

namespace {

const char* kUsage =
    "usage: pipequant <command> [options]   (pipequant <command> --help for its options)\n"
    "commands:\n"
    "  quantize      quantize a Llama checkpoint (GPTQ or RTN) into packed HDF5 shards\n"
    "  eval          perplexity of a checkpoint, or of a quantized output dequantized on the fly\n"
    "  inspect OUT   table of the blocks and linears of a quantized output, checksums verified\n"
    "  layer         quantize one matrix W [out, in] with inputs X [tokens, in]\n"
    "  synth         write a synthetic Llama checkpoint with deterministic random weights\n"
    "  synth-tokens  write a synthetic token file (.npy int32)\n"
    "  bench gptq    benchmark the GPTQ solve\n"
    "  bench hessian  Hessian accumulation rate next to the sgemm rate\n"
    "  bench transport  activation transport bandwidth between two ranks (nccl-tests style table)\n"
    "  version       print the version\n";

struct Command {
  std::string name;
  po::options_description desc;
  po::positional_options_description positional;
  po::variables_map vm;
  explicit Command(const std::string& n) : name(n), desc("pipequant " + n + " options") {}
};

// Parses argv (after the command word) and the optional --config file; true when --help was asked.
bool parse(Command& cmd, int argc, char** argv) {
  cmd.desc.add_options()("help,h", "show this help")("config", po::value<std::string>(),
                                                     "read options from FILE (`name = value` lines)");
  try {
    po::store(po::command_line_parser(argc, argv).options(cmd.desc).positional(cmd.positional).run(), cmd.vm);
    if (cmd.vm.count("config")) {
      const std::string path = cmd.vm["config"].as<std::string>();
      std::ifstream f(path);
      PQ_REQUIRE(f.good(), "--config ", path, ": cannot open the file");
      try {
        po::store(po::parse_config_file(f, cmd.desc), cmd.vm);
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

bool print_help(const Command& cmd) {
  if (world_rank() == 0) std::cout << cmd.desc << std::endl;
  return true;
}

void add_quant_options(po::options_description& d) {
  d.add_options()("method", po::value<std::string>()->default_value("gptq"), "gptq | rtn")(
      "bits", po::value<int>()->default_value(4), "bits per weight: 2, 3, 4 or 8")(
      "group-size", po::value<int64_t>()->default_value(128), "input channels per group; -1 = one group per row")(
      "sym", po::bool_switch(), "symmetric grid (default asymmetric)")(
      "act-order", po::bool_switch(), "process columns by decreasing Hessian diagonal")(
      "static-groups", po::bool_switch(), "with --act-order: groups fixed in natural order before the solve")(
      "damp", po::value<double>()->default_value(0.01), "damping, relative to mean(diag(H))")(
      "damp-retries", po::value<int>()->default_value(QuantConfig{}.damp_retries),
      "times the damping is multiplied by 10 when the Cholesky fails, before falling back to RTN")(
      "block-size", po::value<int64_t>()->default_value(128), "GPTQ lazy-update block width");
}

QuantConfig quant_config(const po::variables_map& vm) {
  QuantConfig q;
  const std::string method = vm["method"].as<std::string>();
  PQ_REQUIRE(method == "gptq" || method == "rtn", "--method: expected gptq or rtn, got '", method, "'");
  q.method = method == "gptq" ? Method::kGptq : Method::kRtn;
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

void add_run_options(po::options_description& d) {
  d.add_options()("backend", po::value<std::string>()->default_value("auto"), "auto | cpu | cuda")(
      "threads", po::value<int>()->default_value(0), "CPU threads per rank (0 = all cores)")(
      "micro-batch", po::value<int64_t>()->default_value(4), "samples per forward call")(
      "gpu-mem", po::value<double>()->default_value(0.0),
      "CUDA device memory budget per rank in GB (1e9 bytes); 0 = what is free, less a margin")(
      "compute-dtype", po::value<std::string>()->default_value("auto"),
      "GEMMs of the block forward: auto (the checkpoint's bf16/fp16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16");
}

RunOptions run_options(const po::variables_map& vm) {
  RunOptions r;
  const std::string backend = vm["backend"].as<std::string>();
  PQ_REQUIRE(backend == "auto" || backend == "cpu" || backend == "cuda", "--backend: expected auto, cpu or cuda, got '",
             backend, "'");
  r.backend = backend == "cpu" ? BackendKind::kCpu : backend == "cuda" ? BackendKind::kCuda : BackendKind::kAuto;
  r.threads = vm["threads"].as<int>();
  r.micro_batch = vm["micro-batch"].as<int64_t>();
  r.gpu_mem_gb = vm["gpu-mem"].as<double>();
  const std::string dtype = vm["compute-dtype"].as<std::string>();
  PQ_REQUIRE(dtype == "auto" || dtype == "fp32" || dtype == "bf16" || dtype == "fp16",
             "--compute-dtype: expected auto, fp32, bf16 or fp16, got '", dtype, "'");
  r.compute_dtype = dtype == "fp32"   ? ComputeDtype::kFp32
                    : dtype == "bf16" ? ComputeDtype::kBf16
                    : dtype == "fp16" ? ComputeDtype::kFp16
                                      : ComputeDtype::kAuto;
  PQ_REQUIRE(r.gpu_mem_gb >= 0.0, "--gpu-mem must be >= 0 (GB), got ", r.gpu_mem_gb);
  PQ_REQUIRE(r.micro_batch > 0, "--micro-batch must be positive, got ", r.micro_batch);
  PQ_REQUIRE(r.threads >= 0, "--threads must be >= 0, got ", r.threads);
  return r;
}

// The parsed options as JSON (stored in model.h5 and part of the fingerprint).
nlohmann::json options_json(const po::variables_map& vm) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [key, value] : vm) {
    const auto& v = value.value();
    if (const auto* s = boost::any_cast<std::string>(&v))
      j[key] = *s;
    else if (const auto* i = boost::any_cast<int>(&v))
      j[key] = *i;
    else if (const auto* l = boost::any_cast<int64_t>(&v))
      j[key] = *l;
    else if (const auto* d = boost::any_cast<double>(&v))
      j[key] = *d;
    else if (const auto* b = boost::any_cast<bool>(&v))
      j[key] = *b;
  }
  return j;
}

template <typename T>
T required(const po::variables_map& vm, const std::string& name, const std::string& command) {
  PQ_REQUIRE(vm.count(name), "pipequant ", command, ": the option '--", name, "' is required (see pipequant ", command,
             " --help)");
  return vm[name].as<T>();
}

int cmd_quantize(int argc, char** argv) {
  Command cmd("quantize");
  cmd.desc.add_options()("model", po::value<std::string>(), "checkpoint directory (config.json, *.safetensors)")(
      "calib", po::value<std::string>(), "calibration tokens (.npy int32/int64, [N, L] or flat)")(
      "seq-len", po::value<int64_t>(), "tokens per calibration sample")(
      "nsamples", po::value<int64_t>()->default_value(0), "calibration samples (0 = all windows, at most 128)")(
      "out", po::value<std::string>(), "output directory")(
      "propagation", po::value<std::string>()->default_value("quantized"),
      "quantized: block i+1 sees quantized block i; fp: inputs from the unquantized model")(
      "overwrite", po::bool_switch(), "replace an existing output")("metrics", po::value<std::string>(),
                                                                    "write JSON-lines metrics to FILE")(
      "ranks-per-stage", po::value<int>()->default_value(1), "D: ranks per pipeline stage (world = P stages x D)")(
      "blocks-per-stage", po::value<std::string>()->default_value(""),
      "blocks of each stage: N, or a,b,c (default: balanced by weight bytes)")(
      "transport", po::value<std::string>()->default_value("mpi"), "activation transport between stages: mpi")(
      "dry-run", po::bool_switch(), "print the plan and stop")(
      "fp-resident-gb", po::value<double>()->default_value(16.0),
      "--propagation fp: keep the stage's blocks in host memory when their fp32 copies fit this many GB per rank "
      "(every micro-batch flows through them as it arrives); above it, stream the blocks one at a time");
  add_quant_options(cmd.desc);
  add_run_options(cmd.desc);
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
  QuantizeOptions o;
  o.model_dir = required<std::string>(cmd.vm, "model", cmd.name);
  o.calib_path = required<std::string>(cmd.vm, "calib", cmd.name);
  o.seq_len = required<int64_t>(cmd.vm, "seq-len", cmd.name);
  o.out_dir = required<std::string>(cmd.vm, "out", cmd.name);
  o.nsamples = cmd.vm["nsamples"].as<int64_t>();
  PQ_REQUIRE(o.seq_len > 0, "--seq-len must be positive, got ", o.seq_len);
  PQ_REQUIRE(o.nsamples >= 0, "--nsamples must be >= 0, got ", o.nsamples);
  o.quant = quant_config(cmd.vm);
  const std::string propagation = cmd.vm["propagation"].as<std::string>();
  PQ_REQUIRE(propagation == "quantized" || propagation == "fp", "--propagation: expected quantized or fp, got '",
             propagation, "'");
  o.propagation = propagation == "fp" ? Propagation::kFp : Propagation::kQuantized;
  o.overwrite = cmd.vm["overwrite"].as<bool>();
  if (cmd.vm.count("metrics")) o.metrics_path = cmd.vm["metrics"].as<std::string>();
  o.run = run_options(cmd.vm);
  o.ranks_per_stage = cmd.vm["ranks-per-stage"].as<int>();
  o.blocks_per_stage = cmd.vm["blocks-per-stage"].as<std::string>();
  o.dry_run = cmd.vm["dry-run"].as<bool>();
  const double resident_gb = cmd.vm["fp-resident-gb"].as<double>();
  PQ_REQUIRE(resident_gb >= 0.0, "--fp-resident-gb must be >= 0, got ", resident_gb);
  o.fp_resident_bytes = static_cast<uint64_t>(resident_gb * 1e9);
  const std::string transport = cmd.vm["transport"].as<std::string>();
  PQ_REQUIRE(transport == "mpi", "--transport: expected mpi (nccl comes with the CUDA backend), got '", transport, "'");
  // the fingerprint covers what changes the result: not where it goes, nor how the work is laid out
  nlohmann::json args = options_json(cmd.vm);
  for (const char* k : {"out", "overwrite", "metrics", "threads", "micro-batch", "backend", "gpu-mem", "config", "help",
                        "ranks-per-stage", "blocks-per-stage", "transport", "dry-run", "fp-resident-gb"})
    args.erase(k);
  o.args_json = args.dump();
  args.erase("model");
  args.erase("calib");
  o.fingerprint_args_json = args.dump();
  run_quantize(o);
  return 0;
}

int cmd_eval(int argc, char** argv) {
  Command cmd("eval");
  cmd.desc.add_options()("model", po::value<std::string>(), "checkpoint directory (its config.json is used)")(
      "quantized", po::value<std::string>(), "a quantized output directory, dequantized on the fly")(
      "tokens", po::value<std::string>(), "evaluation tokens (.npy int32/int64)")("seq-len", po::value<int64_t>(),
                                                                                  "tokens per non-overlapping window")(
      "max-windows", po::value<int64_t>()->default_value(0), "evaluate at most this many windows (0 = all)");
  add_run_options(cmd.desc);
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
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

int cmd_inspect(int argc, char** argv) {
  Command cmd("inspect");
  cmd.desc.add_options()("out", po::value<std::string>(), "quantized output directory");
  cmd.positional.add("out", 1);
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
  const std::string out = required<std::string>(cmd.vm, "out", cmd.name);
  if (world_rank() != 0) return 0;
  return run_inspect(out, std::cout);
}

int cmd_layer(int argc, char** argv) {
  Command cmd("layer");
  cmd.desc.add_options()("weight", po::value<std::string>(), "W.npy float32 [out, in]")(
      "inputs", po::value<std::string>(), "X.npy float32 [tokens, in]")("out", po::value<std::string>(),
                                                                        "write the packed result to FILE (HDF5)")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0 = all cores)");
  add_quant_options(cmd.desc);
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
  const std::string wpath = required<std::string>(cmd.vm, "weight", cmd.name);
  const std::string xpath = required<std::string>(cmd.vm, "inputs", cmd.name);
  const QuantConfig q = quant_config(cmd.vm);
  const io::Matrix w = io::read_matrix_f32(wpath, "--weight");
  const io::Matrix x = io::read_matrix_f32(xpath, "--inputs");
  PQ_REQUIRE(x.cols == w.cols, xpath, ": shape [", x.rows, ", ", x.cols, "] does not match the weight ", wpath, " [",
             w.rows, ", ", w.cols, "]: expected [tokens, ", w.cols, "]");
  PQ_REQUIRE(x.rows > 0, xpath, ": no input rows");
  auto backend = kernels::make_cpu_backend(cmd.vm["threads"].as<int>());
  // H = 2/n X^T X
  const auto t_h = std::chrono::steady_clock::now();
  kernels::Buffer<float> h_dev(*backend, w.cols * w.cols);
  std::vector<float> h(static_cast<size_t>(w.cols * w.cols), 0.0f);
  backend->upload(h_dev.data(), h.data(), h.size() * 4);
  backend->hessian_accumulate(x.data.data(), x.rows, x.cols, h_dev.data());
  backend->download(h.data(), h_dev.data(), h.size() * 4);
  for (auto& v : h) v *= static_cast<float>(2.0 / static_cast<double>(x.rows));
  const double hessian_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_h).count();
  const QuantizedLinear ql = q.method == Method::kGptq
                                 ? gptq_quantize(*backend, w.data.data(), w.rows, w.cols, h.data(), q, "layer")
                                 : rtn_quantize(*backend, w.data.data(), w.rows, w.cols, h.data(), q);
  for (const auto& line : ql.log) std::printf("warning: %s\n", line.c_str());
  std::printf("shape: %lld x %lld (out x in), %lld tokens, %s %d-bit group %lld\n", static_cast<long long>(w.rows),
              static_cast<long long>(w.cols), static_cast<long long>(x.rows),
              q.method == Method::kGptq ? "gptq" : "rtn", q.bits, static_cast<long long>(q.group_size));
  std::printf("hessian_seconds: %.6f\n", hessian_seconds);
  std::printf("fallback: %s\n", ql.fallback.c_str());
  std::printf("relative_error: %.9g\n", ql.relative_error);
  std::printf("solve_seconds: %.6f\n", ql.solve_seconds);
  if (cmd.vm.count("out")) {
    const std::string out = cmd.vm["out"].as<std::string>();
    io::PackedLinear p = pack(ql, "layer", q);
    io::ShardWriter writer(out, MPI_COMM_SELF, false);
    writer.begin_block(0);
    writer.write_linear(0, p);
    writer.mark_complete(0);
    writer.close();
    std::printf("packed: %s:/blocks/0/layer\n", out.c_str());
  }
  return 0;
}

int cmd_synth(int argc, char** argv) {
  Command cmd("synth");
  cmd.desc.add_options()("out", po::value<std::string>(), "output checkpoint directory")(
      "hidden-size", po::value<int64_t>(), "")("intermediate-size", po::value<int64_t>(), "")(
      "num-layers", po::value<int64_t>(), "")("num-heads", po::value<int64_t>(), "")(
      "num-kv-heads", po::value<int64_t>(), "")("vocab-size", po::value<int64_t>(), "")(
      "dtype", po::value<std::string>()->default_value("bf16"), "bf16 | fp16 | fp32")(
      "seed", po::value<uint64_t>()->default_value(0), "random seed")("tie-word-embeddings", po::bool_switch(),
                                                                      "no lm_head tensor; the embedding is reused");
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
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
  if (world_rank() == 0) {
    write_synthetic_checkpoint(s);
    std::printf("synth: wrote %s (config.json, model.safetensors)\n", s.out_dir.c_str());
  }
  return 0;
}

int cmd_synth_tokens(int argc, char** argv) {
  Command cmd("synth-tokens");
  cmd.desc.add_options()("out", po::value<std::string>(), "output .npy file")(
      "count", po::value<int64_t>(), "number of tokens")("vocab-size", po::value<int64_t>(), "vocabulary size")(
      "seed", po::value<uint64_t>()->default_value(0), "random seed");
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
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

int cmd_bench_transport(int argc, char** argv) {
  Command cmd("bench transport");
  cmd.desc.add_options()("min-bytes", po::value<int64_t>()->default_value(1024), "smallest message")(
      "max-bytes", po::value<int64_t>()->default_value(64 << 20), "largest message (sizes double)")(
      "iters", po::value<int>()->default_value(20), "timed iterations per size")(
      "warmup", po::value<int>()->default_value(5), "untimed iterations per size");
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
  PQ_REQUIRE(world_size() >= 2,
             "pipequant bench transport: needs 2 ranks (mpirun -np 2 pipequant bench transport)");
  std::string table;
  const int rc = comm::run_transport_benchmark(cmd.vm["min-bytes"].as<int64_t>(), cmd.vm["max-bytes"].as<int64_t>(),
                                               cmd.vm["iters"].as<int>(), cmd.vm["warmup"].as<int>(), table);
  if (world_rank() == 0) std::fputs(table.c_str(), stdout);
  return rc;
}

int cmd_bench_hessian(int argc, char** argv) {
  Command cmd("bench hessian");
  cmd.desc.add_options()("widths", po::value<std::string>()->default_value("1024,4096"),
                         "comma-separated Hessian widths K (in_features)")(
      "tokens", po::value<int64_t>()->default_value(4096), "rows of X per call")(
      "reps", po::value<int>()->default_value(3), "timed repetitions after one warm-up");
  add_run_options(cmd.desc);
  if (parse(cmd, argc, argv)) return print_help(cmd) ? 0 : 0;
  std::vector<int64_t> widths;
  std::stringstream ss(cmd.vm["widths"].as<std::string>());
  for (std::string s; std::getline(ss, s, ',');) {
    if (s.empty()) continue;
    size_t used = 0;
    int64_t k = 0;
    try {
      k = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    PQ_REQUIRE(used == s.size() && k > 0, "--widths: '", s, "' is not a positive number");
    widths.push_back(k);
  }
  const auto backend = make_backend(run_options(cmd.vm));  // collective (node-local ranks)
  if (world_rank() != 0) return 0;
  return run_bench_hessian(*backend, widths, cmd.vm["tokens"].as<int64_t>(), cmd.vm["reps"].as<int>(), std::cout);
}

int cmd_bench(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "transport") return cmd_bench_transport(argc - 1, argv + 1);
  if (argc >= 2 && std::string(argv[1]) == "hessian") return cmd_bench_hessian(argc - 1, argv + 1);
  PQ_REQUIRE(argc >= 2 && std::string(argv[1]) == "gptq",
             "pipequant bench: expected a benchmark name: gptq, hessian or transport (e.g. pipequant bench gptq "
             "--shapes 4096x4096)");
  Command cmd("bench gptq");
  cmd.desc.add_options()("shapes", po::value<std::string>()->default_value("1024x1024,4096x4096,4096x11008,11008x4096"),
                         "comma-separated OUTxIN shapes")("reps", po::value<int>()->default_value(3),
                                                          "timed repetitions after one warm-up")(
      "bits", po::value<int>()->default_value(4), "bits")("group-size", po::value<int64_t>()->default_value(128),
                                                          "group size (-1 = per row)");
  add_run_options(cmd.desc);
  if (parse(cmd, argc - 1, argv + 1)) return print_help(cmd) ? 0 : 0;
  std::vector<std::string> shapes;
  std::stringstream ss(cmd.vm["shapes"].as<std::string>());
  for (std::string s; std::getline(ss, s, ',');)
    if (!s.empty()) shapes.push_back(s);
  const auto backend = make_backend(run_options(cmd.vm));  // collective (node-local ranks)
  if (world_rank() != 0) return 0;
  return run_bench_gptq(*backend, shapes, cmd.vm["reps"].as<int>(), cmd.vm["bits"].as<int>(),
                        cmd.vm["group-size"].as<int64_t>(), std::cout);
}

}  // namespace

int run_cli(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" || std::string(argv[1]) == "help") {
    if (world_rank() == 0) std::fputs(kUsage, stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  // each command parses argv[1..]: Boost skips argv[0], so the command word takes its place
  if (command == "quantize") return cmd_quantize(argc - 1, argv + 1);
  if (command == "eval") return cmd_eval(argc - 1, argv + 1);
  if (command == "inspect") return cmd_inspect(argc - 1, argv + 1);
  if (command == "layer") return cmd_layer(argc - 1, argv + 1);
  if (command == "synth") return cmd_synth(argc - 1, argv + 1);
  if (command == "synth-tokens") return cmd_synth_tokens(argc - 1, argv + 1);
  if (command == "bench") return cmd_bench(argc - 1, argv + 1);
  if (command == "version" || command == "--version") {
    if (world_rank() == 0) std::printf("pipequant %s\n", version());
    return 0;
  }
  fail("unknown command '", command, "'\n", kUsage);
}

}  // namespace pipequant
