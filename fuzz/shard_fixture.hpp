#pragma once
// What the two shard harnesses share: a small valid output directory written by pipequant's own writers (one shard,
// ShardWriter; model.h5, write_model_index), and the reads that resume, inspect, eval and export make of an output
// directory, each on its own so that the refusal of one does not skip the others.
//
// The output: shard-00000.h5 with
//   block 0 (complete): q_proj 4-bit groups of 32, k_proj 2-bit act-order, down_proj 3-bit one group per row,
//                       up_proj 8-bit; input_layernorm F32, post_attention_layernorm BF16, q_proj.bias F16
//   block 1 (not complete): o_proj, input_layernorm
//   block 2 (complete): gate_proj, both norms
//   /tensors: model.embed_tokens.weight BF16 [8, 16], model.norm.weight F32 [16], lm_head.weight F16 [8, 16]
// and model.h5 naming it for blocks 0..2 and the three tensors.

#include <mpi.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "io/shard.hpp"
#include "src/model.hpp"
#include "src/quant.hpp"

namespace pipequant::fuzz {

inline constexpr const char* kShardName = "shard-00000.h5";

// ShardWriter runs on an MPI communicator (MPI_COMM_SELF here): MPI is started once, as a singleton. One thread: a
// fuzzer runs on one core, and OpenMP's idle threads (unpack, dequantize) would spin for the rest of each input.
inline void start_mpi() {
  omp_set_num_threads(1);
  // Open MPI's handlers of SIGSEGV, SIGABRT, ... would print their own trace and end the process before the
  // sanitizers and libFuzzer see the signal (and write the input that caused it)
  setenv("OMPI_MCA_opal_signal", "", 1);
  // every output file is first read by a child process (io/hdf5_probe.hpp); an input may be probed twice (as the
  // shard and as model.h5) within libFuzzer's -timeout=10
  setenv("PIPEQUANT_HDF5_PROBE_TIMEOUT_S", "4", 0);
  int started = 0;
  MPI_Initialized(&started);
  if (!started) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  }
  io::silence_hdf5_errors();
}

namespace detail {

// A deterministic stream of 32-bit values (an LCG: the fixture must be the same in every run).
class Numbers {
 public:
  explicit Numbers(uint32_t seed) : state_(seed * 2654435761u + 1) {}
  uint32_t next() {
    state_ = state_ * 1664525u + 1013904223u;
    return state_;
  }

 private:
  uint32_t state_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A packed linear [n, k] with random codes and zeros, finite positive fp16 scales and a valid g_idx (act_order:
// the groups of a permutation of the columns).
inline io::PackedLinear linear(const std::string& module, int64_t k, int64_t n, int bits, int64_t group_size,
                               bool act_order, uint32_t seed) {
  Numbers rng(seed);
  io::PackedLinear l;
  l.module = module;
  l.in_features = k;
  l.out_features = n;
  l.bits = bits;
  l.group_size = group_size;
  l.groups = group_size < 0 ? 1 : ceil_div(k, group_size);
  l.act_order = act_order;
  l.sym = (seed & 1) != 0;
  l.damp = 0.01;
  l.fallback = seed % 3 == 0 ? "damp" : "none";
  l.relative_error = 1e-3 * (1 + seed % 5);
  l.rtn_relative_error = 2 * l.relative_error;
  l.qweight.resize(static_cast<size_t>(ceil_div(k * bits, 32) * n));
  l.qzeros.resize(static_cast<size_t>(l.groups * ceil_div(n * bits, 32)));
  for (auto& w : l.qweight) w = static_cast<int32_t>(rng.next());
  for (auto& w : l.qzeros) w = static_cast<int32_t>(rng.next());
  l.scales.resize(static_cast<size_t>(l.groups * n));
  for (auto& s : l.scales) s = static_cast<uint16_t>(0x2000 + rng.next() % 0x1000);  // about 0.008 to 0.06
  l.g_idx.resize(static_cast<size_t>(k));
  for (int64_t c = 0; c < k; ++c) {
    // act-order: column c holds the group of column (c * 5) % k in natural order, a permutation for odd k or k % 5
    const int64_t natural = act_order ? (c * 5 + 1) % k : c;
    l.g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(group_size < 0 ? 0 : natural / group_size);
  }
  return l;
}

// dtype "F32", "F16" or "BF16" values of `shape`, small and finite.
inline io::DenseTensor dense(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                             uint32_t seed) {
  Numbers rng(seed);
  io::DenseTensor t{name, dtype, std::move(shape), {}};
  int64_t count = 1;
  for (int64_t d : t.shape) count *= d;
  const size_t width = dtype == "F32" ? 4 : 2;
  t.bytes.resize(static_cast<size_t>(count) * width);
  for (int64_t i = 0; i < count; ++i) {
    const float f = 0.5f + static_cast<float>(rng.next() % 1024) / 1024.0f;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint32_t v = dtype == "F32" ? bits : dtype == "BF16" ? bits >> 16 : 0x3800u + rng.next() % 0x400u;
    std::memcpy(t.bytes.data() + static_cast<size_t>(i) * width, &v, width);
  }
  return t;
}

}  // namespace detail

// Writes the output described at the top into `dir` (shard-00000.h5 and model.h5).
inline void write_fixture_output(const std::string& dir) {
  using detail::dense;
  using detail::linear;
  {
    io::ShardWriter w(dir + "/" + kShardName, MPI_COMM_SELF, false);
    w.begin_block(0);
    w.write_linear(0, linear("self_attn.q_proj", 64, 16, 4, 32, false, 1));
    w.write_linear(0, linear("self_attn.k_proj", 32, 8, 2, 16, true, 2));
    w.write_linear(0, linear("mlp.down_proj", 48, 8, 3, -1, false, 3));
    w.write_linear(0, linear("mlp.up_proj", 16, 8, 8, 8, false, 4));
    w.write_block_tensor(0, dense("input_layernorm.weight", "F32", {16}, 5));
    w.write_block_tensor(0, dense("post_attention_layernorm.weight", "BF16", {16}, 6));
    w.write_block_tensor(0, dense("self_attn.q_proj.bias", "F16", {16}, 7));
    w.mark_complete(0);
    w.begin_block(1);
    w.write_linear(1, linear("self_attn.o_proj", 16, 16, 4, 16, false, 8));
    w.write_block_tensor(1, dense("input_layernorm.weight", "F32", {16}, 9));
    w.begin_block(2);
    w.write_linear(2, linear("mlp.gate_proj", 16, 8, 4, -1, false, 10));
    w.write_block_tensor(2, dense("input_layernorm.weight", "F32", {16}, 11));
    w.write_block_tensor(2, dense("post_attention_layernorm.weight", "F32", {16}, 12));
    w.mark_complete(2);
    w.write_tensor(dense("model.embed_tokens.weight", "BF16", {8, 16}, 13));
    w.write_tensor(dense("model.norm.weight", "F32", {16}, 14));
    w.write_tensor(dense("lm_head.weight", "F16", {8, 16}, 15));
    w.close();
  }
  io::ModelIndex index;
  index.config_json = R"({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3})";
  index.args_json = R"({"bits": 4, "method": "gptq"})";
  index.fingerprint = "0123456789abcdef";
  index.shard_files = {kShardName};
  index.block_shard = {{0, 0}, {1, 0}, {2, 0}};
  index.tensor_shard = {{"model.embed_tokens.weight", 0}, {"model.norm.weight", 0}, {"lm_head.weight", 0}};
  index.complete = true;
  io::write_model_index(dir, index);
}

namespace detail {

inline int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

inline void check_dense(const io::DenseTensor& t) {
  for (int64_t d : t.shape) invariant(d >= 0, "a dense tensor with a negative dimension was read");
  const size_t width = t.dtype == "F32" ? 4 : 2;
  invariant(t.bytes.size() == static_cast<size_t>(element_count(t.shape)) * width,
            "a dense tensor's bytes are not its shape times its dtype size");
}

// The four datasets of a packed linear have the sizes its attributes give.
inline void check_linear(const io::PackedLinear& l) {
  const int64_t k = l.in_features, n = l.out_features, g = l.groups, bits = l.bits;
  invariant(static_cast<int64_t>(l.qweight.size()) == ceil_div(k * bits, 32) * n, "read_linear: qweight size");
  invariant(static_cast<int64_t>(l.qzeros.size()) == g * ceil_div(n * bits, 32), "read_linear: qzeros size");
  invariant(static_cast<int64_t>(l.scales.size()) == g * n, "read_linear: scales size");
  invariant(static_cast<int64_t>(l.g_idx.size()) == k, "read_linear: g_idx size");
}

inline void read_block(const io::ShardReader& r, int64_t b) {
  const std::string where = r.path() + ": /blocks/" + std::to_string(b);
  refused([&] { r.block_complete(b); });  // resume, eval, export
  refused([&] { r.verify_block(b); });    // resume, inspect
  refused([&] {
    for (const std::string& m : r.linears(b)) {
      refused([&] { r.read_linear_info(b, m); });    // inspect, export
      refused([&] { r.read_linear_tables(b, m); });  // export's zero check
      refused([&] {                                  // resume, eval, export
        const io::PackedLinear p = r.read_linear(b, m);
        check_linear(p);
        unpack(p).dequantize();
      });
    }
  });
  refused([&] {
    for (const std::string& t : r.block_tensors(b)) {
      refused([&] { r.read_block_tensor_info(b, t); });  // export
      refused([&] {                                      // resume, eval, export
        const io::DenseTensor d = r.read_block_tensor(b, t);
        check_dense(d);
        dense_to_f32(d, where);
      });
    }
  });
}

}  // namespace detail

// Everything the commands read of one shard.
inline void read_shard(const std::string& path) {
  const io::ShardReader r(path);
  refused([&] {
    for (int64_t b : r.blocks()) detail::read_block(r, b);
  });
  for (int64_t b : {int64_t{-1}, int64_t{3}}) refused([&] { r.block_complete(b); });
  refused([&] { r.read_linear(0, "self_attn.q_proj"); });  // by name, as resume and eval ask
  refused([&] { r.read_block_tensor(0, "input_layernorm.weight"); });
  refused([&] {
    for (const std::string& t : r.tensors()) {
      refused([&] { r.read_tensor_info(t); });
      refused([&] {
        const io::DenseTensor d = r.read_tensor(t);
        detail::check_dense(d);
        dense_to_f32(d, r.path());
      });
    }
  });
  refused([&] { r.verify_tensors(); });
  refused([&] { r.has_tensor("lm_head.weight"); });
}

// Everything the commands read of an output directory: model.h5, then each shard it names (at most 4), and the
// fixture's shard in any case.
inline void read_output(const std::string& dir) {
  std::set<std::string> shards = {kShardName};
  refused([&] {
    const io::ModelIndex index = io::read_model_index(dir);
    for (const auto& [block, shard] : index.block_shard)
      invariant(shard >= 0 && shard < static_cast<int64_t>(index.shard_files.size()), "model.h5: block shard index");
    for (const auto& [name, shard] : index.tensor_shard)
      invariant(shard >= 0 && shard < static_cast<int64_t>(index.shard_files.size()), "model.h5: tensor shard index");
    for (const std::string& f : index.shard_files)
      if (shards.size() < 4) shards.insert(f);
  });
  for (const std::string& f : shards) refused([&] { read_shard(dir + "/" + f); });
}

}  // namespace pipequant::fuzz
