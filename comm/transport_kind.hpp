#pragma once
// Which activation transport a job uses (--transport): comm/stage.hpp has the transports themselves.

#include <string>

namespace pipequant::comm {

enum class TransportKind { kAuto, kNccl, kMpi };
TransportKind transport_from_name(const std::string& word);  // "auto", "nccl", "mpi"; UserError otherwise
const char* name(TransportKind kind);

// Whether this build has the nccl transport (the CUDA toolkit's NCCL was found when it was built).
bool nccl_transport_built();

// What --transport resolves to: mpi as asked; nccl as asked, refused with a UserError where the build has no NCCL or
// the ranks do not each have a GPU of their own on the CUDA backend; auto: nccl where all of that holds, mpi
// otherwise. `every_rank_owns_a_gpu` is the world's answer (each rank on the CUDA backend, no GPU shared).
TransportKind choose_transport(TransportKind requested, bool every_rank_owns_a_gpu);

}  // namespace pipequant::comm
