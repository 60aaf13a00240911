#pragma once
// `pipequant inspect OUT`: a table of the blocks and linears of a quantized output directory, every checksum
// recomputed. Reads OUT/model.h5 and the shards it lists (serially, one process).

#include <ostream>
#include <string>

namespace pipequant {

// Prints one row per linear (block, module, shape [N x K], bits, group size, sym, act_order, groups, damp,
// fallback, relative error, RTN error, checksum status), a line for each block that is not complete or has a
// damaged dense tensor, the model tensors, and a summary line. Returns 0 when every block is complete and
// every checksum matches, 1 otherwise. Throws UserError when OUT/model.h5 is missing or unreadable.
int run_inspect(const std::string& out_dir, std::ostream& os);

}  // namespace pipequant
