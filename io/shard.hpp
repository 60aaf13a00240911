#pragma once
// The HDF5 output (docs/design.md section 5). One shard per stage, written through parallel HDF5 (MPI-IO) on the
// stage communicator, and model.h5, written by rank 0, which holds the config, the arguments, the
// fingerprint and external links to every block and tensor, so that one file shows the whole model.
//
// Shard layout:
//   /blocks/<i>/<module>/qweight  int32 [ceil(K*bits/32), N]  codes packed along K, lowest bits first
//   /blocks/<i>/<module>/qzeros   int32 [G, ceil(N*bits/32)]  zero points packed along N (the real zero)
//   /blocks/<i>/<module>/scales   float16 [G, N]
//   /blocks/<i>/<module>/g_idx    int32 [K]
//     attributes: bits, group_size, sym, act_order, static_groups, damp, fallback, relative_error,
//                 rtn_relative_error, awq_scale_exponent, awq_clip (optional: -1 and 1 when absent), in_features,
//                 out_features, groups, checksum_<dataset> (CRC-32 of the bytes)
//   /blocks/<i>/<tensor name>     unquantized block tensors (norms, biases) in their source dtype (F32: float,
//                                 F16: IEEE half, BF16: a 16-bit float type with bfloat16's fields), with
//                                 attributes dtype and checksum
//     attribute on /blocks/<i>: complete = 1, written last
//   /tensors/<hf name>            unquantized model tensors (embed_tokens, norm, lm_head), attribute checksum
// HDF5's own error printing is switched off; failures become UserError with the file and the object.

#include <mpi.h>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace pipequant::io {

// A quantized linear in the packed GPTQ layout above.
struct PackedLinear {
  std::string module;        // e.g. "self_attn.q_proj"
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
  int64_t groups = 0;        // G
  int bits = 4;
  int64_t group_size = -1;  // -1: one group per row
  bool sym = false;
  bool act_order = false;
  bool static_groups = false;
  double damp = 0.0;                // the damping actually used (relative, after any fallback)
  std::string fallback = "none";    // none | damp | rtn | cpu
  double relative_error = 0.0;      // ||WX - QX||^2 / ||WX||^2 on the calibration inputs
  double rtn_relative_error = 0.0;  // the same for round-to-nearest on the same inputs (the baseline)
  double awq_scale_exponent = -1.0;  // --method awq: the exponent of the scales folded into its inputs (-1: none)
  double awq_clip = 1.0;             // --method awq: the mean clip ratio over its (row, group) pairs (1: none)
  // A Mixture-of-Experts expert's linear: the calibration tokens the router sent to the expert (over the whole run;
  // -1: not an expert's), and the tokens its Hessian saw: "routed", "all" (--moe-calibration all) or "all (low
  // tokens)" (fewer routed than --moe-min-tokens).
  int64_t expert_tokens = -1;
  std::string expert_hessian;
  std::vector<int32_t> qweight;     // [ceil(K*bits/32), N]
  std::vector<int32_t> qzeros;      // [G, ceil(N*bits/32)]
  std::vector<uint16_t> scales;     // fp16 bits [G, N]
  std::vector<int32_t> g_idx;       // [K]
};

// An unquantized tensor, kept in its source dtype ("F32", "F16" or "BF16").
struct DenseTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<char> bytes;
};

uint32_t crc32_of(const void* data, size_t bytes);

class ShardWriter {
 public:
  // Creates `path` (truncating) or, with `resume`, opens it for appending; collective on `comm`.
  // Throws UserError if the file cannot be created (names the path and the reason).
  ShardWriter(const std::string& path, MPI_Comm comm, bool resume);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Collective. Replaces the block's group if it exists (a block redone on resume).
  void begin_block(int64_t block);
  void write_linear(int64_t block, const PackedLinear& linear);
  void write_block_tensor(int64_t block, const DenseTensor& tensor);
  void write_tensor(const DenseTensor& tensor);
  // Writes complete = 1 on /blocks/<block> and flushes the file: the block is durable from here on.
  void mark_complete(int64_t block);
  // Collective I/O really happened for the last raw-data write (H5Pget_mpio_no_collective_cause == 0).
  bool last_write_was_collective() const { return last_collective_; }
  // The global H5D_mpio_no_collective_cause_t bits of the last raw-data write (0 = collective).
  uint32_t last_no_collective_cause() const { return last_cause_; }
  // Bytes of raw data written to the file by the whole communicator (the same value on every rank).
  uint64_t bytes_written() const { return bytes_written_; }
  // Bytes of raw data this rank wrote: its slice of every dataset.
  uint64_t rank_bytes_written() const { return rank_bytes_written_; }
  const std::string& path() const { return path_; }
  // Collective; closes the file. Idempotent; the destructor calls it and swallows errors.
  void close();

 private:
  // Writes one dataset under `parent` (an open hid_t) and records the collective cause and the bytes.
  void write_dataset(long long parent, const std::string& object, const std::string& name, long long file_type,
                     long long mem_type, const std::vector<int64_t>& shape, const void* data, size_t elem_bytes);
  void close_file();
  // Collective: throws UserError when path_ no longer names the file this writer opened (removed or replaced: the
  // rest of the run would go to an unlinked file, and the output be marked complete without it).
  void check_still_in_place() const;

  std::string path_;
  long long file_ = -1;  // hid_t
  std::pair<uint64_t, uint64_t> identity_{0, 0};  // device and inode of the opened file (rank 0)
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  bool last_collective_ = false;
  uint32_t last_cause_ = 0;
  uint64_t bytes_written_ = 0;
  uint64_t rank_bytes_written_ = 0;
};

// Resume: opens an existing shard alone (no MPI) and deletes what an interrupted run left unfinished, every
// /blocks/<i> not in `keep` and every /tensors entry (the resumed run writes them again), so that the run never
// has to replace an object that a kill in the middle of a metadata flush may have left half written. Throws
// UserError when HDF5 cannot delete one (a damaged object header): the caller starts the shard over.
void remove_unfinished(const std::string& path, const std::set<int64_t>& keep);

class ShardReader {
 public:
  explicit ShardReader(const std::string& path);  // serial, read-only; throws UserError
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  const std::string& path() const { return path_; }
  std::vector<int64_t> blocks() const;  // sorted
  bool block_complete(int64_t block) const;
  std::vector<std::string> linears(int64_t block) const;        // modules with a qweight
  std::vector<std::string> block_tensors(int64_t block) const;  // the dense ones
  PackedLinear read_linear(int64_t block, const std::string& module) const;
  // The attributes only (the four vectors stay empty): cheap, for listings of large models.
  PackedLinear read_linear_info(int64_t block, const std::string& module) const;
  // The attributes with qzeros and g_idx (qweight and scales stay empty): what a check of the zero points and the
  // grouping reads, without the codes.
  PackedLinear read_linear_tables(int64_t block, const std::string& module) const;
  DenseTensor read_block_tensor(int64_t block, const std::string& name) const;
  // Name, dtype and shape only (bytes stay empty): the size of a tensor without reading it.
  DenseTensor read_block_tensor_info(int64_t block, const std::string& name) const;
  bool has_tensor(const std::string& name) const;
  DenseTensor read_tensor(const std::string& name) const;
  DenseTensor read_tensor_info(const std::string& name) const;  // name, dtype and shape only
  std::vector<std::string> tensors() const;
  // Recomputes every checksum of the block; names of what does not match are returned (empty = good).
  std::vector<std::string> verify_block(int64_t block) const;
  // The same for /tensors.
  std::vector<std::string> verify_tensors() const;

 private:
  std::string path_;
  long long file_ = -1;
};

// model.h5: written by rank 0 alone after the shards are closed, or rewritten on resume.
struct ModelIndex {
  std::string config_json;  // the source config.json
  std::string args_json;    // the run's arguments
  std::string fingerprint;  // hex digest of model, calibration data and arguments
  std::string format = "gptq";
  std::vector<std::string> shard_files;         // relative to the output directory
  std::map<int64_t, int64_t> block_shard;       // block -> index into shard_files
  std::map<std::string, int64_t> tensor_shard;  // /tensors name -> index into shard_files
  bool complete = false;                        // every block complete and verified
};
void write_model_index(const std::string& out_dir, const ModelIndex& index);
// Throws UserError if out_dir has no readable model.h5.
ModelIndex read_model_index(const std::string& out_dir);
bool model_index_exists(const std::string& out_dir);

// Call once at start: turns HDF5's automatic error printing off for the whole process.
void silence_hdf5_errors();

// Bytes of the four packed datasets of a linear, from its shape attributes: the size the shard holds.
uint64_t packed_bytes(const PackedLinear& linear);

}  // namespace pipequant::io
