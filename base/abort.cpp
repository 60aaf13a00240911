#include "base/abort.hpp"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace pipequant {

namespace {

bool mpi_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

int world_rank() {
  int rank = 0;
  if (mpi_running()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  if (mpi_running()) MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

std::string rank_label() {
  char host[256] = "?";
  gethostname(host, sizeof(host) - 1);
  std::string label = "[";
  label += host;
  label += " r";
  label += std::to_string(world_rank());
  label += ']';
  return label;
}

void abort_job(const std::string& message, int code, Failure kind) {
  const int rank = world_rank();
  const bool several = world_size() > 1;
  if (kind == Failure::kUser) {
    // When every rank meets the same bad input, rank 0's line should be the one the user reads: the others
    // wait a moment, and rank 0's MPI_Abort usually ends them first. A failure on one rank alone still ends
    // the job within seconds.
    if (rank != 0 && several) sleep(2);
    if (rank == 0)
      std::fprintf(stderr, "pipequant: error: %s\n", message.c_str());
    else
      std::fprintf(stderr, "%s pipequant: error: %s\n", rank_label().c_str(), message.c_str());
  } else {
    std::fprintf(stderr, "%s %s\n", rank_label().c_str(), message.c_str());
  }
  if (kind == Failure::kInternal && !(mpi_running() && several)) {
    std::fflush(stderr);
    std::fflush(stdout);
    std::abort();  // one rank: a core dump where the system keeps them
  }
  end_job(code);
}

void end_job(int code) {
  std::fflush(stderr);
  std::fflush(stdout);
  if (mpi_running() && world_size() > 1) MPI_Abort(MPI_COMM_WORLD, code);
  // One rank: end without MPI_Finalize. Finalize runs the callbacks of libraries that hold files open (parallel
  // HDF5 closes and flushes its files there), and a file whose write failed (a full disk) crashes that flush;
  // the error is said, and nothing of the output is marked complete, so there is nothing left to finish.
  std::_Exit(code);
}

}  // namespace pipequant
