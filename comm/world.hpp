#pragma once
// Job-wide exchanges that belong to no stage group: the start barrier, rank 0's decisions reaching every rank,
// and sums over every rank (eval's loss).

#include <cstdint>

namespace pipequant::comm {

void world_barrier();
// World rank 0's value reaches every rank.
void broadcast_from_world_root(int& value);
// The sum over every rank of the world, the same bits on every rank (reduced at rank 0, then broadcast).
double world_sum(double value);
int64_t world_sum(int64_t value);
// The least value over every rank of the world (export: the first linear any rank found at fault).
int64_t world_min(int64_t value);

}  // namespace pipequant::comm
