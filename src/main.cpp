// pipequant: quantizes Llama-family checkpoints across ranks. Errors a user can cause end the whole job
// with one line and a non-zero exit; nothing half-written is marked complete.
#include <exception>
#include <new>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "base/stop.hpp"
#include "comm/mpi_env.hpp"
#include "io/shard.hpp"
#include "src/cli.hpp"

int main(int argc, char** argv) {
  // before MPI and OpenMP start their threads, which inherit the blocked SIGTERM and SIGINT (base/stop.hpp)
  pipequant::install_stop_on_signal();
  pipequant::comm::MpiEnv env(&argc, &argv);
  pipequant::io::silence_hdf5_errors();
  try {
    const int code = pipequant::run_cli(argc, argv);
    pipequant::note_finishing();
    return code;
  } catch (const pipequant::UserError& e) {
    pipequant::abort_job(e.what(), 2);
  } catch (const std::bad_alloc&) {
    pipequant::abort_job("out of host memory (try a smaller --micro-batch or --nsamples)", 3);
  } catch (const std::exception& e) {
    pipequant::abort_job(std::string("unexpected failure: ") + e.what(), 4);
  }
}
