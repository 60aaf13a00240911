#include "comm/mpi_env.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace pipequant::comm {

MpiEnv::MpiEnv(int* argc, char*** argv) {
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_size(local, &local_size_);
  MPI_Comm_free(&local);
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  host_ = name;
}

MpiEnv::~MpiEnv() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

int world_rank() {
  int initialized = 0, finalized = 0, rank = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int initialized = 0, finalized = 0, size = 1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

void abort_job(const std::string& message, int code) {
  const int rank = world_rank();
  // When every rank meets the same bad input, rank 0's line should be the one the user reads: the others
  // wait a moment, and rank 0's MPI_Abort usually ends them first. A failure on one rank alone still ends
  // the job within seconds.
  if (rank != 0 && world_size() > 1) sleep(2);
  if (rank == 0) {
    std::fprintf(stderr, "pipequant: error: %s\n", message.c_str());
  } else {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    std::fprintf(stderr, "[%s r%d] pipequant: error: %s\n", host, rank, message.c_str());
  }
  std::fflush(stderr);
  std::fflush(stdout);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized && world_size() > 1) MPI_Abort(MPI_COMM_WORLD, code);
  // One rank: end without MPI_Finalize. Finalize runs the callbacks of libraries that hold files open (parallel
  // HDF5 closes and flushes its files there), and a file whose write failed (a full disk) crashes that flush;
  // the error is said, and nothing of the output is marked complete, so there is nothing left to finish.
  std::_Exit(code);
}

}  // namespace pipequant::comm
