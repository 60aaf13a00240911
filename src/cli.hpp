#pragma once
// The command line: `pipequant <command> [options]`, one Boost.Program_options description per command,
// each with --help, and options also from a config file (--config FILE, `name = value` lines).

namespace pipequant {

// Runs the program; returns the exit code. Errors a user can cause are thrown as UserError.
int run_cli(int argc, char** argv);

}  // namespace pipequant
