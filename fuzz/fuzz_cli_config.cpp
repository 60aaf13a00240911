// Fuzzes the options file of `--config FILE` (src/cli.cpp, Boost.Program_options' `name = value` lines): the input
// is the file, parsed as `pipequant quantize` and `pipequant plan` parse their options, alone and after the options
// a run gives on the command line (so that the file's values reach the checks after the parse). What is accepted
// must be usable: the recorded arguments are JSON that reads back (model.h5 stores them).
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "src/cli.hpp"

namespace {

using namespace pipequant;

void check_quantize(const std::vector<std::string>& args) {
  const std::optional<QuantizeOptions> o = parse_quantize_options(args);
  if (!o) return;  // --help
  fuzz::invariant(o->seq_len > 0 && o->nsamples >= 0, "quantize options: a size out of range was accepted");
  fuzz::invariant(nlohmann::json::accept(o->args_json) && nlohmann::json::accept(o->fingerprint_args_json),
                  "quantize options: the recorded arguments are not JSON");
}

void check_plan(const std::vector<std::string>& args) {
  const std::optional<PlanOptions> o = parse_plan_options(args);
  if (!o) return;
  fuzz::invariant(o->world > 0 && o->seq_len > 0 && o->nsamples > 0, "plan options: a size out of range was accepted");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string file = fuzz::scratch_dir("cli_config") + "/options.cfg";
  fuzz::write_file(file, data, size);
  fuzz::refused([&] { check_quantize({"--config", file}); });
  fuzz::refused([&] {
    check_quantize({"--model", "ckpt", "--calib", "calib.npy", "--seq-len", "8", "--out", "out", "--config", file});
  });
  fuzz::refused([&] { check_plan({"--model", "ckpt", "--seq-len", "8", "--config", file}); });
  return 0;
}
