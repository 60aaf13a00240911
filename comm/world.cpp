#include "comm/world.hpp"

#include <mpi.h>

namespace pipequant::comm {

void world_barrier() { MPI_Barrier(MPI_COMM_WORLD); }

void broadcast_from_world_root(int& value) { MPI_Bcast(&value, 1, MPI_INT, 0, MPI_COMM_WORLD); }

double world_sum(double value) {
  double sum = 0.0;
  MPI_Reduce(&value, &sum, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Bcast(&sum, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return sum;
}

int64_t world_sum(int64_t value) {
  int64_t sum = 0;
  MPI_Reduce(&value, &sum, 1, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Bcast(&sum, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  return sum;
}

int64_t world_min(int64_t value) {
  int64_t least = 0;
  MPI_Allreduce(&value, &least, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
  return least;
}

}  // namespace pipequant::comm
