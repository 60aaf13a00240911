// Which activation transport a job uses, and the nccl entry points where the build has no NCCL.
#include "base/error.hpp"
#include "comm/stage.hpp"
#include "comm/transport_kind.hpp"

namespace pipequant::comm {

TransportKind transport_from_name(const std::string& word) {
  for (const TransportKind k : {TransportKind::kAuto, TransportKind::kNccl, TransportKind::kMpi})
    if (word == name(k)) return k;
  fail("--transport must be auto, nccl or mpi, got '", word, "'");
}

const char* name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kAuto:
      return "auto";
    case TransportKind::kNccl:
      return "nccl";
    case TransportKind::kMpi:
      return "mpi";
  }
  return "?";
}

TransportKind choose_transport(TransportKind requested, bool every_rank_owns_a_gpu) {
  const bool nccl_possible = nccl_transport_built() && every_rank_owns_a_gpu;
  switch (requested) {
    case TransportKind::kMpi:
      return TransportKind::kMpi;
    case TransportKind::kNccl:
      PQ_REQUIRE(nccl_transport_built(),
                 "--transport nccl: this build of pipequant has no NCCL (none was found with the CUDA toolkit when it "
                 "was built); use --transport mpi");
      PQ_REQUIRE(every_rank_owns_a_gpu,
                 "--transport nccl: every rank needs a GPU of its own on the CUDA backend (NCCL refuses two ranks of "
                 "one communicator on the same GPU); run at most one rank per GPU, or use --transport mpi");
      return TransportKind::kNccl;
    case TransportKind::kAuto:
      break;
  }
  return nccl_possible ? TransportKind::kNccl : TransportKind::kMpi;
}

#ifndef PIPEQUANT_HAVE_NCCL
bool nccl_transport_built() { return false; }

std::unique_ptr<ActivationTransport> make_nccl_transport(const StageLayout&, int) {
  fail("--transport nccl: this build of pipequant has no NCCL (none was found with the CUDA toolkit when it was "
       "built)");
}
#endif

}  // namespace pipequant::comm
