// --transport: its names and what auto resolves to, in every build (the nccl transport itself runs in
// test_nccl_transport, on a GPU).
#include <gtest/gtest.h>

#include <string>

#include "base/error.hpp"
#include "comm/stage.hpp"
#include "comm/transport_kind.hpp"

namespace pipequant::test {
namespace {

using comm::TransportKind;

std::string error_of_choice(TransportKind requested, bool own_gpus) {
  try {
    comm::choose_transport(requested, own_gpus);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Transport, NamesRoundTripAndABadOneSaysWhatWasExpected) {
  for (const TransportKind k : {TransportKind::kAuto, TransportKind::kNccl, TransportKind::kMpi})
    EXPECT_EQ(comm::transport_from_name(comm::name(k)), k);
  try {
    comm::transport_from_name("ucx");
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), "--transport must be auto, nccl or mpi, got 'ucx'");
  }
}

TEST(Transport, MpiIsAlwaysPossible) {
  EXPECT_EQ(comm::choose_transport(TransportKind::kMpi, true), TransportKind::kMpi);
  EXPECT_EQ(comm::choose_transport(TransportKind::kMpi, false), TransportKind::kMpi);
}

TEST(Transport, AutoTakesNcclOnlyWhereEveryRankOwnsAGpuAndTheBuildHasIt) {
  EXPECT_EQ(comm::choose_transport(TransportKind::kAuto, false), TransportKind::kMpi);
  EXPECT_EQ(comm::choose_transport(TransportKind::kAuto, true),
            comm::nccl_transport_built() ? TransportKind::kNccl : TransportKind::kMpi);
}

TEST(Transport, NcclWhereItCannotRunIsRefusedWithTheReason) {
  const std::string shared = error_of_choice(TransportKind::kNccl, false);
  if (comm::nccl_transport_built()) {
    EXPECT_NE(shared.find("every rank needs a GPU of its own"), std::string::npos) << shared;
    EXPECT_EQ(comm::choose_transport(TransportKind::kNccl, true), TransportKind::kNccl);
  } else {
    EXPECT_NE(shared.find("has no NCCL"), std::string::npos) << shared;
    EXPECT_NE(error_of_choice(TransportKind::kNccl, true).find("has no NCCL"), std::string::npos);
    EXPECT_THROW(comm::make_nccl_transport(comm::StageLayout{}, 0), UserError);
  }
}

}  // namespace
}  // namespace pipequant::test
