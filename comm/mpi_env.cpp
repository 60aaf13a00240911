#include "comm/mpi_env.hpp"

namespace pipequant::comm {

MpiEnv::MpiEnv(int* argc, char*** argv) {
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
}

MpiEnv::~MpiEnv() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

NodeRanks node_ranks() {
  NodeRanks n;
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &n.local_rank);
  MPI_Comm_size(local, &n.local_size);
  MPI_Comm_free(&local);
  return n;
}

}  // namespace pipequant::comm
