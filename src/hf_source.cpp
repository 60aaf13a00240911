// Hugging Face GPTQ and AWQ checkpoints as a weight source (src/hf_source.hpp).
#include "src/hf_source.hpp"

#include <cstring>

#include "base/error.hpp"
#include "base/shape.hpp"
#include "io/bitstream.hpp"

namespace pipequant {

namespace {

// The shapes a quantized linear [out = N, in = K] has in this format.
struct HfLinearShapes {
  int64_t groups = 0;
  std::vector<int64_t> qweight, qzeros, scales, g_idx;
};

// G: GPTQ has ceil(K / group_size) groups (AutoGPTQ's QuantLinear); AWQ's WQLinear_GEMM needs K % group_size == 0.
HfLinearShapes hf_linear_shapes(const io::HfQuantConfig& q, const std::string& file, const std::string& module,
                                int64_t n, int64_t k) {
  HfLinearShapes s;
  const int64_t gs = q.group_size == -1 ? k : q.group_size;
  s.groups = (k + gs - 1) / gs;
  s.scales = {s.groups, n};
  s.g_idx = {k};
  if (q.format == io::HfQuantFormat::kAwq) {
    PQ_REQUIRE(k % gs == 0, file, ": ", module, ": in_features ", k, " is not a multiple of group_size ", gs,
               " (AWQ's GEMM layout needs whole groups)");
    PQ_REQUIRE(n % 8 == 0, file, ": ", module, ": out_features ", n,
               " is not a multiple of 8 (AWQ packs 8 output columns per int32)");
    s.qweight = {k, n / 8};
    s.qzeros = {s.groups, n / 8};
  } else {
    s.qweight = {io::stream_words(k, q.bits), n};
    s.qzeros = {s.groups, io::stream_words(n, q.bits)};
  }
  return s;
}

void expect_shape(const io::Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                  const io::HfQuantConfig& q, std::initializer_list<io::DType> dtypes, const char* what) {
  PQ_REQUIRE(ckpt.has(name), ckpt.path(), ": tensor ", name, " is missing (a ", io::name(q.format),
             " checkpoint needs it with shape ", shape_str(shape), ": ", what, ")");
  const io::TensorInfo& t = ckpt.info(name);
  PQ_REQUIRE(t.shape == shape, t.file, ": tensor ", name, " has shape ", shape_str(t.shape), ", expected ",
             shape_str(shape), " (", what, ", ", q.bits, "-bit ", io::name(q.format), ", group_size ", q.group_size,
             ")");
  bool dtype_ok = false;
  std::string allowed;
  for (io::DType d : dtypes) {
    dtype_ok |= t.dtype == d;
    allowed += (allowed.empty() ? "" : " or ") + std::string(io::dtype_name(d));
  }
  PQ_REQUIRE(dtype_ok, t.file, ": tensor ", name, " has dtype ", io::dtype_name(t.dtype), ", expected ", allowed);
}

// An I32 (or, for g_idx, I64) tensor as int32 values.
std::vector<int32_t> read_i32(const io::Checkpoint& ckpt, const std::string& name) {
  const io::TensorInfo& t = ckpt.info(name);
  const auto bytes = ckpt.raw(name);
  std::vector<int32_t> v(static_cast<size_t>(t.numel()));
  if (t.dtype == io::DType::kI32) {
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(int32_t));
  } else {
    PQ_REQUIRE(t.dtype == io::DType::kI64, t.file, ": tensor ", name, " has dtype ", io::dtype_name(t.dtype),
               ", expected I32");
    for (size_t i = 0; i < v.size(); ++i) {
      int64_t x;
      std::memcpy(&x, bytes.data() + i * sizeof(int64_t), sizeof(int64_t));
      PQ_REQUIRE(x >= INT32_MIN && x <= INT32_MAX, t.file, ": tensor ", name, "[", i, "] = ", x, " is out of range");
      v[i] = static_cast<int32_t>(x);
    }
  }
  ckpt.release(name);
  return v;
}

// The group of each input channel: the file's g_idx (checked against G, and against k / group_size without
// act-order, where the loaders do not read it), or k / group_size when there is none.
std::vector<int32_t> read_g_idx(const io::Checkpoint& ckpt, const io::HfQuantConfig& q, const std::string& module,
                                int64_t k, int64_t groups) {
  const std::string name = module + ".g_idx";
  const int64_t gs = q.group_size == -1 ? k : q.group_size;
  if (!ckpt.has(name)) {
    PQ_REQUIRE(!q.desc_act, ckpt.path(), ": tensor ", name,
               " is missing (desc_act is true: the groups of the input channels are not k / group_size)");
    std::vector<int32_t> g(static_cast<size_t>(k));
    for (int64_t i = 0; i < k; ++i) g[static_cast<size_t>(i)] = static_cast<int32_t>(i / gs);
    return g;
  }
  std::vector<int32_t> g = read_i32(ckpt, name);
  const std::string& file = ckpt.info(name).file;
  for (int64_t i = 0; i < k; ++i) {
    const int32_t gi = g[static_cast<size_t>(i)];
    PQ_REQUIRE(gi >= 0 && gi < groups, file, ": tensor ", name, "[", i, "] = ", gi, " is outside [0, ", groups, ")");
    PQ_REQUIRE(q.desc_act || gi == i / gs, file, ": tensor ", name, "[", i, "] = ", gi,
               ", but desc_act is false (expected k / group_size = ", i / gs, ")");
  }
  return g;
}

// codes [K][N] -> [N][K] (a QuantizedLinear holds codes by output row)
std::vector<uint8_t> transpose_codes(const std::vector<uint8_t>& kn, int64_t k, int64_t n) {
  std::vector<uint8_t> nk(kn.size());
#pragma omp parallel for schedule(static) if (k * n > (int64_t{1} << 20))
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) nk[static_cast<size_t>(r * k + c)] = kn[static_cast<size_t>(c * n + r)];
  return nk;
}

}  // namespace

const std::vector<std::string>& hf_linear_tensor_suffixes() {
  static const std::vector<std::string> suffixes = {"qweight", "qzeros", "scales", "g_idx"};
  return suffixes;
}

void expect_hf_quantized_linear(const io::Checkpoint& ckpt, const io::ModelConfig& config, const io::HfQuantConfig& q,
                                const std::string& module, int64_t out, int64_t in) {
  const std::string file = ckpt.has(module + ".qweight") ? ckpt.info(module + ".qweight").file : ckpt.path();
  const HfLinearShapes s = hf_linear_shapes(q, file, module, out, in);
  const bool awq = q.format == io::HfQuantFormat::kAwq;
  expect_shape(ckpt, module + ".qweight", s.qweight, q, {io::DType::kI32},
               awq ? "[K, N/8]: 8 codes per int32 along N" : "[ceil(K*bits/32), N]: codes packed along K");
  expect_shape(ckpt, module + ".qzeros", s.qzeros, q, {io::DType::kI32},
               awq ? "[G, N/8]" : "[G, ceil(N*bits/32)]: zeros packed along N");
  expect_shape(ckpt, module + ".scales", s.scales, q, {io::DType::kF16, io::DType::kBF16, io::DType::kF32}, "[G, N]");
  if (ckpt.has(module + ".g_idx"))
    expect_shape(ckpt, module + ".g_idx", s.g_idx, q, {io::DType::kI32, io::DType::kI64}, "[K]: group of each input");
  else
    PQ_REQUIRE(!q.desc_act, ckpt.path(), ": tensor ", module, ".g_idx is missing (desc_act is true: the groups of ",
               "the input channels are not k / group_size)");
  PQ_REQUIRE(!ckpt.has(module + ".weight"), ckpt.info(module + ".weight").file, ": tensor ", module, ".weight beside ",
             module, ".qweight: a linear is either quantized or not (", config.path, " has a quantization_config)");
}

QuantizedLinear read_hf_quantized_linear(const io::Checkpoint& ckpt, const io::HfQuantConfig& q,
                                         const std::string& module, int64_t out, int64_t in) {
  const int64_t n = out, k = in;
  const HfLinearShapes s = hf_linear_shapes(q, ckpt.path(), module, n, k);
  const std::vector<int32_t> qweight = read_i32(ckpt, module + ".qweight");
  const std::vector<int32_t> qzeros = read_i32(ckpt, module + ".qzeros");
  PQ_ASSERT(static_cast<int64_t>(qweight.size()) == s.qweight[0] * s.qweight[1] &&
                static_cast<int64_t>(qzeros.size()) == s.qzeros[0] * s.qzeros[1],
            module, ": read before validate_checkpoint");
  QuantizedLinear ql;
  ql.rows = n;
  ql.cols = k;
  ql.groups = s.groups;
  ql.bits = q.bits;
  if (q.format == io::HfQuantFormat::kAwq) {
    ql.q = transpose_codes(io::awq_unpack(qweight.data(), k, n), k, n);
    const std::vector<uint8_t> z = io::awq_unpack(qzeros.data(), s.groups, n);
    ql.zeros.assign(z.begin(), z.end());
  } else {
    ql.q = transpose_codes(io::unpack_columns(qweight.data(), k, n, q.bits), k, n);
    const std::vector<int32_t> z = io::gptq_unpack_zeros(qzeros.data(), s.groups, n, q.bits, q.format);
    ql.zeros.assign(z.begin(), z.end());  // v1: up to 2^bits, held exactly
  }
  ql.scales = ckpt.read_f32(module + ".scales");
  ckpt.release(module + ".scales");
  ql.g_idx = read_g_idx(ckpt, q, module, k, s.groups);
  return ql;
}

std::unique_ptr<WeightSource> model_source(const io::Checkpoint& checkpoint, const std::string& model_dir,
                                           const io::ModelConfig& config) {
  const std::optional<io::HfQuantConfig> quant = io::read_quantization_config(model_dir);
  validate_checkpoint(checkpoint, config, quant ? &*quant : nullptr);
  return checkpoint_source(checkpoint, config, quant ? &*quant : nullptr);
}

}  // namespace pipequant
