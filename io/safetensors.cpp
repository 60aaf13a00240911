// Safetensors reader and writer. Layout of a file (https://github.com/huggingface/safetensors):
//   [8 bytes: little-endian u64 N] [N bytes: JSON header] [data region]
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets relative to
// the start of the data region; an optional "__metadata__" entry maps strings to strings.
#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "base/shape.hpp"
#include "io/json.hpp"

namespace pipequant::io {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; so must the host be");

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The safetensors library refuses headers above 100 MB; a bigger length means the file is not safetensors.
inline constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;
inline constexpr const char* kIndexName = "model.safetensors.index.json";
inline constexpr const char* kSingleName = "model.safetensors";

struct DTypeEntry {
  const char* name;
  DType dtype;
  size_t size;
};
inline constexpr DTypeEntry kDTypes[] = {
    {"F64", DType::kF64, 8}, {"F32", DType::kF32, 4},   {"F16", DType::kF16, 2},        {"BF16", DType::kBF16, 2},
    {"I64", DType::kI64, 8}, {"I32", DType::kI32, 4},   {"I16", DType::kI16, 2},        {"I8", DType::kI8, 1},
    {"U8", DType::kU8, 1},   {"BOOL", DType::kBool, 1}, {"F8_E4M3", DType::kF8E4M3, 1}, {"F8_E5M2", DType::kF8E5M2, 1},
};

std::string known_dtype_list() {
  std::string s;
  for (const auto& e : kDTypes) {
    if (!s.empty()) s += ", ";
    s += e.name;
  }
  return s;
}

bool parse_dtype(const std::string& s, DType* out) {
  for (const auto& e : kDTypes) {
    if (s == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

// A JSON value as it would appear in the file, shortened so that an error stays one line.
std::string show(const json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// Closes a file descriptor on scope exit.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads exactly `n` bytes at `offset`; false on a short read or an error.
bool pread_all(int fd, void* buf, size_t n, uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return true;
}

// A JSON value that is a non-negative integer (JSON integers only: 3.0 and "3" are rejected).
bool as_count(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

// The header of one .safetensors file: its 8-byte length (checked against the file size) and its JSON object.
struct RawHeader {
  uint64_t file_size = 0;
  uint64_t header_len = 0;
  json object;
  uint64_t data_start() const { return 8 + header_len; }
  uint64_t data_size() const { return file_size - data_start(); }
};

RawHeader read_raw_header(const std::string& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO must not block the open
  if (fd < 0) fail(file, ": cannot open: ", std::strerror(errno));
  FdCloser closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(file, ": cannot stat: ", std::strerror(errno));
  PQ_REQUIRE(S_ISREG(st.st_mode), file, ": not a regular file");
  RawHeader h;
  h.file_size = static_cast<uint64_t>(st.st_size);
  PQ_REQUIRE(h.file_size >= 8, file, ": file is ", h.file_size,
             " bytes, shorter than the 8-byte header length that starts a safetensors file");

  unsigned char len_bytes[8];
  PQ_REQUIRE(pread_all(fd, len_bytes, 8, 0), file, ": cannot read the header length: ", std::strerror(errno));
  for (int i = 7; i >= 0; --i) h.header_len = (h.header_len << 8) | len_bytes[i];
  PQ_REQUIRE(h.header_len <= kMaxHeaderBytes, file, ": header length ", h.header_len, " is absurd (limit ",
             kMaxHeaderBytes, " bytes); not a safetensors file?");
  PQ_REQUIRE(h.header_len <= h.file_size - 8, file, ": header length ", h.header_len,
             " runs past the end of the file (", h.file_size, " bytes, so at most ", h.file_size - 8,
             " bytes of header)");
  PQ_REQUIRE(h.header_len >= 2, file, ": header length ", h.header_len, " is too short for a JSON object");

  std::string text(h.header_len, '\0');
  PQ_REQUIRE(pread_all(fd, text.data(), h.header_len, 8), file, ": cannot read the ", h.header_len,
             "-byte header: ", std::strerror(errno));
  h.object = parse_json_strict(text, file + ": header");
  PQ_REQUIRE(h.object.is_object(), file, ": header is a JSON ", h.object.type_name(),
             ", expected an object mapping tensor names to {dtype, shape, data_offsets}");
  return h;
}

// The shape of a header entry; numel saturates instead of wrapping (too_big), so that a hostile shape cannot pass
// for a small one.
std::vector<int64_t> parse_shape(const json& shape, const std::string& where, uint64_t& numel, bool& too_big) {
  PQ_REQUIRE(shape.is_array(), where, ": shape ", show(shape), " is not an array of non-negative integers");
  std::vector<int64_t> dims;
  numel = 1;
  too_big = false;
  int64_t count = 1;  // TensorInfo::numel() multiplies in this order: every partial product must fit, even before a 0
  for (size_t d = 0; d < shape.size(); ++d) {
    uint64_t n = 0;
    PQ_REQUIRE(as_count(shape[d], &n) && n <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where,
               ": shape ", show(shape), ": dimension ", d, " is ", show(shape[d]), ", expected a non-negative integer");
    dims.push_back(static_cast<int64_t>(n));
    too_big |= __builtin_mul_overflow(numel, n, &numel);
    too_big |= __builtin_mul_overflow(count, static_cast<int64_t>(n), &count);
  }
  return dims;
}

// One tensor's entry {dtype, shape, data_offsets}, its byte range checked against the data region and its shape.
TensorInfo parse_tensor_entry(const std::string& file, const std::string& name, const json& entry, const RawHeader& h) {
  const std::string where = file + ": tensor " + name;
  PQ_REQUIRE(entry.is_object(), where, ": entry is a JSON ", entry.type_name(),
             ", expected an object {dtype, shape, data_offsets}");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    PQ_REQUIRE(entry.contains(key), where, ": field ", key, " is missing");

  TensorInfo t;
  t.name = name;
  t.file = file;
  const json& dt = entry["dtype"];
  PQ_REQUIRE(dt.is_string() && parse_dtype(dt.get<std::string>(), &t.dtype), where, ": dtype ", show(dt),
             " is unknown; expected one of ", known_dtype_list());
  uint64_t numel = 1;
  bool too_big = false;
  t.shape = parse_shape(entry["shape"], where, numel, too_big);

  const json& offs = entry["data_offsets"];
  uint64_t begin = 0, end = 0;
  PQ_REQUIRE(offs.is_array() && offs.size() == 2 && as_count(offs[0], &begin) && as_count(offs[1], &end), where,
             ": data_offsets ", show(offs), " is not a pair [begin, end] of non-negative integers");
  PQ_REQUIRE(begin <= end, where, ": data_offsets [", begin, ", ", end, "] has begin > end");
  PQ_REQUIRE(end <= h.data_size(), where, ": data_offsets [", begin, ", ", end, "] run past the data region (",
             h.data_size(), " bytes after the ", h.header_len, "-byte header; file is ", h.file_size, " bytes)");
  uint64_t needed = 0;
  too_big |= __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &needed);
  PQ_REQUIRE(!too_big && needed == end - begin, where, ": data_offsets [", begin, ", ", end, "] span ", end - begin,
             " bytes but shape ", shape_str(t.shape), " x ", dtype_name(t.dtype), " needs ",
             too_big ? std::string("more than 2^64") : std::to_string(needed));
  t.offset = h.data_start() + begin;
  t.nbytes = end - begin;
  return t;
}

// As the safetensors format requires: sorted by offset, the tensors cover the data region exactly: each begins where
// the one before ends (no overlap, no hole) and the last ends at the end of the file (no trailing bytes).
void check_tensors_cover_data(const std::string& file, const std::vector<TensorInfo>& tensors, uint64_t data_start,
                              uint64_t data_size) {
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  const auto span = [&](const TensorInfo& t) {
    std::string s = "[";  // built in steps: GCC 12 warns falsely (-Wrestrict) on "[" + std::string&&
    s += std::to_string(t.offset - data_start) + ", " + std::to_string(t.offset - data_start + t.nbytes) + "]";
    return s;
  };
  uint64_t end = 0;  // of the data covered so far, relative to the data region
  const TensorInfo* before = nullptr;
  for (const TensorInfo* t : by_offset) {
    const uint64_t begin = t->offset - data_start;
    PQ_REQUIRE(begin >= end, file, ": tensor ", t->name, ": data_offsets ", span(*t), " overlap those of tensor ",
               before ? before->name : "?", " ", before ? span(*before) : "");
    PQ_REQUIRE(begin == end, file, ": tensor ", t->name, ": data_offsets ", span(*t), " leave bytes [", end, ", ",
               begin, ") of the data region to no tensor; safetensors requires the tensors to cover it without holes");
    end = begin + t->nbytes;
    before = t;
  }
  PQ_REQUIRE(end == data_size, file, ": ", data_size - end, " bytes after the last tensor",
             before ? " (" + before->name + " ends at " + std::to_string(end) + ")" : std::string(), " of the ",
             data_size, "-byte data region; safetensors refuses trailing bytes");
}

// Reads and validates the header of one .safetensors file; every offset is checked against the file size.
std::vector<TensorInfo> read_header(const std::string& file) {
  const RawHeader h = read_raw_header(file);
  std::vector<TensorInfo> tensors;
  tensors.reserve(h.object.size());
  for (const auto& [name, entry] : h.object.items()) {
    if (name == "__metadata__") {
      PQ_REQUIRE(entry.is_object() || entry.is_null(), file, ": __metadata__ is a JSON ", entry.type_name(),
                 ", expected an object of strings");
      for (const auto& [key, value] : entry.items())
        PQ_REQUIRE(value.is_string(), file, ": __metadata__: field ", key, " is a JSON ", value.type_name(),
                   ", expected a string (safetensors metadata maps strings to strings)");
      continue;
    }
    tensors.push_back(parse_tensor_entry(file, name, entry, h));
  }
  check_tensors_cover_data(file, tensors, h.data_start(), h.data_size());
  return tensors;
}

// Index of the first F16/BF16 value (raw bits) that is not finite (all-ones exponent); n when all are.
size_t first_non_finite_half(const std::byte* p, size_t n, DType dtype) {
  const uint16_t exponent = dtype == DType::kF16 ? 0x7c00 : 0x7f80;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    if ((h & exponent) == exponent) return i;
  }
  return n;
}

// Refuses tensor t when index i < its size: "FILE: tensor NAME: element [3, 17] is nan".
void refuse_non_finite_at(const TensorInfo& t, size_t i, float value) {
  if (i >= static_cast<size_t>(t.numel())) return;
  std::vector<int64_t> index(t.shape.size());
  size_t rest = i;
  for (size_t d = t.shape.size(); d-- > 0;) {
    index[d] = static_cast<int64_t>(rest % static_cast<size_t>(t.shape[d]));
    rest /= static_cast<size_t>(t.shape[d]);
  }
  fail(t.file, ": tensor ", t.name, ": element ", shape_str(index), " is ",
       non_finite_name(value), "; every value of a checkpoint tensor must be finite");
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& e : kDTypes)
    if (e.dtype == d) return e.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& e : kDTypes)
    if (e.dtype == d) return e.size;
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

// A read-only shared mapping of a whole file, unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail(path, ": cannot open for mapping: ", std::strerror(errno));
    FdCloser closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) fail(path, ": cannot stat: ", std::strerror(errno));
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ == 0) return;
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) fail(path, ": cannot mmap ", size_, " bytes: ", std::strerror(errno));
    data_ = static_cast<const std::byte*>(p);
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  std::string path_;
  const std::byte* data_ = nullptr;
  uint64_t size_ = 0;
};

namespace {

// Which file describes a checkpoint at `path`: its index (sharded) or its one .safetensors file.
struct CheckpointFiles {
  std::string index_file;
  std::string single_file;
};

// A directory holds model.safetensors.index.json, model.safetensors, or exactly one other *.safetensors file.
CheckpointFiles files_in_directory(const std::string& path) {
  const fs::path dir(path);
  std::error_code missing;
  if (fs::exists(dir / kIndexName, missing)) return {(dir / kIndexName).string(), ""};
  if (fs::exists(dir / kSingleName, missing)) return {"", (dir / kSingleName).string()};
  std::error_code ec;
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") found.push_back(e.path().string());
  std::sort(found.begin(), found.end());
  PQ_REQUIRE(!found.empty(), "checkpoint ", path, ": the directory holds no ", kIndexName, ", no ", kSingleName,
             " and no other *.safetensors file");
  if (found.size() > 1) {
    std::string list;
    for (const auto& f : found) list += (list.empty() ? "" : ", ") + fs::path(f).filename().string();
    fail("checkpoint ", path, ": ", found.size(), " *.safetensors files (", list, ") but no ", kIndexName,
         " saying which tensor is where");
  }
  return {"", found.front()};
}

CheckpointFiles checkpoint_files(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  PQ_REQUIRE(fs::exists(st), "checkpoint ", path,
             ": no such file or directory (expected a directory with model.safetensors[.index.json] or a "
             ".safetensors file)");
  if (fs::is_directory(st)) return files_in_directory(path);
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0) return {path, ""};
  return {"", path};
}

std::map<std::string, TensorInfo> tensors_by_name(const std::string& file) {
  std::map<std::string, TensorInfo> by_name;
  for (auto& t : read_header(file)) {
    std::string n = t.name;
    by_name.emplace(std::move(n), std::move(t));
  }
  return by_name;
}

// Sharded: the index maps each tensor to the file holding it, relative to the index's directory; each shard's
// header is read once.
std::map<std::string, TensorInfo> tensors_of_index(const std::string& index_file) {
  const json index = read_json_file(index_file);
  PQ_REQUIRE(index.is_object(), index_file, ": is a JSON ", index.type_name(), ", expected an object with weight_map");
  PQ_REQUIRE(index.contains("weight_map"), index_file, ": field weight_map is missing");
  const json& wm = index["weight_map"];
  PQ_REQUIRE(wm.is_object(), index_file, ": field weight_map is a JSON ", wm.type_name(),
             ", expected an object {tensor name: file name}");
  PQ_REQUIRE(!wm.empty(), index_file, ": field weight_map is empty");
  const fs::path dir = fs::path(index_file).parent_path();
  std::map<std::string, std::map<std::string, TensorInfo>> shards;  // file name -> its tensors by name
  std::map<std::string, TensorInfo> tensors;
  for (const auto& [name, file_v] : wm.items()) {
    PQ_REQUIRE(file_v.is_string() && !file_v.get<std::string>().empty(), index_file, ": weight_map: tensor ", name,
               ": file ", show(file_v), " is not a file name");
    const std::string file_name = file_v.get<std::string>();
    auto it = shards.find(file_name);
    if (it == shards.end()) {
      const std::string shard_path = (dir / file_name).string();
      std::error_code bad_name;
      PQ_REQUIRE(fs::is_regular_file(shard_path, bad_name), index_file, ": weight_map: tensor ", name, ": shard file ",
                 shard_path, " does not exist");
      it = shards.emplace(file_name, tensors_by_name(shard_path)).first;
    }
    auto t = it->second.find(name);
    PQ_REQUIRE(t != it->second.end(), index_file, ": weight_map: tensor ", name, " is listed in ", file_name,
               ", but that file has no such tensor");
    tensors.emplace(name, t->second);
  }
  return tensors;
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint ck;
  ck.path_ = path;
  const CheckpointFiles files = checkpoint_files(path);
  ck.tensors_ = files.single_file.empty() ? tensors_of_index(files.index_file) : tensors_by_name(files.single_file);
  return ck;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("checkpoint ", path_, ": tensor ", name, " not found");
  return it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

std::span<const std::byte> Checkpoint::raw(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::shared_ptr<MappedFile> map;
  {
    std::lock_guard<std::mutex> lock(*mutex_);
    auto& slot = maps_[t.file];
    if (!slot) slot = std::make_shared<MappedFile>(t.file);
    map = slot;
  }
  // The header was validated against the size at open time; a file truncated since would fault (SIGBUS).
  PQ_REQUIRE(t.offset + t.nbytes <= map->size(), t.file, ": tensor ", name, ": bytes [", t.offset, ", ",
             t.offset + t.nbytes, ") lie past the end of the file (", map->size(),
             " bytes); was it changed after the checkpoint was opened?");
  if (t.nbytes == 0) return {};
  return {map->data() + t.offset, static_cast<size_t>(t.nbytes)};
}

std::vector<float> Checkpoint::read_f32(const std::string& name) const {
  std::vector<float> out(static_cast<size_t>(info(name).numel()));
  read_f32(name, out.data());
  return out;
}

void Checkpoint::read_f32(const std::string& name, float* out) const {
  const TensorInfo& t = info(name);
  PQ_REQUIRE(t.dtype == DType::kF32 || t.dtype == DType::kF16 || t.dtype == DType::kBF16, t.file, ": tensor ", name,
             " has dtype ", dtype_name(t.dtype), "; only F32, F16 and BF16 convert to float32");
  const std::span<const std::byte> bytes = raw(name);
  const size_t n = static_cast<size_t>(t.numel());
  if (n == 0) return;
  // The data region has no alignment guarantee: every element is read with memcpy.
  if (t.dtype == DType::kF32) {
    std::memcpy(out, bytes.data(), n * sizeof(float));
  } else {
    const std::byte* p = bytes.data();
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = t.dtype == DType::kF16 ? fp16_to_float(h) : bf16_to_float(h);
    }
  }
  const auto bad = static_cast<size_t>(first_non_finite(out, static_cast<int64_t>(n)));
  if (bad < n) refuse_non_finite_at(t, bad, out[bad]);
}

std::vector<uint16_t> Checkpoint::read_u16(const std::string& name) const {
  const TensorInfo& t = info(name);
  PQ_REQUIRE(t.dtype == DType::kF16 || t.dtype == DType::kBF16, t.file, ": tensor ", name, " has dtype ",
             dtype_name(t.dtype), ", expected F16 or BF16");
  const std::span<const std::byte> bytes = raw(name);
  std::vector<uint16_t> out(static_cast<size_t>(t.numel()));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(uint16_t));
  require_finite(name);
  return out;
}

void Checkpoint::require_finite(const std::string& name) const {
  const TensorInfo& t = info(name);
  const std::span<const std::byte> bytes = raw(name);
  const size_t n = static_cast<size_t>(t.numel());
  if (t.dtype == DType::kF16 || t.dtype == DType::kBF16) {
    const size_t i = first_non_finite_half(bytes.data(), n, t.dtype);
    if (i < n) {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      refuse_non_finite_at(t, i, t.dtype == DType::kF16 ? fp16_to_float(h) : bf16_to_float(h));
    }
  } else if (t.dtype == DType::kF32 || t.dtype == DType::kF64) {
    const size_t width = dtype_size(t.dtype);
    for (size_t i = 0; i < n; ++i) {
      double v;
      if (t.dtype == DType::kF32) {
        float f;
        std::memcpy(&f, bytes.data() + width * i, 4);
        v = f;
      } else {
        std::memcpy(&v, bytes.data() + width * i, 8);
      }
      if (!std::isfinite(v)) refuse_non_finite_at(t, i, static_cast<float>(v));
    }
  }
}

void Checkpoint::release(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::shared_ptr<MappedFile> map;
  {
    std::lock_guard<std::mutex> lock(*mutex_);
    const auto it = maps_.find(t.file);
    if (it == maps_.end() || !it->second) return;
    map = it->second;
  }
  if (t.nbytes == 0 || map->data() == nullptr) return;
  // whole pages inside the file: the mapping starts on a page boundary
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t begin = t.offset / page * page;
  const uint64_t end = std::min<uint64_t>(map->size(), t.offset + t.nbytes);
  if (end > begin)
    ::madvise(const_cast<std::byte*>(map->data()) + begin, static_cast<size_t>(end - begin), MADV_DONTNEED);
}

std::vector<std::string> Checkpoint::mapped_files() const {
  std::lock_guard<std::mutex> lock(*mutex_);
  std::vector<std::string> out;
  for (const auto& [file, map] : maps_)
    if (map) out.push_back(file);
  return out;
}

void write_safetensors(const std::string& file, const std::vector<TensorSpec>& specs,
                       const std::function<void(size_t, std::span<std::byte>)>& fill,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> seen;
  std::vector<uint64_t> sizes;
  for (const auto& s : specs) {
    PQ_REQUIRE(!s.name.empty() && s.name != "__metadata__", file, ": cannot write a tensor named '", s.name, "'");
    PQ_REQUIRE(seen.insert(s.name).second, file, ": tensor ", s.name, " is given twice");
    uint64_t n = dtype_size(s.dtype);
    for (int64_t d : s.shape) {
      PQ_REQUIRE(d >= 0, file, ": tensor ", s.name, ": shape ", shape_str(s.shape), " has a negative dimension");
      n *= static_cast<uint64_t>(d);
    }
    header[s.name] = {{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset, offset + n}}};
    sizes.push_back(n);
    offset += n;
  }
  std::string text = header.dump();
  // Pad with spaces so that the data region starts 8-byte aligned (8 + a multiple of 8).
  text.append((8 - text.size() % 8) % 8, ' ');

  // Written to a temporary name and renamed, so that a failed write never leaves a plausible-looking file.
  const std::string tmp = file + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    PQ_REQUIRE(out.good(), file, ": cannot open ", tmp, " for writing: ", std::strerror(errno));
    unsigned char len_bytes[8];
    uint64_t len = text.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(len >> (8 * i));
    out.write(reinterpret_cast<const char*>(len_bytes), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    std::vector<std::byte> buf;
    for (size_t i = 0; i < specs.size(); ++i) {
      buf.assign(static_cast<size_t>(sizes[i]), std::byte{0});
      fill(i, std::span<std::byte>(buf));
      out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
    }
    out.flush();
    if (!out.good()) {
      const std::string why = std::strerror(errno);
      out.close();
      std::error_code ec;
      fs::remove(tmp, ec);
      fail(file, ": write failed: ", why);
    }
  }
  std::error_code ec;
  fs::rename(tmp, file, ec);
  PQ_REQUIRE(!ec, file, ": cannot rename ", tmp, " into place: ", ec.message());
}

void write_safetensors(const std::string& file, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& t : tensors) {
    uint64_t n = dtype_size(t.dtype);
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(std::max<int64_t>(d, 0));
    PQ_REQUIRE(t.bytes.size() == n, file, ": tensor ", t.name, ": ", t.bytes.size(), " bytes given but shape ",
               shape_str(t.shape), " x ", dtype_name(t.dtype), " needs ", n);
    specs.push_back({t.name, t.dtype, t.shape});
  }
  write_safetensors(
      file, specs,
      [&](size_t i, std::span<std::byte> out) {
        std::copy(tensors[i].bytes.begin(), tensors[i].bytes.end(), out.begin());
      },
      metadata);
}

}  // namespace pipequant::io
