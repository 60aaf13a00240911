#pragma once
// `pipequant bench hdf5`: the shard writer's bandwidth as IOR reports it (`access bw(MiB/s) block(KiB) xfer(KiB)
// open(s) wr/rd(s) close(s) total(s) iter`): every rank of the world writes its own slice of one dataset through
// io::ShardWriter (collective MPI-IO, as the quantize path writes its shards), then rank 0 reads it back and checks
// every byte.

#include <cstdint>
#include <ostream>
#include <string>

namespace pipequant {

// Collective on the world. `dir` holds the test file (removed afterwards); `mib` MiB per iteration in all;
// `reps` timed iterations after one warm-up. Rank 0 prints the table. Returns 0 when every read-back matched and
// every write was collective, 1 otherwise. Throws UserError for a bad argument or an unwritable directory.
int run_bench_hdf5(const std::string& dir, int64_t mib, int reps, std::ostream& os);

}  // namespace pipequant
