#include "src/export.hpp"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "base/abort.hpp"
#include "base/error.hpp"
#include "comm/world.hpp"
#include "io/bitstream.hpp"
#include "io/hf_quant.hpp"
#include "io/model_config.hpp"
#include "io/safetensors.hpp"
#include "io/shard.hpp"
#include "src/model.hpp"
#include "src/version.hpp"

namespace fs = std::filesystem;

namespace pipequant {

const char* name(ExportFormat f) { return f == ExportFormat::kAwq ? "awq" : "gptq"; }

const char* name(CheckpointFormat f) {
  switch (f) {
    case CheckpointFormat::kAuto:
      return "auto";
    case CheckpointFormat::kGptq:
      return "gptq";
    case CheckpointFormat::kGptqV2:
      return "gptq_v2";
  }
  return "?";
}

namespace {

// Shard bytes are copied into the safetensors files as they are: both are little-endian.
static_assert(std::endian::native == std::endian::little, "export copies little-endian bytes as they are");

// A quantized linear of the output, by its attributes.
struct LinearRef {
  int64_t block = 0;
  size_t shard = 0;       // index into ModelIndex::shard_files
  std::string hf_name;    // "model.layers.<block>.<module>"
  io::PackedLinear info;  // attributes only
  size_t file = 0;        // the .safetensors file it goes to
};

// An unquantized tensor of the output (norms, biases, embedding, final norm, head).
struct DenseRef {
  int64_t block = -1;  // -1: under /tensors
  size_t shard = 0;
  std::string stored_name;  // relative to its block, or the HF name under /tensors
  std::string hf_name;
  io::DenseTensor info;  // dtype and shape
};

// What a tensor of the checkpoint is made from.
enum class Part { kDense, kQweight, kQzeros, kScales, kGidx };

struct OutTensor {
  io::TensorSpec spec;
  Part part = Part::kDense;
  size_t source = 0;  // index into Plan::linears, or into Plan::dense for kDense
};

struct OutFile {
  std::string name;
  std::vector<OutTensor> tensors;
  uint64_t bytes = 0;
};

// One linear's tensors, or one dense tensor: what stays together in one file.
struct Unit {
  std::string name;  // the HF name the tensors share (ordering)
  bool linear = false;
  size_t source = 0;
};

// Everything the export writes. It depends on the output and the options alone, never on the ranks.
struct Plan {
  io::ModelIndex index;
  std::vector<LinearRef> linears;
  std::vector<DenseRef> dense;
  std::vector<Unit> units;  // in file order
  std::vector<OutFile> files;
  io::HfQuantConfig config;
  uint64_t total_bytes = 0;
};

using Shards = std::vector<std::unique_ptr<io::ShardReader>>;  // by index into shard_files

template <typename... Args>
void say(const Args&... args) {
  if (world_rank() == 0) std::printf("%s\n", detail::concat(args...).c_str());
}

std::string where_of(const LinearRef& l) {
  return l.hf_name + " [" + std::to_string(l.info.out_features) + " x " + std::to_string(l.info.in_features) + "]";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

io::DType dense_dtype(const DenseRef& d) {
  if (d.info.dtype == "F32") return io::DType::kF32;
  if (d.info.dtype == "F16") return io::DType::kF16;
  if (d.info.dtype == "BF16") return io::DType::kBF16;
  fail(d.hf_name, ": dtype '", d.info.dtype, "' is not F32, F16 or BF16");
}

uint64_t spec_bytes(const io::TensorSpec& s) {
  uint64_t n = io::dtype_size(s.dtype);
  for (int64_t d : s.shape) n *= static_cast<uint64_t>(d);
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// What the output holds

Shards open_shards(const std::string& out_dir, const io::ModelIndex& index) {
  Shards shards;
  for (const auto& f : index.shard_files) shards.push_back(std::make_unique<io::ShardReader>(out_dir + "/" + f));
  return shards;
}

// The linears and dense tensors of the output, and the order of their units: the embedding, the blocks in order
// (each block's tensors by name), then the other model tensors (final norm, head) by name.
void collect_sources(Plan& plan, const Shards& shards) {
  const auto& tensor_shard = plan.index.tensor_shard;
  const auto add_model_tensor = [&](const std::string& name, int64_t s) {
    DenseRef d{-1, static_cast<size_t>(s), name, name, shards[static_cast<size_t>(s)]->read_tensor_info(name)};
    plan.units.push_back({name, false, plan.dense.size()});
    plan.dense.push_back(std::move(d));
  };
  const std::string embedding = "model.embed_tokens.weight";
  if (const auto it = tensor_shard.find(embedding); it != tensor_shard.end()) add_model_tensor(it->first, it->second);
  for (const auto& [block, s] : plan.index.block_shard) {
    const io::ShardReader& shard = *shards[static_cast<size_t>(s)];
    PQ_REQUIRE(shard.block_complete(block), shard.path(), ": block ", block,
               " is not complete, although model.h5 says the run finished");
    const std::string prefix = "model.layers." + std::to_string(block) + ".";
    std::vector<Unit> block_units;
    for (const auto& module : shard.linears(block)) {
      block_units.push_back({prefix + module, true, plan.linears.size()});
      plan.linears.push_back({block, static_cast<size_t>(s), prefix + module, shard.read_linear_info(block, module)});
    }
    for (const auto& name : shard.block_tensors(block)) {
      block_units.push_back({prefix + name, false, plan.dense.size()});
      plan.dense.push_back(
          {block, static_cast<size_t>(s), name, prefix + name, shard.read_block_tensor_info(block, name)});
    }
    std::sort(block_units.begin(), block_units.end(), [](const Unit& a, const Unit& b) { return a.name < b.name; });
    plan.units.insert(plan.units.end(), block_units.begin(), block_units.end());
  }
  for (const auto& [name, s] : tensor_shard)
    if (name != embedding) add_model_tensor(name, s);
  PQ_REQUIRE(!plan.linears.empty(), plan.index.shard_files.empty() ? "model.h5" : plan.index.shard_files[0],
             ": the output holds no quantized linear");
}

// ---------------------------------------------------------------------------------------------------------
// What the format can hold

// One quantization_config describes every linear: they must share bits, groups, symmetry and ordering.
io::HfQuantConfig model_config(const std::vector<LinearRef>& linears, ExportFormat format) {
  const io::PackedLinear& first = linears.front().info;
  const auto settings = [](const io::PackedLinear& l) {
    return "bits " + std::to_string(l.bits) + ", group_size " + std::to_string(l.group_size) + ", sym " +
           std::to_string(l.sym) + ", act_order " + std::to_string(l.act_order) + ", static_groups " +
           std::to_string(l.static_groups);
  };
  for (const auto& l : linears)
    PQ_REQUIRE(settings(l.info) == settings(first), "export: ", l.hf_name, " has ", settings(l.info), " but ",
               linears.front().hf_name, " has ", settings(first),
               ": one quantization_config describes every linear of a checkpoint");
  io::HfQuantConfig c;
  c.format = format == ExportFormat::kAwq ? io::HfQuantFormat::kAwq : io::HfQuantFormat::kGptq;
  c.bits = first.bits;
  c.group_size = first.group_size;
  c.desc_act = first.act_order;
  c.sym = first.sym;
  c.static_groups = first.static_groups;
  c.zero_point = true;  // the zeros are stored; symmetric ones are 2^(bits-1), the same model
  return c;
}

// The first linear for which `why` says something, and how many do; nullopt when none.
struct Finding {
  size_t first = 0;
  std::string why;
  int64_t count = 0;
};
std::optional<Finding> first_finding(const std::vector<LinearRef>& linears,
                                     const std::function<std::string(const io::PackedLinear&)>& why) {
  std::optional<Finding> f;
  for (size_t i = 0; i < linears.size(); ++i) {
    const std::string w = why(linears[i].info);
    if (w.empty()) continue;
    if (!f) f = Finding{i, w, 0};
    ++f->count;
  }
  return f;
}

// GPTQ loaders pack K in whole words and groups of whole size; ours writes what it has, and says so.
void warn_gptq_shapes(const std::vector<LinearRef>& linears) {
  const auto partial_words = first_finding(linears, [](const io::PackedLinear& l) {
    return l.in_features * l.bits % 32 == 0
               ? std::string()
               : "K*bits = " + std::to_string(l.in_features * l.bits) + " is not a multiple of 32";
  });
  if (partial_words)
    say("export: warning: ", partial_words->count, " linear(s), the first ", where_of(linears[partial_words->first]),
        ": ", partial_words->why,
        ": qweight has ceil(K*bits/32) rows, its last word partly filled; most GPTQ kernels need K*bits % 32 == 0");
  const auto ragged = first_finding(linears, [](const io::PackedLinear& l) {
    return l.group_size <= 0 || l.in_features % l.group_size == 0
               ? std::string()
               : "K = " + std::to_string(l.in_features) + " is not a multiple of group_size " +
                     std::to_string(l.group_size);
  });
  if (ragged)
    say("export: warning: ", ragged->count, " linear(s), the first ", where_of(linears[ragged->first]), ": ",
        ragged->why, ": the last group is shorter; most GPTQ kernels need K % group_size == 0");
}

// AutoAWQ's GEMM layout: 4-bit, whole groups along K in natural order, 8 output columns per word.
std::string awq_shape_problem(const io::PackedLinear& l) {
  if (l.bits != 4) return "bits is " + std::to_string(l.bits) + " (the AWQ layout is 4-bit only)";
  if (l.group_size <= 0)
    return "group_size is -1 (one group per row): AutoAWQ has no per-row mode (quantize with a group size)";
  if (l.in_features % l.group_size != 0)
    return "K = " + std::to_string(l.in_features) + " is not a multiple of group_size " + std::to_string(l.group_size) +
           " (AWQ groups are whole)";
  if (l.out_features % 8 != 0)
    return "N = " + std::to_string(l.out_features) + " is not a multiple of 8 (AWQ packs 8 output columns per word)";
  return {};
}

void refuse_awq_shapes(const std::vector<LinearRef>& linears) {
  if (const auto f = first_finding(linears, awq_shape_problem))
    fail("export --format awq: ", where_of(linears[f->first]), ": ", f->why,
         f->count > 1 ? " (and " + std::to_string(f->count - 1) + " more linear(s))" : std::string(),
         "; export --format gptq instead");
}

// ---------------------------------------------------------------------------------------------------------
// Files

std::vector<OutTensor> linear_tensors(const LinearRef& l, size_t index, ExportFormat format) {
  const io::PackedLinear& p = l.info;
  const int64_t k = p.in_features, n = p.out_features, g = p.groups;
  const auto t = [&](const char* suffix, io::DType dtype, std::vector<int64_t> shape, Part part) {
    return OutTensor{{l.hf_name + "." + suffix, dtype, std::move(shape)}, part, index};
  };
  if (format == ExportFormat::kAwq)
    return {t("qweight", io::DType::kI32, {k, n / 8}, Part::kQweight),
            t("qzeros", io::DType::kI32, {g, n / 8}, Part::kQzeros),
            t("scales", io::DType::kF16, {g, n}, Part::kScales)};
  return {t("qweight", io::DType::kI32, {ceil_div(k * p.bits, 32), n}, Part::kQweight),
          t("qzeros", io::DType::kI32, {g, ceil_div(n * p.bits, 32)}, Part::kQzeros),
          t("scales", io::DType::kF16, {g, n}, Part::kScales), t("g_idx", io::DType::kI32, {k}, Part::kGidx)};
}

std::string file_name(size_t i, size_t count) {
  if (count == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, count);
  return buf;
}

// The units in order into files of at most max_bytes each (a unit larger than that gets a file alone).
void assign_files(Plan& plan, ExportFormat format, uint64_t max_bytes) {
  for (const Unit& u : plan.units) {
    std::vector<OutTensor> tensors;
    if (u.linear) {
      tensors = linear_tensors(plan.linears[u.source], u.source, format);
    } else {
      const DenseRef& d = plan.dense[u.source];
      tensors.push_back({{d.hf_name, dense_dtype(d), d.info.shape}, Part::kDense, u.source});
    }
    uint64_t bytes = 0;
    for (const auto& t : tensors) bytes += spec_bytes(t.spec);
    if (plan.files.empty() || (!plan.files.back().tensors.empty() && plan.files.back().bytes + bytes > max_bytes))
      plan.files.emplace_back();
    OutFile& f = plan.files.back();
    if (u.linear) plan.linears[u.source].file = plan.files.size() - 1;
    f.tensors.insert(f.tensors.end(), tensors.begin(), tensors.end());
    f.bytes += bytes;
    plan.total_bytes += bytes;
  }
  for (size_t i = 0; i < plan.files.size(); ++i) plan.files[i].name = file_name(i, plan.files.size());
}

bool mine(size_t file) { return static_cast<int>(file % static_cast<size_t>(world_size())) == world_rank(); }

// The first linear (index) any rank finds `bad`: each rank reads the tables of the linears of its own files.
std::optional<size_t> first_bad_linear(const Plan& plan, const Shards& shards,
                                       const std::function<bool(const io::PackedLinear&)>& bad) {
  int64_t first = static_cast<int64_t>(plan.linears.size());
  for (size_t i = 0; i < plan.linears.size() && static_cast<int64_t>(i) < first; ++i) {
    const LinearRef& l = plan.linears[i];
    if (!mine(l.file)) continue;
    if (bad(shards[l.shard]->read_linear_tables(l.block, l.info.module))) first = static_cast<int64_t>(i);
  }
  first = comm::world_min(first);
  if (first >= static_cast<int64_t>(plan.linears.size())) return std::nullopt;
  return static_cast<size_t>(first);
}

std::vector<uint8_t> zeros_of(const io::PackedLinear& l) {
  return io::unpack_rows(l.qzeros.data(), l.groups, l.out_features, l.bits);  // [G][N]
}

// "(group g, column n)" of the first zero point that is 0.
std::string first_zero(const io::PackedLinear& l) {
  const auto z = zeros_of(l);
  const auto it = std::find(z.begin(), z.end(), uint8_t{0});
  const int64_t i = it - z.begin();
  return "(group " + std::to_string(i / l.out_features) + ", column " + std::to_string(i % l.out_features) + ")";
}

// gptq (v1) stores zero - 1 and cannot hold a zero of 0: auto then writes gptq_v2, and says why.
io::HfQuantFormat zero_convention(const Plan& plan, const Shards& shards, CheckpointFormat requested) {
  if (requested == CheckpointFormat::kGptqV2) return io::HfQuantFormat::kGptqV2;
  const auto bad = first_bad_linear(plan, shards, [](const io::PackedLinear& l) {
    const auto z = zeros_of(l);
    return !io::gptq_v1_can_hold(z.data(), static_cast<int64_t>(z.size()));
  });
  if (!bad) return io::HfQuantFormat::kGptq;
  const LinearRef& l = plan.linears[*bad];
  const std::string zero = first_zero(shards[l.shard]->read_linear_tables(l.block, l.info.module));
  PQ_REQUIRE(requested == CheckpointFormat::kAuto, "export --checkpoint-format gptq: ", where_of(l),
             " has a zero point of 0 ", zero,
             ", which gptq (v1: stores zero - 1) cannot hold; use --checkpoint-format gptq_v2 (or auto)");
  say("export: checkpoint_format gptq_v2: ", where_of(l), " has a zero point of 0 ", zero,
      ", which gptq (v1: stores zero - 1) cannot hold");
  return io::HfQuantFormat::kGptqV2;
}

// AWQ has no g_idx: every linear's groups must be k / group_size (act-order only with static groups).
void refuse_awq_g_idx(const Plan& plan, const Shards& shards) {
  const auto bad = first_bad_linear(plan, shards, [](const io::PackedLinear& l) {
    for (int64_t k = 0; k < l.in_features; ++k)
      if (l.g_idx[static_cast<size_t>(k)] != k / l.group_size) return true;
    return false;
  });
  if (bad)
    fail("export --format awq: ", where_of(plan.linears[*bad]),
         ": g_idx is not k / group_size (act-order without static groups), which the AWQ layout cannot hold; quantize "
         "with --static-groups or without --act-order, or export --format gptq");
}

// ---------------------------------------------------------------------------------------------------------
// Writing

// One linear's tensors in the export layout, made once for its three or four tensors.
struct ExportedLinear {
  std::vector<int32_t> qweight;
  std::vector<int32_t> qzeros;
  std::vector<uint16_t> scales;
  std::vector<int32_t> g_idx;
};

ExportedLinear export_linear(io::PackedLinear p, ExportFormat format, io::HfQuantFormat zeros_format,
                             const std::string& where) {
  const int64_t k = p.in_features, n = p.out_features, g = p.groups;
  const std::vector<uint8_t> zeros = zeros_of(p);  // [G][N]
  ExportedLinear e;
  if (format == ExportFormat::kAwq) {
    const std::vector<uint8_t> codes = io::unpack_columns(p.qweight.data(), k, n, p.bits);  // [K][N]
    e.qweight = io::awq_pack(codes.data(), k, n);
    e.qzeros = io::awq_pack(zeros.data(), g, n);
  } else {
    e.qweight = std::move(p.qweight);  // GPTQ's bit stream along K, as stored
    e.qzeros = io::gptq_pack_zeros(zeros.data(), g, n, p.bits, zeros_format, where);
    e.g_idx = std::move(p.g_idx);
  }
  e.scales = std::move(p.scales);
  return e;
}

template <typename T>
void copy_into(std::span<std::byte> out, const std::vector<T>& v, const std::string& name) {
  PQ_ASSERT(out.size() == v.size() * sizeof(T), "export: ", name, ": ", v.size() * sizeof(T), " bytes made, ",
            out.size(), " planned");
  std::memcpy(out.data(), v.data(), out.size());
}

void write_file(const Plan& plan, const OutFile& file, const Shards& shards, const fs::path& dir, ExportFormat format,
                io::HfQuantFormat zeros_format) {
  std::optional<size_t> cached;  // the linear whose tensors `current` holds
  ExportedLinear current;
  const auto fill = [&](size_t i, std::span<std::byte> out) {
    const OutTensor& t = file.tensors[i];
    if (t.part == Part::kDense) {
      const DenseRef& d = plan.dense[t.source];
      const io::ShardReader& shard = *shards[d.shard];
      const io::DenseTensor x =
          d.block < 0 ? shard.read_tensor(d.stored_name) : shard.read_block_tensor(d.block, d.stored_name);
      PQ_REQUIRE(x.bytes.size() == out.size(), shard.path(), ": ", d.stored_name, ": ", x.bytes.size(),
                 " bytes, expected ", out.size(), " from its shape");
      std::memcpy(out.data(), x.bytes.data(), out.size());
      return;
    }
    if (cached != t.source) {
      const LinearRef& l = plan.linears[t.source];
      current = export_linear(shards[l.shard]->read_linear(l.block, l.info.module), format, zeros_format, l.hf_name);
      cached = t.source;
    }
    switch (t.part) {
      case Part::kQweight:
        return copy_into(out, current.qweight, t.spec.name);
      case Part::kQzeros:
        return copy_into(out, current.qzeros, t.spec.name);
      case Part::kScales:
        return copy_into(out, current.scales, t.spec.name);
      case Part::kGidx:
        return copy_into(out, current.g_idx, t.spec.name);
      case Part::kDense:
        break;
    }
  };
  std::vector<io::TensorSpec> specs;
  for (const auto& t : file.tensors) specs.push_back(t.spec);
  io::write_safetensors((dir / file.name).string(), specs, fill, {{"format", "pt"}});
}

void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  PQ_REQUIRE(out.good(), file.string(), ": cannot open for writing: ", std::strerror(errno));
  out << text;
  out.flush();
  PQ_REQUIRE(out.good(), file.string(), ": write failed: ", std::strerror(errno));
}

nlohmann::json source_config(const Plan& plan, const std::string& out_dir) {
  try {
    return nlohmann::json::parse(plan.index.config_json);
  } catch (const nlohmann::json::exception& e) {
    fail(out_dir, "/model.h5: config_json is not JSON: ", e.what());
  }
}

// A Mixture-of-Experts model's linears a GPTQ loader converts in each block (quantization_config
// modules_in_block_to_quantize, in true-sequential groups: q/k/v, o, every gate and up, every down), so that the
// routers and Qwen2-MoE's shared-expert gate, kept dense, are left as they are; null for a dense model, whose
// loaders convert every linear of a block.
nlohmann::json moe_modules_to_quantize(const nlohmann::json& source, const std::string& out_dir) {
  const io::ModelConfig c = io::ModelConfig::from_json(source, out_dir + "/model.h5: config_json");
  if (!c.moe()) return nullptr;
  std::vector<std::set<std::string>> groups(kLinearGroups);
  for (int64_t b = 0; b < c.num_layers; ++b) {
    for (int i = 0; i < block_linear_count(c, b); ++i)
      groups[static_cast<size_t>(kLinears[static_cast<size_t>(i)].group)].insert(kLinears[static_cast<size_t>(i)].module);
    if (!c.moe_block(b)) continue;
    for (int64_t e = 0; e < solved_experts(c); ++e) {
      const auto m = solved_expert_modules(c, e);
      groups[2].insert({m[0], m[1]});
      groups[3].insert(m[2]);
    }
  }
  nlohmann::json j = nlohmann::json::array();
  for (const auto& g : groups) j.push_back(std::vector<std::string>(g.begin(), g.end()));
  return j;
}

void write_configs(const Plan& plan, const ExportOptions& o, const fs::path& dir) {
  nlohmann::json qc = io::quantization_config_json(plan.config, std::string("pipequant:") + version());
  nlohmann::json config = source_config(plan, o.out_dir);
  if (const nlohmann::json moe = moe_modules_to_quantize(config, o.out_dir);
      !moe.is_null() && o.format == ExportFormat::kGptq)
    qc["modules_in_block_to_quantize"] = moe;
  config["quantization_config"] = qc;
  write_text(dir / "config.json", config.dump(2) + "\n");
  // GPTQModel and AutoGPTQ also read the config beside the weights
  if (o.format == ExportFormat::kGptq) write_text(dir / "quantize_config.json", qc.dump(2) + "\n");
  if (plan.files.size() > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", plan.total_bytes}}}, {"weight_map", nlohmann::json::object()}};
    for (const auto& f : plan.files)
      for (const auto& t : f.tensors) index["weight_map"][t.spec.name] = f.name;
    write_text(dir / "model.safetensors.index.json", index.dump(2) + "\n");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tokenizer files

bool is_tokenizer_file(const std::string& name) {
  static const std::set<std::string> kNames = {
      "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
      "chat_template.json",     "chat_template.jinja"};
  if (kNames.count(name) || name.rfind("tokenizer", 0) == 0) return true;         // tokenizer.model/.json/_config.json
  return name.rfind("tok", 0) == 0 && name.size() > 7 && name.ends_with(".bin");  // llama2.c's tok512.bin
}

// The directory whose tokenizer files are copied: --model, else the --model recorded in model.h5 if it is still
// there (nullopt, and a note, when it is not).
std::optional<fs::path> tokenizer_source(const ExportOptions& o, const io::ModelIndex& index, std::string& note) {
  if (!o.model_dir.empty()) {
    PQ_REQUIRE(fs::is_directory(o.model_dir), "--model ", o.model_dir, ": no such directory");
    return fs::path(o.model_dir);
  }
  std::string recorded;
  try {
    const auto args = nlohmann::json::parse(index.args_json);
    if (args.contains("model") && args["model"].is_string()) recorded = args["model"].get<std::string>();
  } catch (const nlohmann::json::exception&) {
    // no usable record: the note below says so
  }
  if (!recorded.empty() && fs::is_directory(recorded)) return fs::path(recorded);
  note = "export: note: the model directory recorded in model.h5 ('" + recorded +
         "') is not there: no tokenizer files copied (give --model DIR)";
  return std::nullopt;
}

// Warns when the source directory's config.json is not the one the output was made from.
void check_source_config(const fs::path& src, const Plan& plan, const std::string& out_dir) {
  const fs::path file = src / "config.json";
  if (!fs::is_regular_file(file)) return;
  std::ifstream in(file);
  nlohmann::json there;
  try {
    there = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception&) {
    return;
  }
  if (there != source_config(plan, out_dir))
    say("export: warning: ", file.string(), " differs from the config recorded in ", out_dir,
        "/model.h5: the tokenizer files copied from there may not be this model's");
}

std::vector<std::string> copy_tokenizer_files(const fs::path& src, const fs::path& dir) {
  std::vector<std::string> copied;
  for (const auto& entry : fs::directory_iterator(src)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || !is_tokenizer_file(name)) continue;
    std::error_code ec;
    fs::copy_file(entry.path(), dir / name, fs::copy_options::overwrite_existing, ec);
    PQ_REQUIRE(!ec, entry.path().string(), ": cannot copy to ", (dir / name).string(), ": ", ec.message());
    copied.push_back(name);
  }
  std::sort(copied.begin(), copied.end());
  return copied;
}

// ---------------------------------------------------------------------------------------------------------
// The directory

// DIR without a trailing slash, absolute.
fs::path target_dir(const std::string& to) {
  PQ_REQUIRE(!to.empty(), "pipequant export: --to is empty");
  fs::path p = fs::absolute(to).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p;
}

bool is_within(const fs::path& inner, const fs::path& outer) {
  const fs::path a = fs::weakly_canonical(inner), b = fs::weakly_canonical(outer);
  const auto [end_b, end_a] = std::mismatch(b.begin(), b.end(), a.begin(), a.end());
  return end_b == b.end();
}

void check_target(const ExportOptions& o, const fs::path& target) {
  PQ_REQUIRE(!is_within(o.out_dir, target), "--to ", o.to_dir, " would hold the quantized output ", o.out_dir,
             " itself: choose another directory");
  if (!fs::exists(target)) return;
  PQ_REQUIRE(fs::is_directory(target), "--to ", o.to_dir, ": exists and is not a directory");
  PQ_REQUIRE(o.overwrite || fs::is_empty(target), "--to ", o.to_dir,
             ": exists and is not empty (give --overwrite to replace it)");
}

// Renames the finished `partial` to `target`, replacing what --overwrite allowed.
void move_into_place(const fs::path& partial, const fs::path& target) {
  std::error_code ec;
  fs::path aside = target;
  aside += ".replaced";
  const bool replacing = fs::exists(target);
  if (replacing) {
    PQ_REQUIRE(!fs::exists(aside), aside.string(), ": exists (left by an earlier export that failed while replacing ",
               target.string(), "; it may be the only copy of that export): move or remove it, then export again");
    fs::rename(target, aside, ec);
    PQ_REQUIRE(!ec, target.string(), ": cannot move the old directory aside: ", ec.message());
  }
  fs::rename(partial, target, ec);
  if (ec && replacing) {
    std::error_code back;
    fs::rename(aside, target, back);  // the old export stays where it was
  }
  PQ_REQUIRE(!ec, partial.string(), ": cannot rename to ", target.string(), ": ", ec.message());
  if (replacing) fs::remove_all(aside, ec);
}

std::string config_summary(const Plan& plan, ExportFormat format) {
  const io::HfQuantConfig& c = plan.config;
  std::string s =
      format == ExportFormat::kAwq ? "awq (gemm)" : std::string("gptq, checkpoint_format ") + io::name(c.format);
  return s + ", " + std::to_string(c.bits) + "-bit, group_size " + std::to_string(c.group_size) +
         (c.sym ? ", sym" : ", asym") + (c.desc_act ? ", desc_act" : "");
}

// GPTQ's damp_percent is our --damp (relative to mean(diag(H))), when the run was a GPTQ one.
std::optional<double> recorded_damp(const io::ModelIndex& index) {
  try {
    const auto args = nlohmann::json::parse(index.args_json);
    if (args.value("method", std::string()) == "gptq" && args.contains("damp") && args["damp"].is_number())
      return args["damp"].get<double>();
  } catch (const nlohmann::json::exception&) {
    // not recorded: the config goes without it
  }
  return std::nullopt;
}

}  // namespace

namespace {

// Everything an export decides before it writes, the same on every rank: the files and their tensors, the
// quantization config and the zero-point convention, where the tokenizer comes from. Throws UserError (nothing
// written yet) for anything the format or the target refuses.
Plan plan_export(const ExportOptions& o, io::ModelIndex index, const fs::path& target, const Shards& shards,
                 std::optional<fs::path>& tokenizer_dir, std::string& note) {
  Plan plan;
  plan.index = std::move(index);
  collect_sources(plan, shards);
  plan.config = model_config(plan.linears, o.format);
  if (o.format == ExportFormat::kGptq) plan.config.damp_percent = recorded_damp(plan.index);
  tokenizer_dir = tokenizer_source(o, plan.index, note);
  if (tokenizer_dir)  // --overwrite would remove it
    PQ_REQUIRE(!is_within(*tokenizer_dir, target), "--to ", o.to_dir, " would hold the model directory ",
               tokenizer_dir->string(), " itself: choose another directory");
  if (o.format == ExportFormat::kAwq)
    refuse_awq_shapes(plan.linears);
  else
    warn_gptq_shapes(plan.linears);
  assign_files(plan, o.format, o.max_shard_bytes);
  if (o.format == ExportFormat::kAwq)
    refuse_awq_g_idx(plan, shards);
  else
    plan.config.format = zero_convention(plan, shards, o.checkpoint_format);
  if (tokenizer_dir) check_source_config(*tokenizer_dir, plan, o.out_dir);
  return plan;
}

// Rank 0, after every rank wrote its files: the configs and the tokenizer files, then the rename into place.
void finish_directory(const Plan& plan, const ExportOptions& o, const std::optional<fs::path>& tokenizer_dir,
                      const std::string& note, const fs::path& partial, const fs::path& target) {
  write_configs(plan, o, partial);
  if (tokenizer_dir) {
    const auto copied = copy_tokenizer_files(*tokenizer_dir, partial);
    std::string list;
    for (const auto& c : copied) list += (list.empty() ? "" : ", ") + c;
    say("export: tokenizer files from ", tokenizer_dir->string(), ": ", copied.empty() ? "none found" : list);
  } else {
    say(note);
  }
  move_into_place(partial, target);
}

}  // namespace

void run_export(const ExportOptions& o) {
  PQ_REQUIRE(o.max_shard_bytes > 0, "--max-shard-gb must be positive");
  PQ_REQUIRE(o.format == ExportFormat::kGptq || o.checkpoint_format == CheckpointFormat::kAuto, "--checkpoint-format ",
             name(o.checkpoint_format), " is for --format gptq (AWQ stores the zeros as they are)");
  const fs::path target = target_dir(o.to_dir);
  check_target(o, target);
  io::ModelIndex index = io::read_model_index(o.out_dir);
  PQ_REQUIRE(index.complete, o.out_dir,
             "/model.h5: the run did not finish (complete = 0): run the same quantize command again to finish it, "
             "then export");
  const Shards shards = open_shards(o.out_dir, index);
  std::optional<fs::path> tokenizer_dir;
  std::string note;
  const Plan plan = plan_export(o, std::move(index), target, shards, tokenizer_dir, note);
  say("export: ", o.out_dir, " -> ", target.string(), ": ", config_summary(plan, o.format), ", ", plan.linears.size(),
      " linears, ", plan.dense.size(), " other tensors, ", plan.files.size(), " safetensors file(s), ",
      plan.total_bytes, " bytes");

  fs::path partial = target;
  partial += ".partial";
  // a failure on this rank removes the partial directory before the job ends: nothing that looks complete stays
  const auto cleaned = [&](const auto& step) {
    try {
      step();
    } catch (const UserError&) {
      std::error_code ec;
      fs::remove_all(partial, ec);
      throw;
    }
  };
  if (world_rank() == 0) {
    std::error_code ec;
    fs::remove_all(partial, ec);  // left by an export that was interrupted
    fs::create_directories(partial, ec);
    PQ_REQUIRE(!ec, partial.string(), ": cannot create the directory: ", ec.message());
  }
  comm::world_barrier();
  cleaned([&] {
    for (size_t f = 0; f < plan.files.size(); ++f)
      if (mine(f)) write_file(plan, plan.files[f], shards, partial, o.format, plan.config.format);
  });
  comm::world_barrier();
  if (world_rank() == 0) {
    cleaned([&] { finish_directory(plan, o, tokenizer_dir, note, partial, target); });
    say("export: wrote ", target.string());
  }
  comm::world_barrier();
}

}  // namespace pipequant
