#pragma once
// MPI bootstrap and the job topology: world rank/size, host name, local rank on the node
// (MPI_Comm_split_type SHARED), and ending the whole job on an error.

#include <mpi.h>

#include <string>

namespace pipequant::comm {

class MpiEnv {
 public:
  // Initializes MPI (thread level FUNNELED) and errors-return on MPI_COMM_WORLD.
  MpiEnv(int* argc, char*** argv);
  ~MpiEnv();
  MpiEnv(const MpiEnv&) = delete;
  MpiEnv& operator=(const MpiEnv&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  const std::string& host() const { return host_; }

 private:
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  std::string host_;
};

// Prints "[host rN] error: message" (rank 0 prints "error: message") and ends every rank of the job with
// `code`. Never returns.
[[noreturn]] void abort_job(const std::string& message, int code);

int world_rank();
int world_size();

}  // namespace pipequant::comm
