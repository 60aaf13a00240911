#pragma once
// The command line: `pipequant <command> [options]`, one Boost.Program_options description per command,
// each with --help, and options also from a config file (--config FILE, `name = value` lines). Options are
// parsed and checked here, once, into the types of src/options.hpp.

#include <optional>
#include <string>
#include <vector>

#include "src/options.hpp"

namespace pipequant {

// Runs the program; returns the exit code. Errors a user can cause are thrown as UserError.
int run_cli(int argc, char** argv);

// The options of `pipequant quantize ARGS...` (args: the words after "quantize"), parsed and checked as a run
// parses them, with args_json and fingerprint_args_json filled; nullopt when --help was asked (rank 0 prints
// the help). Throws UserError for a bad or missing option.
std::optional<QuantizeOptions> parse_quantize_options(const std::vector<std::string>& args);

// The options of `pipequant plan ARGS...`, parsed and checked; nullopt when --help was asked. Throws UserError for a
// bad or missing option.
std::optional<PlanOptions> parse_plan_options(const std::vector<std::string>& args);

}  // namespace pipequant
