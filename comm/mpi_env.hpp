#pragma once
// MPI bootstrap and the job topology: the ranks sharing a node (MPI_Comm_split_type SHARED). Ending the job on
// an error is base/abort.hpp's.

#include <mpi.h>

namespace pipequant::comm {

class MpiEnv {
 public:
  // Initializes MPI (thread level FUNNELED); finalizes it in the destructor.
  MpiEnv(int* argc, char*** argv);
  ~MpiEnv();
  MpiEnv(const MpiEnv&) = delete;
  MpiEnv& operator=(const MpiEnv&) = delete;
};

// This rank's place among the ranks of its node: they share its cores and take its GPUs round-robin.
struct NodeRanks {
  int local_rank = 0;
  int local_size = 1;
};

// Collective on MPI_COMM_WORLD.
NodeRanks node_ranks();

}  // namespace pipequant::comm
