// The Hugging Face GPTQ and AWQ layouts and their quantization_config (io/hf_quant.hpp).
//
// How the public loaders read GPTQ zeros (checked against their sources):
// - AutoGPTQ's QuantLinear dequantization (and vLLM's gptq_gemm for checkpoint_format "gptq") unpack each field
//   and add 1: zero = ((word >> shift) & mask) + 1, so a stored 2^bits - 1 reads as 2^bits. gptq_unpack_zeros
//   does exactly that.
// - GPTQModel converts v1 to v2 on load (convert_gptq_v1_to_v2_format_module) by adding 0x11111111 (4-bit; 0x5555...
//   for 2-bit, ...) to each whole qzeros word: the same +1 per field, except that a stored 2^bits - 1 carries into
//   the next field. gptq_pack_zeros never stores 2^bits - 1 in v1 (it refuses a zero of 0), so both readings agree
//   on what pipequant writes.
// - Who reads checkpoint_format "gptq_v2" (zeros stored as they are): GPTQModel (its own kernels; transformers and
//   optimum go through GPTQModel's hf_convert_gptq_v1_to_v2_format, which takes checkpoint_format from the config);
//   vLLM's gptq_marlin/gptq_bitblas paths (4/8-bit symmetric) and, since vllm-project/vllm#26092, its plain GPTQ
//   path (gptq_gemm use_v2_format). Older vLLM and AutoGPTQ ignore the field and read every checkpoint as v1.
#include "io/hf_quant.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <limits>

#include "base/error.hpp"
#include "io/bitstream.hpp"
#include "io/json.hpp"

namespace pipequant::io {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The fields of one quantization_config object, each read with a type check naming `origin` and the field.
class ConfigFields {
 public:
  ConfigFields(const json& j, const std::string& origin) : j_(j), origin_(origin) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  // The first of `keys` present, or nullptr.
  const char* first_of(std::initializer_list<const char*> keys) const {
    for (const char* k : keys)
      if (has(k)) return k;
    return nullptr;
  }

  // Bits and group sizes: 32-bit integers (a larger one, 4294967300 say, must not pass for the 4 it truncates to).
  int64_t integer(const char* key) const {
    const json& v = j_[key];
    constexpr int64_t kMin = std::numeric_limits<int32_t>::min(), kMax = std::numeric_limits<int32_t>::max();
    const bool in_range = v.is_number_unsigned()
                              ? v.get<uint64_t>() <= static_cast<uint64_t>(kMax)
                              : v.is_number_integer() && v.get<int64_t>() >= kMin && v.get<int64_t>() <= kMax;
    PQ_REQUIRE(in_range, origin_, ": field ", key, ": expected a 32-bit integer, got ", v.dump());
    return v.get<int64_t>();
  }
  bool boolean(const char* key, bool absent) const {
    if (!has(key)) return absent;
    const json& v = j_[key];
    PQ_REQUIRE(v.is_boolean(), origin_, ": field ", key, ": expected true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string text(const char* key, const std::string& absent) const {
    if (!has(key)) return absent;
    const json& v = j_[key];
    PQ_REQUIRE(v.is_string(), origin_, ": field ", key, ": expected a string, got ", v.dump());
    return v.get<std::string>();
  }
  const json& operator[](const char* key) const { return j_[key]; }
  const std::string& origin() const { return origin_; }

 private:
  const json& j_;
  const std::string& origin_;
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// "gptq", "awq", or "" when the object says neither; quantize_config.json of older AutoGPTQ and AutoAWQ's
// quant_config.json carry no quant_method, so their keys tell.
std::string quant_method_of(const ConfigFields& f) {
  if (f.has("quant_method")) return lower(f.text("quant_method", ""));
  if (f.has("w_bit")) return "awq";
  if (f.has("bits")) return "gptq";
  return "";
}

int64_t group_size_of(const ConfigFields& f, const char* key) {
  PQ_REQUIRE(f.has(key), f.origin(), ": field ", key, ": missing (the group size, or -1 for one group per row)");
  const int64_t g = f.integer(key);
  PQ_REQUIRE(g == -1 || g > 0, f.origin(), ": field ", key, ": expected -1 or a positive group size, got ", g);
  return g;
}

// Fields that would change what the tensors mean and that this reader does not follow.
void refuse_unsupported_gptq_fields(const ConfigFields& f) {
  PQ_REQUIRE(!f.boolean("lm_head", false), f.origin(),
             ": field lm_head: a quantized lm_head is not supported (expected false)");
  PQ_REQUIRE(!f.boolean("is_marlin_format", false), f.origin(),
             ": field is_marlin_format: the Marlin layout is not supported (expected the gptq layout)");
  if (f.has("dynamic")) {
    const json& d = f["dynamic"];
    PQ_REQUIRE(d.is_object() && d.empty(), f.origin(),
               ": field dynamic: per-module overrides are not supported (expected null or {})");
  }
}

HfQuantConfig parse_gptq(const ConfigFields& f) {
  HfQuantConfig c;
  PQ_REQUIRE(f.has("bits"), f.origin(), ": field bits: missing (expected 2, 3, 4 or 8)");
  c.bits = static_cast<int>(f.integer("bits"));
  PQ_REQUIRE(c.bits == 2 || c.bits == 3 || c.bits == 4 || c.bits == 8, f.origin(),
             ": field bits: expected 2, 3, 4 or 8, got ", f["bits"].dump());
  c.group_size = group_size_of(f, "group_size");
  c.desc_act = f.boolean("desc_act", false);
  c.sym = f.boolean("sym", true);  // AutoGPTQ's default
  c.static_groups = f.boolean("static_groups", false);
  if (f.has("damp_percent")) {
    PQ_REQUIRE(f["damp_percent"].is_number(), f.origin(), ": field damp_percent: expected a number, got ",
               f["damp_percent"].dump());
    c.damp_percent = f["damp_percent"].get<double>();
  }
  // GPTQModel also writes the format as "format"; a config without either is v1.
  const char* format_key = f.first_of({"checkpoint_format", "format"});
  const std::string format = format_key ? lower(f.text(format_key, "gptq")) : "gptq";
  if (format == "gptq")
    c.format = HfQuantFormat::kGptq;
  else if (format == "gptq_v2")
    c.format = HfQuantFormat::kGptqV2;
  else
    fail(f.origin(), ": field ", format_key, ": expected \"gptq\" or \"gptq_v2\", got \"", format,
         "\" (other layouts are not supported)");
  refuse_unsupported_gptq_fields(f);
  return c;
}

HfQuantConfig parse_awq(const ConfigFields& f) {
  HfQuantConfig c;
  c.format = HfQuantFormat::kAwq;
  const char* bits_key = f.first_of({"bits", "w_bit"});
  PQ_REQUIRE(bits_key != nullptr, f.origin(), ": field bits (or w_bit): missing (expected 4)");
  c.bits = static_cast<int>(f.integer(bits_key));
  PQ_REQUIRE(c.bits == 4, f.origin(), ": field ", bits_key, ": AWQ's GEMM layout is 4-bit, got ", f[bits_key].dump());
  const char* group_key = f.first_of({"group_size", "q_group_size"});
  c.group_size = group_size_of(f, group_key ? group_key : "group_size");
  c.zero_point = f.boolean("zero_point", true);
  PQ_REQUIRE(c.zero_point, f.origin(), ": field zero_point: only zero_point true is supported");
  c.sym = false;
  const std::string version = lower(f.text("version", "gemm"));
  PQ_REQUIRE(version == "gemm", f.origin(), ": field version: expected \"gemm\", got \"", version,
             "\" (GEMV and other AWQ layouts are not supported)");
  if (f.has("modules_to_not_convert")) {
    const json& m = f["modules_to_not_convert"];
    PQ_REQUIRE(m.is_array() && m.empty(), f.origin(),
               ": field modules_to_not_convert: unquantized linears are not supported (expected null or [])");
  }
  return c;
}

// The AWQ nibble position p of column c within its word: kAwqOrder[p] == c % 8.
constexpr std::array<int, 8> awq_position_of_column() {
  std::array<int, 8> pos{};
  for (int p = 0; p < 8; ++p) pos[static_cast<size_t>(kAwqOrder[static_cast<size_t>(p)])] = p;
  return pos;
}
inline constexpr std::array<int, 8> kAwqPosition = awq_position_of_column();
static_assert(kAwqPosition[0] == 0 && kAwqPosition[2] == 1 && kAwqPosition[1] == 4 && kAwqPosition[7] == 7);

}  // namespace

const char* name(HfQuantFormat f) {
  switch (f) {
    case HfQuantFormat::kGptq:
      return "gptq";
    case HfQuantFormat::kGptqV2:
      return "gptq_v2";
    case HfQuantFormat::kAwq:
      return "awq";
  }
  return "?";
}

nlohmann::json quantization_config_json(const HfQuantConfig& c, const std::string& producer) {
  if (c.format == HfQuantFormat::kAwq) {
    PQ_ASSERT(c.bits == 4 && c.zero_point, "AWQ config: bits ", c.bits, " zero_point ", c.zero_point);
    return json{{"quant_method", "awq"}, {"bits", 4},         {"group_size", c.group_size},
                {"zero_point", true},    {"version", "gemm"}, {"modules_to_not_convert", nullptr}};
  }
  json j = {{"quant_method", "gptq"},
            {"bits", c.bits},
            {"group_size", c.group_size},
            {"desc_act", c.desc_act},
            {"sym", c.sym},
            {"static_groups", c.static_groups},
            {"checkpoint_format", name(c.format)},
            {"true_sequential", true},
            {"lm_head", false},
            {"meta", {{"quantizer", json::array({producer})}}}};
  if (c.damp_percent) j["damp_percent"] = *c.damp_percent;
  return j;
}

std::optional<HfQuantConfig> parse_quantization_config(const nlohmann::json& j, const std::string& origin) {
  PQ_REQUIRE(j.is_object(), origin, ": expected a JSON object, got ", j.dump());
  const ConfigFields f(j, origin);
  const std::string method = quant_method_of(f);
  if (method == "gptq") return parse_gptq(f);
  if (method == "awq") return parse_awq(f);
  return std::nullopt;
}

std::optional<HfQuantConfig> read_quantization_config(const std::string& model_dir) {
  // a config.json or checkpoint file names its directory
  // error_code forms: a path the file system refuses (too long, no permission) is a file that is not there here
  std::error_code ec;
  const fs::path dir = fs::is_regular_file(model_dir, ec) ? fs::path(model_dir).parent_path() : fs::path(model_dir);
  const fs::path config = dir / "config.json";
  if (fs::exists(config, ec)) {
    const json j = read_json_file(config.string());
    if (j.is_object() && j.contains("quantization_config") && !j["quantization_config"].is_null()) {
      const std::string origin = config.string() + ": quantization_config";
      const auto c = parse_quantization_config(j["quantization_config"], origin);
      PQ_REQUIRE(c.has_value(), origin, ": field quant_method: expected \"gptq\" or \"awq\", got ",
                 j["quantization_config"].value("quant_method", json(nullptr)).dump(),
                 " (other quantization methods are not supported)");
      return c;
    }
  }
  for (const char* file : {"quantize_config.json", "quant_config.json"}) {
    const fs::path p = dir / file;
    if (!fs::exists(p, ec)) continue;
    const auto c = parse_quantization_config(read_json_file(p.string()), p.string());
    if (c) return c;
  }
  return std::nullopt;
}

std::vector<int32_t> gptq_pack_zeros(const uint8_t* zeros_gn, int64_t g, int64_t n, int bits, HfQuantFormat format,
                                     const std::string& where) {
  PQ_REQUIRE(format != HfQuantFormat::kAwq, where, ": gptq_pack_zeros is for the GPTQ formats");
  PQ_REQUIRE(bits == 2 || bits == 3 || bits == 4 || bits == 8, where, ": bits must be 2, 3, 4 or 8, got ", bits);
  const int mask = (1 << bits) - 1;
  std::vector<uint8_t> stored(zeros_gn, zeros_gn + g * n);
  for (int64_t r = 0; r < g; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const int z = zeros_gn[r * n + c];
      PQ_REQUIRE(z <= mask, where, ": zero point ", z, " at (group ", r, ", column ", c, ") does not fit in ", bits,
                 " bits");
      if (format == HfQuantFormat::kGptqV2) continue;
      PQ_REQUIRE(z != 0, where, ": zero point 0 at (group ", r, ", column ", c,
                 ") cannot be stored in checkpoint_format gptq, which stores zero - 1 (use gptq_v2)");
      stored[static_cast<size_t>(r * n + c)] = static_cast<uint8_t>((z - 1) & mask);
    }
  return pack_rows(stored.data(), g, n, bits);
}

std::vector<int32_t> gptq_unpack_zeros(const int32_t* words, int64_t g, int64_t n, int bits, HfQuantFormat format) {
  PQ_REQUIRE(format != HfQuantFormat::kAwq, "gptq_unpack_zeros is for the GPTQ formats");
  const std::vector<uint8_t> stored = unpack_rows(words, g, n, bits);
  const int32_t add = format == HfQuantFormat::kGptq ? 1 : 0;
  std::vector<int32_t> zeros(stored.size());
  for (size_t i = 0; i < stored.size(); ++i) zeros[i] = static_cast<int32_t>(stored[i]) + add;
  return zeros;
}

bool gptq_v1_can_hold(const uint8_t* zeros_gn, int64_t count) {
  return std::find(zeros_gn, zeros_gn + count, uint8_t{0}) == zeros_gn + count;
}

std::vector<int32_t> awq_pack(const uint8_t* codes, int64_t rows, int64_t n) {
  PQ_REQUIRE(rows > 0 && n > 0 && n % 8 == 0, "AWQ packing: [", rows, ", ", n,
             "]: the number of columns must be a positive multiple of 8");
  const int64_t words_per_row = n / 8;
  std::vector<int32_t> words(static_cast<size_t>(rows * words_per_row), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t code = codes[r * n + c];
      PQ_REQUIRE(code < 16, "AWQ packing: code ", code, " at (", r, ", ", c, ") does not fit in 4 bits");
      const int shift = 4 * kAwqPosition[static_cast<size_t>(c % 8)];
      auto& w = words[static_cast<size_t>(r * words_per_row + c / 8)];
      w = static_cast<int32_t>(static_cast<uint32_t>(w) | (code << shift));
    }
  return words;
}

std::vector<uint8_t> awq_unpack(const int32_t* words, int64_t rows, int64_t n) {
  PQ_REQUIRE(rows > 0 && n > 0 && n % 8 == 0, "AWQ unpacking: [", rows, ", ", n,
             "]: the number of columns must be a positive multiple of 8");
  const int64_t words_per_row = n / 8;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const auto w = static_cast<uint32_t>(words[r * words_per_row + c / 8]);
      const int shift = 4 * kAwqPosition[static_cast<size_t>(c % 8)];
      codes[static_cast<size_t>(r * n + c)] = static_cast<uint8_t>((w >> shift) & 0xFu);
    }
  return codes;
}

}  // namespace pipequant::io
