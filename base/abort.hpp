#pragma once
// The one way a pipequant process ends the whole job on a failure, and the rank/host facts it prints.
// Safe before MPI_Init and after MPI_Finalize (then the process is alone and simply exits).

#include <string>

namespace pipequant {

// Rank and size in MPI_COMM_WORLD; 0 and 1 when MPI is not running.
int world_rank();
int world_size();

// "[host rN]" of this process.
std::string rank_label();

// What kind of failure ends the job: a user's (bad input, one clean line) or an internal one (a bug or a
// library failure: always labelled with host and rank, and ended at once).
enum class Failure { kUser, kInternal };

// Prints the message (rank 0's user errors as "pipequant: error: ...", every other line prefixed by
// rank_label()) and ends every rank of the job with `code`. Never returns.
[[noreturn]] void abort_job(const std::string& message, int code, Failure kind = Failure::kUser);

// abort_job's last step, for a caller that has said what it had to: flushes stdout and stderr and ends every rank
// of the job with `code` (MPI_Abort when several ranks run, else _Exit). Never returns.
[[noreturn]] void end_job(int code);

}  // namespace pipequant
