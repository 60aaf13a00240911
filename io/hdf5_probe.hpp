#pragma once
// libhdf5 (Debian's 1.10) can crash on a damaged file before any check of ours runs: an invalid free while listing
// damaged link storage, a read through a zero-length external-link value, vlen-string lengths taken from damaged
// bytes (gigabytes allocated, or a segfault in the global heap). A 20-hour job must not die by a signal because a
// shard on disk was damaged, so every HDF5 output file is read once in a child process before this process reads it:
// the child (this same executable, started with PIPEQUANT_INTERNAL_HDF5_PROBE=<file>) opens the file, lists every
// group as the readers list them (going on past a failure, as a reader goes on to the next block), reads every
// attribute, the string datasets and one element of each numeric dataset, and exits. Its allocator fills what it
// hands out, so that libhdf5's use of uninitialized entries crashes the child as it can the reader. A child that ends by a signal, or runs past the
// time limit, means the file is damaged: require_hdf5_file_survives throws a UserError that names the file. A child
// that exits normally says nothing about the file (an HDF5 error is reported by the reader, with the object).
//
// The child is exec'd (posix_spawn), not forked: a fork of an MPI process with registered memory (InfiniBand) is
// unsafe, and the child must not share the parent's libhdf5 state.
#include <string>

namespace pipequant::io {

// Throws UserError "<path>: damaged: ..." when reading the file's metadata crashes libhdf5 or does not finish within
// the limit (PIPEQUANT_HDF5_PROBE_TIMEOUT_S, default 300 s). Where no child can be started, says so on stderr once
// and returns (the reads then run unguarded, as before).
void require_hdf5_file_survives(const std::string& path);

}  // namespace pipequant::io
