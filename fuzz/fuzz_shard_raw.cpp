// Fuzzes the HDF5 output readers with raw bytes: the input is written both as the shard of an output directory
// whose model.h5 is valid (shard_fixture.hpp), and as the model.h5 of a directory whose shard is valid, and both
// are read as resume, inspect, eval and export read them. Most mutations land in libhdf5's own decoder of the file
// format (Debian's 1.10), which may crash on corrupt metadata where pipequant cannot guard it; fuzz_shard_edit.cpp is
// the harness for pipequant's own code.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "fuzz/shard_fixture.hpp"

namespace {

struct Fixture {
  std::string shard_dir, model_dir;  // the input as the shard, and as model.h5
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace pipequant;
  fuzz::start_mpi();
  Fixture& f = fixture();
  f.shard_dir = fuzz::scratch_dir("shard_raw_shard");
  f.model_dir = fuzz::scratch_dir("shard_raw_model");
  fuzz::write_fixture_output(f.shard_dir);
  fuzz::write_fixture_output(f.model_dir);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace pipequant;
  const Fixture& f = fixture();
  fuzz::write_file(f.shard_dir + "/" + fuzz::kShardName, data, size);
  fuzz::read_output(f.shard_dir);
  fuzz::write_file(f.model_dir + "/model.h5", data, size);
  fuzz::read_output(f.model_dir);
  return 0;
}
