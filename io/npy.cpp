// NumPy .npy reader and writer. Layout (numpy/lib/format.py):
//   "\x93NUMPY" major minor, header length (u16 LE for 1.0, u32 LE for 2.0/3.0), then a Python dict literal
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), } padded with spaces and '\n', then the data.
#include "io/npy.hpp"

#include <bit>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <variant>

#include "base/error.hpp"
#include "base/numeric.hpp"

namespace pipequant::io {

static_assert(std::endian::native == std::endian::little, ".npy data is read as little-endian; so must the host be");

namespace {

inline constexpr char kMagic[] = "\x93NUMPY";
inline constexpr size_t kMagicLen = 6;
// numpy aligns the start of the data to 64 bytes (format.py ARRAY_ALIGN)
inline constexpr size_t kAlign = 64;

// Item size of a supported little-endian descr, 0 if unsupported.
size_t descr_size(const std::string& d) {
  static const std::map<std::string, size_t> kSizes = {{"<f2", 2}, {"<f4", 4}, {"<f8", 8}, {"<i1", 1}, {"|i1", 1},
                                                       {"<i2", 2}, {"<i4", 4}, {"<i8", 8}, {"<u1", 1}, {"|u1", 1},
                                                       {"<u2", 2}, {"<u4", 4}, {"<u8", 8}, {"|b1", 1}, {"<b1", 1}};
  auto it = kSizes.find(d);
  return it == kSizes.end() ? 0 : it->second;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// The subset of Python literals that .npy headers use: a dict of strings, booleans and tuples of integers.
struct PyValue {
  std::variant<std::string, bool, std::vector<int64_t>, std::monostate> v;  // monostate: something else
};

class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& file) : s_(text), file_(file) {}

  std::map<std::string, PyValue> dict() {
    skip_ws();
    expect('{');
    std::map<std::string, PyValue> out;
    skip_ws();
    while (peek() != '}') {
      std::string key = string();
      skip_ws();
      expect(':');
      skip_ws();
      out[key] = value();
      skip_ws();
      if (peek() == ',') {
        ++i_;
        skip_ws();
      } else if (peek() != '}') {
        error("expected ',' or '}'");
      }
    }
    ++i_;
    skip_ws();
    if (i_ != s_.size()) error("unexpected text after the dict");
    return out;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    std::string shown = s_;
    while (!shown.empty() && (shown.back() == ' ' || shown.back() == '\n')) shown.pop_back();
    if (shown.size() > 100) shown = shown.substr(0, 97) + "...";
    fail(file_, ": .npy header is not a valid dict literal: ", what, " at character ", i_, " of \"", shown, "\"");
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string string() {
    const char q = peek();
    if (q != '\'' && q != '"') error("expected a quoted string");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != q) {
      if (s_[i_] == '\\') error("escapes in strings are not supported");
      out += s_[i_++];
    }
    if (i_ >= s_.size()) error("unterminated string");
    ++i_;
    return out;
  }
  int64_t integer() {
    size_t start = i_;
    int64_t v = 0;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) {
      const int64_t digit = s_[i_] - '0';
      if (v > (std::numeric_limits<int64_t>::max() - digit) / 10) error("integer too large");
      v = v * 10 + digit;
      ++i_;
    }
    if (i_ == start) error("expected a non-negative integer");
    // Python 2 wrote long integers as 3L
    if (peek() == 'L') ++i_;
    return v;
  }
  PyValue value() {
    PyValue out;
    const char c = peek();
    if (c == '\'' || c == '"') {
      out.v = string();
    } else if (s_.compare(i_, 4, "True") == 0) {
      i_ += 4;
      out.v = true;
    } else if (s_.compare(i_, 5, "False") == 0) {
      i_ += 5;
      out.v = false;
    } else if (c == '(') {
      ++i_;
      std::vector<int64_t> dims;
      skip_ws();
      while (peek() != ')') {
        dims.push_back(integer());
        skip_ws();
        if (peek() == ',') {
          ++i_;
          skip_ws();
        } else if (peek() != ')') {
          error("expected ',' or ')' in the shape tuple");
        }
      }
      ++i_;
      out.v = std::move(dims);
    } else {
      // something this reader does not use (a list descr of a structured dtype, ...): skip it, balanced
      int depth = 0;
      while (i_ < s_.size()) {
        const char d = s_[i_];
        if (d == '\'' || d == '"') {
          string();
          continue;
        }
        if (d == '(' || d == '[' || d == '{') ++depth;
        if (d == ')' || d == ']' || d == '}') {
          if (depth == 0) break;
          --depth;
        }
        if (d == ',' && depth == 0) break;
        ++i_;
      }
      out.v = std::monostate{};
    }
    return out;
  }

  const std::string& s_;
  const std::string& file_;
  size_t i_ = 0;
};

void write_all(std::ofstream& out, const void* p, size_t n) {
  // ostream::write takes a signed count: write huge arrays in pieces
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const size_t k = std::min<size_t>(n, size_t{1} << 30);
    out.write(c, static_cast<std::streamsize>(k));
    c += k;
    n -= k;
  }
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

NpyArray read_npy(const std::string& path) {
  std::error_code kind;
  // opening a FIFO or a device would block or read forever: only regular files are read
  PQ_REQUIRE(std::filesystem::is_regular_file(path, kind), path,
             std::filesystem::exists(path, kind) ? ": not a regular file" : ": no such file");
  std::ifstream in(path, std::ios::binary);
  PQ_REQUIRE(in.good(), path, ": cannot open: ", std::strerror(errno));
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  PQ_REQUIRE(!ec, path, ": cannot stat: ", ec.message());

  char pre[kMagicLen + 2] = {};
  in.read(pre, sizeof pre);
  PQ_REQUIRE(in.gcount() == static_cast<std::streamsize>(sizeof pre) && std::memcmp(pre, kMagic, kMagicLen) == 0, path,
             ": not a .npy file (it does not start with \\x93NUMPY)");
  const int major = static_cast<unsigned char>(pre[kMagicLen]);
  const int minor = static_cast<unsigned char>(pre[kMagicLen + 1]);
  PQ_REQUIRE((major == 1 || major == 2 || major == 3) && minor == 0, path, ": .npy format version ", major, ".", minor,
             " is not supported; expected 1.0, 2.0 or 3.0");
  const size_t len_bytes = major == 1 ? 2 : 4;
  unsigned char lb[4] = {};
  in.read(reinterpret_cast<char*>(lb), static_cast<std::streamsize>(len_bytes));
  PQ_REQUIRE(in.gcount() == static_cast<std::streamsize>(len_bytes), path, ": file ends inside the .npy preamble");
  uint64_t header_len = 0;
  for (size_t i = len_bytes; i-- > 0;) header_len = (header_len << 8) | lb[i];
  const uint64_t data_start = kMagicLen + 2 + len_bytes + header_len;
  PQ_REQUIRE(data_start <= file_size, path, ": .npy header length ", header_len, " runs past the end of the file (",
             file_size, " bytes)");
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  PQ_REQUIRE(in.gcount() == static_cast<std::streamsize>(header_len), path, ": cannot read the .npy header");

  const auto dict = HeaderParser(header, path).dict();
  for (const char* key : {"descr", "fortran_order", "shape"})
    PQ_REQUIRE(dict.count(key), path, ": .npy header has no '", key, "' key");

  NpyArray a;
  const auto* descr = std::get_if<std::string>(&dict.at("descr").v);
  PQ_REQUIRE(descr, path, ": descr is not a simple dtype string (structured arrays are not supported)");
  a.descr = *descr;
  PQ_REQUIRE(a.descr.empty() || a.descr[0] != '>', path, ": descr '", a.descr,
             "' is big-endian; expected little-endian ('<'): save with arr.astype(arr.dtype.newbyteorder('<'))");
  // '=' is native order, which numpy only writes in memory; on this (little-endian) host it means '<'
  if (!a.descr.empty() && a.descr[0] == '=') a.descr[0] = '<';
  const size_t item = descr_size(a.descr);
  PQ_REQUIRE(item != 0, path, ": descr '", a.descr,
             "' is not supported; expected a little-endian number type such as <f4, <f2, <f8, <i4, <i8");

  const auto* fortran = std::get_if<bool>(&dict.at("fortran_order").v);
  PQ_REQUIRE(fortran, path, ": fortran_order is not True or False");
  PQ_REQUIRE(!*fortran, path, ": fortran_order is True; expected a C-order array (save np.ascontiguousarray(arr))");

  const auto* shape = std::get_if<std::vector<int64_t>>(&dict.at("shape").v);
  PQ_REQUIRE(shape, path, ": shape is not a tuple of non-negative integers");
  a.shape = *shape;
  uint64_t nbytes = item;
  bool too_big = false;
  int64_t count = 1;  // numel() multiplies in this order: every partial product must fit, even before a 0
  for (int64_t d : a.shape) {
    too_big |= __builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes);
    too_big |= __builtin_mul_overflow(count, d, &count);
  }
  const uint64_t have = file_size - data_start;
  PQ_REQUIRE(!too_big && nbytes == have, path, ": data is ", have, " bytes but shape ", shape_str(a.shape), " x ",
             a.descr, " needs ", too_big ? std::string("more than 2^64") : std::to_string(nbytes));

  a.data.resize(static_cast<size_t>(nbytes));
  in.read(a.data.data(), static_cast<std::streamsize>(nbytes));
  PQ_REQUIRE(static_cast<uint64_t>(in.gcount()) == nbytes, path, ": read error in the data");
  return a;
}

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape, const void* data) {
  const size_t item = descr_size(descr);
  PQ_REQUIRE(item != 0, path, ": cannot write descr '", descr, "'; expected a little-endian type such as <f4, <i4");
  uint64_t nbytes = item;
  for (int64_t d : shape) {
    PQ_REQUIRE(d >= 0, path, ": cannot write shape ", shape_str(shape), " with a negative dimension");
    nbytes *= static_cast<uint64_t>(d);
  }
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape_str(shape) + ", }";
  // Pad with spaces and end with '\n' so that the data starts at a multiple of kAlign.
  const size_t pre_v1 = kMagicLen + 2 + 2;
  size_t total = pre_v1 + header.size() + 1;
  header.append((kAlign - total % kAlign) % kAlign, ' ');
  header += '\n';
  int major = 1;
  if (header.size() > 0xffff) {  // 2.0: a 4-byte header length
    major = 2;
    header.pop_back();
    while (!header.empty() && header.back() == ' ') header.pop_back();
    total = pre_v1 + 2 + header.size() + 1;
    header.append((kAlign - total % kAlign) % kAlign, ' ');
    header += '\n';
  }

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  PQ_REQUIRE(out.good(), path, ": cannot open for writing: ", std::strerror(errno));
  out.write(kMagic, kMagicLen);
  const char version[2] = {static_cast<char>(major), 0};
  out.write(version, 2);
  const uint64_t len = header.size();
  const int len_bytes = major == 1 ? 2 : 4;
  for (int i = 0; i < len_bytes; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  if (nbytes > 0) write_all(out, data, static_cast<size_t>(nbytes));
  out.flush();
  PQ_REQUIRE(out.good(), path, ": write failed: ", std::strerror(errno));
}

Matrix read_matrix_f32(const std::string& path, const std::string& what) {
  const NpyArray a = read_npy(path);
  PQ_REQUIRE(a.shape.size() == 2, path, ": ", what, " must be a 2-D array [rows, cols], got shape ",
             shape_str(a.shape));
  PQ_REQUIRE(a.descr == "<f4" || a.descr == "<f2" || a.descr == "<f8", path, ": ", what, ": dtype ", a.descr,
             " not supported; expected float32 (<f4), float16 (<f2) or float64 (<f8)");
  Matrix m;
  m.rows = a.shape[0];
  m.cols = a.shape[1];
  const size_t n = static_cast<size_t>(a.numel());
  m.data.resize(n);
  const char* p = a.data.data();
  if (a.descr == "<f4") {
    std::memcpy(m.data.data(), p, n * 4);
  } else if (a.descr == "<f2") {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      m.data[i] = fp16_to_float(h);
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      m.data[i] = static_cast<float>(d);
    }
  }
  return m;
}

TokenFile read_tokens(const std::string& path) {
  const NpyArray a = read_npy(path);
  PQ_REQUIRE(a.descr == "<i4" || a.descr == "<i8", path, ": dtype ", a.descr,
             " not supported for token ids; expected int32 (<i4) or int64 (<i8)");
  PQ_REQUIRE(a.shape.size() == 1 || a.shape.size() == 2, path,
             ": token ids must be a 1-D stream or a 2-D [samples, seq] array, got shape ", shape_str(a.shape));
  TokenFile t;
  t.path = path;
  t.two_d = a.shape.size() == 2;
  t.samples = t.two_d ? a.shape[0] : 1;
  t.row_length = t.two_d ? a.shape[1] : a.shape[0];
  const int64_t n = a.numel();
  PQ_REQUIRE(n > 0, path, ": holds no token ids (shape ", shape_str(a.shape), ")");
  t.ids.resize(static_cast<size_t>(n));
  const bool wide = a.descr == "<i8";
  for (int64_t i = 0; i < n; ++i) {
    int64_t v;
    if (wide) {
      std::memcpy(&v, a.data.data() + 8 * i, 8);
    } else {
      int32_t w;
      std::memcpy(&w, a.data.data() + 4 * i, 4);
      v = w;
    }
    if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
      const std::string where =
          t.two_d ? " (row " + std::to_string(i / t.row_length) + ", column " + std::to_string(i % t.row_length) + ")"
                  : "";
      fail(path, ": token id ", v, " at index ", i, where,
           v < 0 ? " is negative" : " does not fit in int32 (max 2147483647)");
    }
    t.ids[static_cast<size_t>(i)] = static_cast<int32_t>(v);
  }
  return t;
}

}  // namespace pipequant::io
