// GoogleTest main for pipequant's tests: initializes MPI, silences HDF5's own printing, runs the tests,
// prints failures in rank order and returns the all-reduced result so every rank agrees.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "io/shard.hpp"


int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  pipequant::io::silence_hdf5_errors();
  testing::InitGoogleTest(&argc, argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != 0) {
    auto& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int result = RUN_ALL_TESTS();
  int local_fail = result != 0 ? 1 : 0;
  for (int r = 1; r < size; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    if (r == rank && local_fail) std::fprintf(stderr, "[rank %d] had failing tests\n", rank);
  }
  int any_fail = 0;
  MPI_Allreduce(&local_fail, &any_fail, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_fail;
}
