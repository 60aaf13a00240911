// HDF5 shards and model.h5 (docs/design.md section 5, docs/output_format.md).
//
// Every HDF5 call is checked; a failure becomes a UserError that names the file, the object and what failed,
// with the most specific message of HDF5's error stack appended (its own printing is switched off). Handles
// are owned by Handle<close> so that nothing stays open when an exception unwinds.
//
// The writer runs on an MPI communicator through the MPI-IO driver. Every call is collective: metadata
// (groups, attributes) is created by all ranks with the same values, as parallel HDF5 requires, and raw data
// goes through collective transfers in which each rank writes its own contiguous slice of the rows of every
// dataset (every rank holds the whole tensor, so the checksums are computed from it alone); owned_rows() is the one
// place that decides the slices.
#include "io/shard.hpp"

#include <hdf5.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "base/error.hpp"
#include "base/shape.hpp"
#include "base/stop.hpp"
#include "io/hdf5_handle.hpp"
#include "io/hdf5_probe.hpp"

namespace pipequant::io {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Errors

// The most specific message on HDF5's error stack: the system or MPI error text where HDF5 quotes one
// ("error message = 'Permission denied'", "MPI error string is '...'"), else the description. Empty when the
// stack is empty.
std::string hdf5_reason() {
  std::string desc;
  auto visit = [](unsigned, const H5E_error2_t* err, void* data) -> herr_t {
    if (err && err->desc) *static_cast<std::string*>(data) = err->desc;
    return 1;  // the first entry walking upward is the innermost one
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, visit, &desc);
  for (const std::string key : {"error message = '", "MPI error string is '"}) {
    const auto at = desc.find(key);
    if (at == std::string::npos) continue;
    const auto begin = at + key.size();
    const auto end = desc.find('\'', begin);
    if (end != std::string::npos) return desc.substr(begin, end - begin);
  }
  return desc;
}

// "<file>: <object>: <what>: <reason>"; object may be empty.
[[noreturn]] void hdf5_fail(const std::string& file, const std::string& object, const std::string& what) {
  const std::string reason = hdf5_reason();
  H5Eclear2(H5E_DEFAULT);
  std::string msg = file + ": ";
  if (!object.empty()) msg += object + ": ";
  msg += what;
  if (!reason.empty()) msg += ": " + reason;
  throw UserError(msg);
}

template <typename H>
H checked(hid_t id, const std::string& file, const std::string& object, const std::string& what) {
  if (id < 0) hdf5_fail(file, object, what);
  return H(id);
}

void check(herr_t rc, const std::string& file, const std::string& object, const std::string& what) {
  if (rc < 0) hdf5_fail(file, object, what);
}

// What the file system says about path after a write to it failed: removed, on a read-only file system, not
// writable, or else how much space is left (HDF5's and MPI-IO's own reason follows in the message).
std::string write_failure_cause(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "the file was removed";
  struct statvfs fs;
  if (::statvfs(path.c_str(), &fs) == 0 && (fs.f_flag & ST_RDONLY)) return "the file system is read-only";
  if (::access(path.c_str(), W_OK) != 0) return std::string("the file is not writable: ") + std::strerror(errno);
  if (::statvfs(path.c_str(), &fs) != 0) return "";
  const double free_mb = static_cast<double>(fs.f_bavail) * static_cast<double>(fs.f_frsize) / 1e6;
  // below this, a write of a block's tensors cannot have fitted
  constexpr double kFullBelowMb = 16;
  char text[80];
  std::snprintf(text, sizeof text, "%s%.0f MB free on its file system", free_mb < kFullBelowMb ? "disk full: " : "",
                free_mb);
  return text;
}

// check() for a write, a flush or a close after writes: the message adds what the file system says.
void check_write(herr_t rc, const std::string& file, const std::string& object, const std::string& what) {
  if (rc >= 0) return;
  const std::string cause = write_failure_cause(file);
  hdf5_fail(file, object, cause.empty() ? what : what + " (" + cause + ")");
}

// Where one file's errors are reported.
struct Where {
  const std::string& file;
  std::string object;
};

// ---------------------------------------------------------------------------------------------------------
// Types

// IEEE half: 1 sign, 5 exponent, 10 mantissa bits, bias 15; h5py and numpy read it as float16.
TypeHandle half_type(const Where& at) {
  TypeHandle t = checked<TypeHandle>(H5Tcopy(H5T_IEEE_F32LE), at.file, at.object, "cannot create the float16 type");
  // the field layout must shrink before the size does (the recipe h5py uses)
  check(H5Tset_fields(t.get(), 15, 10, 5, 0, 10), at.file, at.object, "cannot create the float16 type");
  check(H5Tset_size(t.get(), 2), at.file, at.object, "cannot create the float16 type");
  check(H5Tset_precision(t.get(), 16), at.file, at.object, "cannot create the float16 type");
  check(H5Tset_offset(t.get(), 0), at.file, at.object, "cannot create the float16 type");
  check(H5Tset_ebias(t.get(), 15), at.file, at.object, "cannot create the float16 type");
  return t;
}

// bfloat16: 1 sign, 8 exponent, 7 mantissa bits, bias 127. Written and read with itself as the memory type,
// so HDF5 converts nothing and the bits round-trip; tools that know float layouts show the right values.
TypeHandle bfloat16_type(const Where& at) {
  TypeHandle t = checked<TypeHandle>(H5Tcopy(H5T_IEEE_F32LE), at.file, at.object, "cannot create the bfloat16 type");
  check(H5Tset_fields(t.get(), 15, 7, 8, 0, 7), at.file, at.object, "cannot create the bfloat16 type");
  check(H5Tset_size(t.get(), 2), at.file, at.object, "cannot create the bfloat16 type");
  check(H5Tset_precision(t.get(), 16), at.file, at.object, "cannot create the bfloat16 type");
  check(H5Tset_offset(t.get(), 0), at.file, at.object, "cannot create the bfloat16 type");
  check(H5Tset_ebias(t.get(), 127), at.file, at.object, "cannot create the bfloat16 type");
  return t;
}

TypeHandle string_type(const Where& at) {
  TypeHandle t = checked<TypeHandle>(H5Tcopy(H5T_C_S1), at.file, at.object, "cannot create the string type");
  check(H5Tset_size(t.get(), H5T_VARIABLE), at.file, at.object, "cannot create the string type");
  check(H5Tset_cset(t.get(), H5T_CSET_UTF8), at.file, at.object, "cannot create the string type");
  return t;
}

size_t dtype_bytes(const std::string& dtype) {
  if (dtype == "F32") return 4;
  if (dtype == "F16" || dtype == "BF16") return 2;
  return 0;
}

// File type of a DenseTensor's dtype; the same handle is the memory type (no conversion).
TypeHandle dense_type(const std::string& dtype, const Where& at) {
  if (dtype == "F32") return checked<TypeHandle>(H5Tcopy(H5T_IEEE_F32LE), at.file, at.object, "cannot copy a type");
  if (dtype == "F16") return half_type(at);
  if (dtype == "BF16") return bfloat16_type(at);
  fail(at.file, ": ", at.object, ": dtype '", dtype, "' is not one of F32, F16, BF16");
}

// ---------------------------------------------------------------------------------------------------------
// Links, groups, attributes

bool link_exists(hid_t loc, const std::string& name, const Where& at) {
  const htri_t r = H5Lexists(loc, name.c_str(), H5P_DEFAULT);
  if (r < 0) hdf5_fail(at.file, at.object, "cannot look up '" + name + "'");
  return r > 0;
}

// Whether `name` is a hard link in `loc` (a path's earlier parts checked the same way first). The reader follows no
// soft or external link: a damaged shard must not send it into another file, and libhdf5 1.10 reads past the end of
// an external link's value that lacks its terminating NUL when it follows one.
bool hard_link_exists(hid_t loc, const std::string& name, const Where& at) {
  if (!link_exists(loc, name, at)) return false;
  H5L_info_t info;
  check(H5Lget_info(loc, name.c_str(), &info, H5P_DEFAULT), at.file, at.object, "cannot read link '" + name + "'");
  return info.type == H5L_TYPE_HARD;
}

void delete_if_exists(hid_t loc, const std::string& name, const Where& at) {
  if (link_exists(loc, name, at))
    check(H5Ldelete(loc, name.c_str(), H5P_DEFAULT), at.file, at.object, "cannot delete '" + name + "'");
}

GroupHandle open_group(hid_t loc, const std::string& name, const Where& at) {
  return checked<GroupHandle>(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), at.file, at.object,
                              "cannot open group '" + name + "'");
}

GroupHandle create_group(hid_t loc, const std::string& name, const Where& at) {
  return checked<GroupHandle>(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), at.file, at.object,
                              "cannot create group '" + name + "'");
}

GroupHandle open_or_create_group(hid_t loc, const std::string& name, const Where& at) {
  return link_exists(loc, name, at) ? open_group(loc, name, at) : create_group(loc, name, at);
}

// Writes a scalar attribute (replacing one of the same name) of file type `file_type` from `value` in `mem_type`.
void write_attr(hid_t obj, const std::string& name, hid_t file_type, hid_t mem_type, const void* value,
                const Where& at) {
  const htri_t exists = H5Aexists(obj, name.c_str());
  if (exists < 0) hdf5_fail(at.file, at.object, "cannot look up attribute " + name);
  if (exists > 0) check(H5Adelete(obj, name.c_str()), at.file, at.object, "cannot replace attribute " + name);
  SpaceHandle space = checked<SpaceHandle>(H5Screate(H5S_SCALAR), at.file, at.object, "cannot create a dataspace");
  AttrHandle attr = checked<AttrHandle>(H5Acreate2(obj, name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                                        at.file, at.object, "cannot create attribute " + name);
  check(H5Awrite(attr.get(), mem_type, value), at.file, at.object, "cannot write attribute " + name);
}

void write_attr_i32(hid_t obj, const std::string& name, int32_t v, const Where& at) {
  write_attr(obj, name, H5T_STD_I32LE, H5T_NATIVE_INT32, &v, at);
}
void write_attr_i64(hid_t obj, const std::string& name, int64_t v, const Where& at) {
  write_attr(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, at);
}
void write_attr_u32(hid_t obj, const std::string& name, uint32_t v, const Where& at) {
  write_attr(obj, name, H5T_STD_U32LE, H5T_NATIVE_UINT32, &v, at);
}
void write_attr_f64(hid_t obj, const std::string& name, double v, const Where& at) {
  write_attr(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, at);
}
void write_attr_str(hid_t obj, const std::string& name, const std::string& v, const Where& at) {
  // variable-length UTF-8: h5py reads it as str, and long JSON stays out of the object header
  TypeHandle t = string_type(at);
  const char* p = v.c_str();
  write_attr(obj, name, t.get(), t.get(), &p, at);
}

AttrHandle open_attr(hid_t obj, const std::string& name, const Where& at) {
  const htri_t exists = H5Aexists(obj, name.c_str());
  if (exists < 0) hdf5_fail(at.file, at.object, "cannot look up attribute " + name);
  PQ_REQUIRE(exists > 0, at.file, ": ", at.object, ": attribute ", name, " is missing");
  AttrHandle attr =
      checked<AttrHandle>(H5Aopen(obj, name.c_str(), H5P_DEFAULT), at.file, at.object, "cannot open attribute " + name);
  SpaceHandle space =
      checked<SpaceHandle>(H5Aget_space(attr.get()), at.file, at.object, "cannot read attribute " + name);
  PQ_REQUIRE(H5Sget_simple_extent_npoints(space.get()) == 1, at.file, ": ", at.object, ": attribute ", name,
             " is not a single value");
  return attr;
}

// Reads a numeric scalar attribute, converted by HDF5 to mem_type.
template <typename T>
T read_attr_num(hid_t obj, const std::string& name, hid_t mem_type, const Where& at) {
  AttrHandle attr = open_attr(obj, name, at);
  TypeHandle ft = checked<TypeHandle>(H5Aget_type(attr.get()), at.file, at.object, "cannot read attribute " + name);
  const H5T_class_t cls = H5Tget_class(ft.get());
  PQ_REQUIRE(cls == H5T_INTEGER || cls == H5T_FLOAT, at.file, ": ", at.object, ": attribute ", name,
             " is not a number");
  T v{};
  check(H5Aread(attr.get(), mem_type, &v), at.file, at.object, "cannot read attribute " + name);
  return v;
}

int64_t read_attr_i64(hid_t obj, const std::string& name, const Where& at) {
  return read_attr_num<int64_t>(obj, name, H5T_NATIVE_INT64, at);
}
double read_attr_f64(hid_t obj, const std::string& name, const Where& at) {
  return read_attr_num<double>(obj, name, H5T_NATIVE_DOUBLE, at);
}
uint32_t read_attr_u32(hid_t obj, const std::string& name, const Where& at) {
  return read_attr_num<uint32_t>(obj, name, H5T_NATIVE_UINT32, at);
}
int read_attr_int(hid_t obj, const std::string& name, const Where& at) {
  const int64_t v = read_attr_i64(obj, name, at);
  PQ_REQUIRE(v >= std::numeric_limits<int>::min() && v <= std::numeric_limits<int>::max(), at.file, ": ", at.object,
             ": attribute ", name, " = ", v, " is out of range");
  return static_cast<int>(v);
}

std::string read_attr_str(hid_t obj, const std::string& name, const Where& at) {
  AttrHandle attr = open_attr(obj, name, at);
  TypeHandle ft = checked<TypeHandle>(H5Aget_type(attr.get()), at.file, at.object, "cannot read attribute " + name);
  PQ_REQUIRE(H5Tget_class(ft.get()) == H5T_STRING, at.file, ": ", at.object, ": attribute ", name, " is not a string");
  const htri_t variable = H5Tis_variable_str(ft.get());
  if (variable < 0) hdf5_fail(at.file, at.object, "cannot read attribute " + name);
  if (variable > 0) {
    TypeHandle mt = string_type(at);
    char* p = nullptr;
    check(H5Aread(attr.get(), mt.get(), &p), at.file, at.object, "cannot read attribute " + name);
    std::string v = p ? p : "";
    SpaceHandle space = checked<SpaceHandle>(H5Screate(H5S_SCALAR), at.file, at.object, "cannot create a dataspace");
    H5Dvlen_reclaim(mt.get(), space.get(), H5P_DEFAULT, &p);
    return v;
  }
  // fixed length (files written by other tools): read as it is stored, up to the first NUL
  const size_t size = H5Tget_size(ft.get());
  std::string v(size, '\0');
  check(H5Aread(attr.get(), ft.get(), v.data()), at.file, at.object, "cannot read attribute " + name);
  v.resize(std::strlen(v.c_str()));
  return v;
}

struct Child {
  std::string name;
  H5O_type_t type = H5O_TYPE_UNKNOWN;
};

// The members of a group in name order, with their object types (dangling links read as unknown).
// The link names of a group in name order (links are not followed).
std::vector<std::string> link_names(hid_t group, const Where& at) {
  std::vector<std::string> names;
  auto collect = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->emplace_back(name);
    return 0;
  };
  hsize_t idx = 0;
  check(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, &idx, collect, &names), at.file, at.object,
        "cannot list the group");
  return names;
}

std::vector<Child> children(hid_t group, const Where& at) {
  std::vector<std::string> names = link_names(group, at);
  std::vector<Child> out;
  out.reserve(names.size());
  for (auto& n : names) {
    H5L_info_t link;
    H5O_info_t info;
    Child c{std::move(n), H5O_TYPE_UNKNOWN};
    // the objects of hard links only (hard_link_exists says why); other links read as unknown
    if (H5Lget_info(group, c.name.c_str(), &link, H5P_DEFAULT) >= 0 && link.type == H5L_TYPE_HARD &&
        H5Oget_info_by_name2(group, c.name.c_str(), &info, H5O_INFO_BASIC, H5P_DEFAULT) >= 0)
      c.type = info.type;
    else
      H5Eclear2(H5E_DEFAULT);
    out.push_back(std::move(c));
  }
  return out;
}

std::optional<int64_t> parse_block(const std::string& s) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, v);
  if (r.ec != std::errc() || r.ptr != end || v < 0) return std::nullopt;
  return v;
}

std::string block_path(int64_t block) { return "/blocks/" + std::to_string(block); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------
// Raw data

// The rows of a dataset's first dimension that `rank` of `size` writes: [begin, end), contiguous and as even as
// possible, so that the ranks of a stage group share the write bandwidth and each file region has one writer.
std::pair<int64_t, int64_t> owned_rows(int64_t rows, int rank, int size) {
  return {rows * rank / size, rows * (rank + 1) / size};
}

std::vector<hsize_t> to_dims(const std::vector<int64_t>& shape) {
  std::vector<hsize_t> dims;
  dims.reserve(shape.size());
  for (int64_t d : shape) dims.push_back(static_cast<hsize_t>(d));
  return dims;
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The element count of a shape read from a file, where a dimension may be anything: nullopt when it is negative
// (above 2^63 as hsize_t) or the product does not fit in int64.
std::optional<int64_t> checked_element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  return n;
}

SpaceHandle simple_space(const std::vector<int64_t>& shape, const Where& at) {
  if (shape.empty())
    return checked<SpaceHandle>(H5Screate(H5S_SCALAR), at.file, at.object, "cannot create a dataspace");
  const auto dims = to_dims(shape);
  return checked<SpaceHandle>(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), at.file, at.object,
                              "cannot create a dataspace");
}

// The shape of an open dataset.
std::vector<int64_t> dataset_shape(hid_t dset, const Where& at) {
  SpaceHandle space = checked<SpaceHandle>(H5Dget_space(dset), at.file, at.object, "cannot read the dataspace");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) hdf5_fail(at.file, at.object, "cannot read the dataspace");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
    hdf5_fail(at.file, at.object, "cannot read the dataspace");
  std::vector<int64_t> shape;
  for (hsize_t d : dims) shape.push_back(static_cast<int64_t>(d));
  return shape;
}

// Whether the file stores every byte of a dataset's declared shape (`count` elements of its stored type). The shape
// comes from the file and sizes the reader's buffers and loops: a dataset declared larger than what it stores (never
// written, or damaged) would read as fill values, terabytes of them. Chunked data may be compressed, up to zlib's
// ratio of about 1032:1.
bool stored_in_full(hid_t dset, int64_t count, const Where& at) {
  TypeHandle ft = checked<TypeHandle>(H5Dget_type(dset), at.file, at.object, "cannot read the type");
  PlistHandle dcpl = checked<PlistHandle>(H5Dget_create_plist(dset), at.file, at.object, "cannot read the layout");
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(count), static_cast<uint64_t>(H5Tget_size(ft.get())), &bytes))
    return false;
  const uint64_t stored = H5Dget_storage_size(dset);
  const bool compressed = H5Pget_layout(dcpl.get()) == H5D_CHUNKED && H5Pget_nfilters(dcpl.get()) > 0;
  return compressed ? bytes / 1032 <= stored : bytes <= stored;
}

// The element count of an open dataset of `shape`; throws UserError when the count does not fit in int64 or the
// file does not store it.
int64_t stored_element_count(hid_t dset, const std::vector<int64_t>& shape, const Where& at) {
  const auto count = checked_element_count(shape);
  PQ_REQUIRE(count.has_value(), at.file, ": ", at.object, ": shape ", shape_str(shape),
             " has more elements than 64 bits count");
  PQ_REQUIRE(stored_in_full(dset, *count, at), at.file, ": ", at.object, ": shape ", shape_str(shape),
             " needs more bytes than the file stores for it (never written, or damaged)");
  return *count;
}

// Reads a whole dataset of the expected shape into `out` (resized to it; elements of mem_type), the shape checked
// against `expected` (from the attributes) and against what the file stores before anything is allocated.
template <typename T>
void read_dataset(hid_t parent, const std::string& name, hid_t mem_type, const std::vector<int64_t>& expected,
                  std::vector<T>& out, const Where& at) {
  const Where here{at.file, at.object + "/" + name};
  PQ_REQUIRE(hard_link_exists(parent, name, at), at.file, ": ", at.object, ": dataset ", name, " is missing");
  DatasetHandle d = checked<DatasetHandle>(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), here.file, here.object,
                                           "cannot open dataset");
  const auto shape = dataset_shape(d.get(), here);
  PQ_REQUIRE(shape == expected, here.file, ": ", here.object, ": shape ", shape_str(shape), ", expected ",
             shape_str(expected), " from the attributes");
  out.resize(static_cast<size_t>(stored_element_count(d.get(), shape, here)));
  if (out.empty()) return;
  check(H5Dread(d.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), here.file, here.object,
        "cannot read dataset");
}

// CRC-32 of a dataset's bytes as stored, read in slabs of rows so that memory stays bounded; nullopt when the
// dataset holds no numbers or not all its bytes (its checksum cannot match).
std::optional<uint32_t> dataset_crc(hid_t dset, const Where& at) {
  TypeHandle ft = checked<TypeHandle>(H5Dget_type(dset), at.file, at.object, "cannot read the type");
  const H5T_class_t cls = H5Tget_class(ft.get());
  if (cls != H5T_INTEGER && cls != H5T_FLOAT) return std::nullopt;
  const size_t elem = H5Tget_size(ft.get());
  const auto shape = dataset_shape(dset, at);
  const auto total = checked_element_count(shape);
  if (!total || !stored_in_full(dset, *total, at)) return std::nullopt;
  uLong crc = crc32(0L, Z_NULL, 0);
  if (*total == 0) return static_cast<uint32_t>(crc);
  std::vector<char> buf;
  if (shape.empty()) {
    buf.resize(elem);
    check(H5Dread(dset, ft.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()), at.file, at.object,
          "cannot read dataset");
    return static_cast<uint32_t>(crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(elem)));
  }
  constexpr int64_t kSlabBytes = int64_t{64} << 20;
  const int64_t row_bytes = *total / shape[0] * static_cast<int64_t>(elem);
  const int64_t rows_per_slab = std::max<int64_t>(1, kSlabBytes / std::max<int64_t>(row_bytes, 1));
  SpaceHandle fspace = checked<SpaceHandle>(H5Dget_space(dset), at.file, at.object, "cannot read the dataspace");
  auto dims = to_dims(shape);
  for (int64_t r0 = 0; r0 < shape[0]; r0 += rows_per_slab) {
    const int64_t n = std::min(rows_per_slab, shape[0] - r0);
    std::vector<hsize_t> start(dims.size(), 0), count = dims;
    start[0] = static_cast<hsize_t>(r0);
    count[0] = static_cast<hsize_t>(n);
    check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr), at.file,
          at.object, "cannot select rows");
    SpaceHandle mspace = checked<SpaceHandle>(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr),
                                              at.file, at.object, "cannot create a dataspace");
    buf.resize(static_cast<size_t>(n * row_bytes));
    check(H5Dread(dset, ft.get(), mspace.get(), fspace.get(), H5P_DEFAULT, buf.data()), at.file, at.object,
          "cannot read dataset");
    // zlib takes uInt lengths; a slab is at most 64 MiB or one row
    for (size_t off = 0; off < buf.size();) {
      const size_t len = std::min<size_t>(buf.size() - off, size_t{1} << 30);
      crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data() + off), static_cast<uInt>(len));
      off += len;
    }
  }
  return static_cast<uint32_t>(crc);
}

// Compares a dataset's CRC with the attribute `attr` on `holder`; returns a problem or nothing.
std::optional<std::string> check_dataset(hid_t parent, const std::string& name, hid_t holder, const std::string& attr,
                                         const std::string& label, const Where& at) {
  if (!hard_link_exists(parent, name, at)) return label + " (missing)";
  const Where here{at.file, at.object + "/" + name};
  DatasetHandle d = checked<DatasetHandle>(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), here.file, here.object,
                                           "cannot open dataset");
  const htri_t has = H5Aexists(holder, attr.c_str());
  if (has < 0) hdf5_fail(at.file, at.object, "cannot look up attribute " + attr);
  if (has == 0) return label + " (no checksum)";
  const uint32_t expected = read_attr_u32(holder, attr, at);
  const std::optional<uint32_t> crc = dataset_crc(d.get(), here);
  if (!crc) return label + " (not numbers stored in full)";
  if (*crc != expected) return label;
  return std::nullopt;
}

void validate_name(const std::string& name, const std::string& file, const char* what) {
  PQ_REQUIRE(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..", file, ": ", what,
             " name '", name, "' is empty or contains '/'");
}

void validate_dense(const DenseTensor& t, const std::string& file) {
  validate_name(t.name, file, "tensor");
  const size_t elem = dtype_bytes(t.dtype);
  PQ_REQUIRE(elem > 0, file, ": tensor ", t.name, ": dtype '", t.dtype, "' is not one of F32, F16, BF16");
  for (int64_t d : t.shape)
    PQ_REQUIRE(d >= 0, file, ": tensor ", t.name, ": negative dimension in ", shape_str(t.shape));
  const uint64_t expected = static_cast<uint64_t>(element_count(t.shape)) * elem;
  PQ_REQUIRE(t.bytes.size() == expected, file, ": tensor ", t.name, ": ", t.bytes.size(), " bytes for ", t.dtype, " ",
             shape_str(t.shape), ", expected ", expected);
}

// Expected shapes of a linear's datasets from its attributes.
struct LinearShapes {
  std::vector<int64_t> qweight, qzeros, scales, g_idx;
};
LinearShapes linear_shapes(const PackedLinear& l) {
  const int64_t k = l.in_features, n = l.out_features, g = l.groups, bits = l.bits;
  return {{ceil_div(k * bits, 32), n}, {g, ceil_div(n * bits, 32)}, {g, n}, {k}};
}

void validate_linear(const PackedLinear& l, const std::string& file) {
  validate_name(l.module, file, "module");
  const std::string& m = l.module;
  PQ_REQUIRE(l.in_features > 0 && l.out_features > 0, file, ": ", m, ": shape [", l.out_features, " x ", l.in_features,
             "] must be positive");
  PQ_REQUIRE(l.bits >= 1 && l.bits <= 16, file, ": ", m, ": bits = ", l.bits, ", expected 2, 3, 4 or 8");
  PQ_REQUIRE(l.groups >= 1 && l.groups <= l.in_features, file, ": ", m, ": groups = ", l.groups, ", expected 1..",
             l.in_features);
  PQ_REQUIRE(l.group_size >= -1 && l.group_size <= std::numeric_limits<int32_t>::max() && l.group_size != 0, file, ": ",
             m, ": group_size = ", l.group_size, ", expected -1 or a positive size");
  const LinearShapes s = linear_shapes(l);
  auto need = [&](size_t have, const std::vector<int64_t>& shape, const char* name) {
    PQ_REQUIRE(have == static_cast<size_t>(element_count(shape)), file, ": ", m, ": ", name, " has ", have,
               " elements, expected ", shape_str(shape));
  };
  need(l.qweight.size(), s.qweight, "qweight");
  need(l.qzeros.size(), s.qzeros, "qzeros");
  need(l.scales.size(), s.scales, "scales");
  need(l.g_idx.size(), s.g_idx, "g_idx");
  for (size_t k = 0; k < l.g_idx.size(); ++k)
    PQ_REQUIRE(l.g_idx[k] >= 0 && l.g_idx[k] < l.groups, file, ": ", m, ": g_idx[", k, "] = ", l.g_idx[k],
               " is not a group (groups = ", l.groups, ")");
}

std::string model_path(const std::string& out_dir) { return out_dir + "/model.h5"; }

// The device and inode of the file at `path` ({0, 0}: nothing there): whether a path still names the file a writer
// opened.
std::pair<uint64_t, uint64_t> file_identity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {0, 0};
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

void silence_hdf5_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

uint64_t packed_bytes(const PackedLinear& l) {
  const LinearShapes s = linear_shapes(l);
  return static_cast<uint64_t>(4 * element_count(s.qweight) + 4 * element_count(s.qzeros) +
                               2 * element_count(s.scales) + 4 * element_count(s.g_idx));
}

// ---------------------------------------------------------------------------------------------------------
// ShardWriter

ShardWriter::ShardWriter(const std::string& path, MPI_Comm comm, bool resume) : path_(path), comm_(comm) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  const Where at{path_, ""};
  PlistHandle fapl = checked<PlistHandle>(H5Pcreate(H5P_FILE_ACCESS), path_, "", "cannot create a property list");
  check(H5Pset_fapl_mpio(fapl.get(), comm_, MPI_INFO_NULL), path_, "", "cannot select the MPI-IO driver");
  // metadata reads and writes collective: one rank reads/writes, the others get it broadcast
  check(H5Pset_all_coll_metadata_ops(fapl.get(), true), path_, "", "cannot set collective metadata reads");
  check(H5Pset_coll_metadata_write(fapl.get(), true), path_, "", "cannot set collective metadata writes");
  // 1.8 object headers: compact groups and attributes, still readable by every tool in use
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), path_, "", "cannot set the format");

  // ranks agree on whether the file is there (rank 0 looks, so that a lagging file system cannot split them)
  int exists = 0;
  if (resume && rank_ == 0) exists = std::filesystem::exists(path_) ? 1 : 0;
  if (resume) MPI_Bcast(&exists, 1, MPI_INT, 0, comm_);

  FileHandle file;
  if (exists)
    file = checked<FileHandle>(H5Fopen(path_.c_str(), H5F_ACC_RDWR, fapl.get()), path_, "",
                               "cannot open the shard to resume (is it a pipequant shard, and writable?)");
  else
    file = checked<FileHandle>(H5Fcreate(path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), path_, "",
                               "cannot create file (is the directory writable?)");
  open_or_create_group(file.get(), "blocks", at);
  open_or_create_group(file.get(), "tensors", at);
  file_ = file.release();
  if (rank_ == 0) identity_ = file_identity(path_);
}

ShardWriter::~ShardWriter() { close_file(); }

void ShardWriter::close_file() {
  if (file_ >= 0) {
    H5Fclose(file_);
    file_ = -1;
    H5Eclear2(H5E_DEFAULT);
  }
}

void ShardWriter::close() {
  if (file_ < 0) return;
  const hid_t f = file_;
  file_ = -1;
  check_write(H5Fclose(f), path_, "", "cannot close file");
  check_still_in_place();
}

void ShardWriter::check_still_in_place() const {
  int in_place = 1;
  if (rank_ == 0) in_place = identity_.second != 0 && file_identity(path_) == identity_ ? 1 : 0;
  MPI_Bcast(&in_place, 1, MPI_INT, 0, comm_);
  PQ_REQUIRE(in_place, path_,
             ": the shard file was removed or replaced while it was being written; run the same command again to "
             "resume");
}

void ShardWriter::begin_block(int64_t block) {
  PQ_REQUIRE(file_ >= 0, path_, ": the shard is closed");
  PQ_REQUIRE(block >= 0, path_, ": block index ", block, " is negative");
  const Where at{path_, "/blocks"};
  GroupHandle blocks = open_group(file_, "/blocks", at);
  const std::string name = std::to_string(block);
  // a block redone on resume replaces the old group (its space is not reclaimed; h5repack does that)
  delete_if_exists(blocks.get(), name, at);
  create_group(blocks.get(), name, at);
}

void ShardWriter::write_dataset(long long parent, const std::string& object, const std::string& name,
                                long long file_type, long long mem_type, const std::vector<int64_t>& shape,
                                const void* data, size_t elem_bytes) {
  const std::string full = object + "/" + name;
  const Where at{path_, full};
  SpaceHandle fspace = simple_space(shape, at);
  PlistHandle dcpl = checked<PlistHandle>(H5Pcreate(H5P_DATASET_CREATE), path_, full, "cannot create a property list");
  check(H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS), path_, full, "cannot set the layout");
  // every byte is written right after: no fill pass
  check(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), path_, full, "cannot set the fill time");
  delete_if_exists(parent, name, Where{path_, object});
  const hid_t created =
      H5Dcreate2(parent, name.c_str(), file_type, fspace.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT);
  check_write(created < 0 ? -1 : 0, path_, full, "cannot create dataset");
  DatasetHandle dset(created);

  // this rank's part: rows [r0, r1) of the first dimension (a scalar counts as one row)
  const int64_t count = element_count(shape);
  const int64_t rows = shape.empty() ? 1 : shape[0];
  const auto [r0, r1] = count == 0 ? std::pair<int64_t, int64_t>{0, 0} : owned_rows(rows, rank_, size_);
  const int64_t row_elems = rows > 0 ? count / rows : 0;
  SpaceHandle mspace;
  const char* ptr = static_cast<const char*>(data);
  if (r1 > r0 && shape.empty()) {
    mspace = checked<SpaceHandle>(H5Screate(H5S_SCALAR), path_, full, "cannot create a dataspace");
  } else if (r1 > r0) {
    std::vector<hsize_t> start(shape.size(), 0), cnt = to_dims(shape);
    start[0] = static_cast<hsize_t>(r0);
    cnt[0] = static_cast<hsize_t>(r1 - r0);
    check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, cnt.data(), nullptr), path_, full,
          "cannot select rows");
    mspace = checked<SpaceHandle>(H5Screate_simple(static_cast<int>(cnt.size()), cnt.data(), nullptr), path_, full,
                                  "cannot create a dataspace");
    ptr += r0 * row_elems * static_cast<int64_t>(elem_bytes);
  } else {
    // nothing from this rank, but the transfer is collective: every rank calls H5Dwrite
    check(H5Sselect_none(fspace.get()), path_, full, "cannot select nothing");
    mspace = checked<SpaceHandle>(H5Scopy(fspace.get()), path_, full, "cannot create a dataspace");
    check(H5Sselect_none(mspace.get()), path_, full, "cannot select nothing");
  }
  static const char kNoData = 0;  // HDF5 wants a buffer even when nothing is selected
  if (ptr == nullptr) ptr = &kNoData;

  PlistHandle dxpl = checked<PlistHandle>(H5Pcreate(H5P_DATASET_XFER), path_, full, "cannot create a property list");
  check(H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE), path_, full, "cannot set the transfer mode");
  check_write(H5Dwrite(dset.get(), mem_type, mspace.get(), fspace.get(), dxpl.get(), ptr), path_, full,
              "cannot write dataset");
  uint32_t local_cause = 0, global_cause = 0;
  check(H5Pget_mpio_no_collective_cause(dxpl.get(), &local_cause, &global_cause), path_, full,
        "cannot query the transfer mode");
  last_cause_ = global_cause;
  last_collective_ = global_cause == H5D_MPIO_COLLECTIVE;
  bytes_written_ += static_cast<uint64_t>(count) * elem_bytes;
  rank_bytes_written_ += static_cast<uint64_t>((r1 - r0) * row_elems) * elem_bytes;
}

void ShardWriter::write_linear(int64_t block, const PackedLinear& l) {
  PQ_REQUIRE(file_ >= 0, path_, ": the shard is closed");
  validate_linear(l, path_);
  const std::string bpath = block_path(block);
  const Where bat{path_, bpath};
  PQ_REQUIRE(link_exists(file_, "/blocks", bat) && link_exists(file_, bpath, bat), path_, ": ", bpath,
             ": block not begun (begin_block first)");
  GroupHandle bg = open_group(file_, bpath, bat);
  delete_if_exists(bg.get(), l.module, bat);
  const std::string object = bpath + "/" + l.module;
  GroupHandle g = create_group(bg.get(), l.module, bat);
  const Where at{path_, object};
  TypeHandle half = half_type(at);
  const LinearShapes s = linear_shapes(l);

  write_dataset(g.get(), object, "qweight", H5T_STD_I32LE, H5T_NATIVE_INT32, s.qweight, l.qweight.data(), 4);
  write_dataset(g.get(), object, "qzeros", H5T_STD_I32LE, H5T_NATIVE_INT32, s.qzeros, l.qzeros.data(), 4);
  write_dataset(g.get(), object, "scales", half.get(), half.get(), s.scales, l.scales.data(), 2);
  write_dataset(g.get(), object, "g_idx", H5T_STD_I32LE, H5T_NATIVE_INT32, s.g_idx, l.g_idx.data(), 4);

  const hid_t gid = g.get();
  write_attr_i32(gid, "bits", l.bits, at);
  write_attr_i32(gid, "group_size", static_cast<int32_t>(l.group_size), at);
  write_attr_i32(gid, "sym", l.sym ? 1 : 0, at);
  write_attr_i32(gid, "act_order", l.act_order ? 1 : 0, at);
  write_attr_i32(gid, "static_groups", l.static_groups ? 1 : 0, at);
  write_attr_f64(gid, "damp", l.damp, at);
  write_attr_f64(gid, "relative_error", l.relative_error, at);
  write_attr_f64(gid, "rtn_relative_error", l.rtn_relative_error, at);
  write_attr_f64(gid, "awq_scale_exponent", l.awq_scale_exponent, at);
  write_attr_f64(gid, "awq_clip", l.awq_clip, at);
  write_attr_str(gid, "fallback", l.fallback, at);
  if (l.expert_tokens >= 0) {
    write_attr_i64(gid, "expert_tokens", l.expert_tokens, at);
    write_attr_str(gid, "expert_hessian", l.expert_hessian, at);
  }
  write_attr_i64(gid, "in_features", l.in_features, at);
  write_attr_i64(gid, "out_features", l.out_features, at);
  write_attr_i64(gid, "groups", l.groups, at);
  write_attr_u32(gid, "checksum_qweight", crc32_of(l.qweight.data(), l.qweight.size() * 4), at);
  write_attr_u32(gid, "checksum_qzeros", crc32_of(l.qzeros.data(), l.qzeros.size() * 4), at);
  write_attr_u32(gid, "checksum_scales", crc32_of(l.scales.data(), l.scales.size() * 2), at);
  write_attr_u32(gid, "checksum_g_idx", crc32_of(l.g_idx.data(), l.g_idx.size() * 4), at);
}

void ShardWriter::write_block_tensor(int64_t block, const DenseTensor& t) {
  PQ_REQUIRE(file_ >= 0, path_, ": the shard is closed");
  validate_dense(t, path_);
  const std::string bpath = block_path(block);
  const Where bat{path_, bpath};
  PQ_REQUIRE(link_exists(file_, "/blocks", bat) && link_exists(file_, bpath, bat), path_, ": ", bpath,
             ": block not begun (begin_block first)");
  GroupHandle bg = open_group(file_, bpath, bat);
  const Where at{path_, bpath + "/" + t.name};
  TypeHandle type = dense_type(t.dtype, at);
  write_dataset(bg.get(), bpath, t.name, type.get(), type.get(), t.shape, t.bytes.data(), dtype_bytes(t.dtype));
  DatasetHandle d =
      checked<DatasetHandle>(H5Dopen2(bg.get(), t.name.c_str(), H5P_DEFAULT), path_, at.object, "cannot open dataset");
  write_attr_str(d.get(), "dtype", t.dtype, at);
  write_attr_u32(d.get(), "checksum", crc32_of(t.bytes.data(), t.bytes.size()), at);
}

void ShardWriter::write_tensor(const DenseTensor& t) {
  PQ_REQUIRE(file_ >= 0, path_, ": the shard is closed");
  validate_dense(t, path_);
  const Where tat{path_, "/tensors"};
  GroupHandle tg = open_group(file_, "/tensors", tat);
  const Where at{path_, "/tensors/" + t.name};
  TypeHandle type = dense_type(t.dtype, at);
  write_dataset(tg.get(), "/tensors", t.name, type.get(), type.get(), t.shape, t.bytes.data(), dtype_bytes(t.dtype));
  DatasetHandle d =
      checked<DatasetHandle>(H5Dopen2(tg.get(), t.name.c_str(), H5P_DEFAULT), path_, at.object, "cannot open dataset");
  write_attr_str(d.get(), "dtype", t.dtype, at);
  write_attr_u32(d.get(), "checksum", crc32_of(t.bytes.data(), t.bytes.size()), at);
}

void ShardWriter::mark_complete(int64_t block) {
  PQ_REQUIRE(file_ >= 0, path_, ": the shard is closed");
  const std::string bpath = block_path(block);
  const Where at{path_, bpath};
  PQ_REQUIRE(link_exists(file_, "/blocks", at) && link_exists(file_, bpath, at), path_, ": ", bpath,
             ": block not begun (begin_block first)");
  // data first, then the flag, each flushed: a crash leaves either a complete block or one without the flag
  check_write(H5Fflush(file_, H5F_SCOPE_GLOBAL), path_, bpath, "cannot flush");
  check_still_in_place();
  // a stop by signal says the blocks durable so far and lets no marker be written after it (base/stop.hpp)
  DurableMark mark;
  GroupHandle g = open_group(file_, bpath, at);
  write_attr_i32(g.get(), "complete", 1, at);
  g.reset();
  check_write(H5Fflush(file_, H5F_SCOPE_GLOBAL), path_, bpath, "cannot flush");
  mark.done(path_, block);
}

void remove_unfinished(const std::string& path, const std::set<int64_t>& keep) {
  PlistHandle fapl = checked<PlistHandle>(H5Pcreate(H5P_FILE_ACCESS), path, "", "cannot create a property list");
  check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), path, "", "cannot set the format");
  FileHandle file = checked<FileHandle>(H5Fopen(path.c_str(), H5F_ACC_RDWR, fapl.get()), path, "",
                                        "cannot open the shard to resume (is it writable?)");
  for (const char* group : {"/blocks", "/tensors"}) {
    const Where at{path, group};
    if (!link_exists(file.get(), group, at)) continue;
    GroupHandle g = open_group(file.get(), group, at);
    for (const auto& name : link_names(g.get(), at)) {
      const auto block = parse_block(name);
      if (group == std::string_view("/blocks") && block && keep.count(*block)) continue;
      check(H5Ldelete(g.get(), name.c_str(), H5P_DEFAULT), path, group, "cannot delete '" + name + "'");
    }
  }
  check_write(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), path, "", "cannot flush");
  check_write(H5Fclose(file.release()), path, "", "cannot close file");
}

// ---------------------------------------------------------------------------------------------------------
// ShardReader

ShardReader::ShardReader(const std::string& path) : path_(path) {
  PQ_REQUIRE(std::filesystem::is_regular_file(path_), path_, ": no such shard file");
  require_hdf5_file_survives(path_);
  PlistHandle fapl = checked<PlistHandle>(H5Pcreate(H5P_FILE_ACCESS), path_, "", "cannot create a property list");
  // lock where the file system supports it, read anyway where it does not (Lustre, some NFS)
  check(H5Pset_file_locking(fapl.get(), true, true), path_, "", "cannot set file locking");
  FileHandle file = checked<FileHandle>(H5Fopen(path_.c_str(), H5F_ACC_RDONLY, fapl.get()), path_, "",
                                        "cannot open (not an HDF5 file, damaged, or being written)");
  file_ = file.release();
}

ShardReader::~ShardReader() {
  if (file_ >= 0) H5Fclose(file_);
}

std::vector<int64_t> ShardReader::blocks() const {
  const Where at{path_, "/blocks"};
  std::vector<int64_t> out;
  if (!hard_link_exists(file_, "blocks", at)) return out;
  GroupHandle g = open_group(file_, "/blocks", at);
  for (const auto& c : children(g.get(), at))
    if (auto b = parse_block(c.name); b && c.type == H5O_TYPE_GROUP) out.push_back(*b);
  std::sort(out.begin(), out.end());
  return out;
}

bool ShardReader::block_complete(int64_t block) const {
  const std::string bpath = block_path(block);
  const Where at{path_, bpath};
  if (block < 0 || !hard_link_exists(file_, "blocks", at) || !hard_link_exists(file_, bpath, at)) return false;
  GroupHandle g = open_group(file_, bpath, at);
  const htri_t has = H5Aexists(g.get(), "complete");
  if (has < 0) hdf5_fail(path_, bpath, "cannot look up attribute complete");
  return has > 0 && read_attr_i64(g.get(), "complete", at) == 1;
}

namespace {
GroupHandle open_block(hid_t file, int64_t block, const std::string& path) {
  const std::string bpath = block_path(block);
  const Where at{path, bpath};
  PQ_REQUIRE(block >= 0 && hard_link_exists(file, "blocks", at) && hard_link_exists(file, bpath, at), path, ": block ",
             block, " is not in the shard");
  return open_group(file, bpath, at);
}
}  // namespace

std::vector<std::string> ShardReader::linears(int64_t block) const {
  GroupHandle g = open_block(file_, block, path_);
  const Where at{path_, block_path(block)};
  std::vector<std::string> out;
  for (const auto& c : children(g.get(), at))
    if (c.type == H5O_TYPE_GROUP && link_exists(g.get(), c.name + "/qweight", at)) out.push_back(c.name);
  return out;
}

std::vector<std::string> ShardReader::block_tensors(int64_t block) const {
  GroupHandle g = open_block(file_, block, path_);
  const Where at{path_, block_path(block)};
  std::vector<std::string> out;
  for (const auto& c : children(g.get(), at))
    if (c.type == H5O_TYPE_DATASET) out.push_back(c.name);
  return out;
}

PackedLinear ShardReader::read_linear_info(int64_t block, const std::string& module) const {
  GroupHandle bg = open_block(file_, block, path_);
  const std::string object = block_path(block) + "/" + module;
  const Where bat{path_, block_path(block)};
  PQ_REQUIRE(!module.empty() && hard_link_exists(bg.get(), module, bat), path_, ": ", object, ": no such linear");
  GroupHandle g = open_group(bg.get(), module, bat);
  const Where at{path_, object};
  const hid_t gid = g.get();
  PackedLinear l;
  l.module = module;
  l.bits = read_attr_int(gid, "bits", at);
  l.group_size = read_attr_i64(gid, "group_size", at);
  l.sym = read_attr_i64(gid, "sym", at) != 0;
  l.act_order = read_attr_i64(gid, "act_order", at) != 0;
  l.static_groups = read_attr_i64(gid, "static_groups", at) != 0;
  l.damp = read_attr_f64(gid, "damp", at);
  l.relative_error = read_attr_f64(gid, "relative_error", at);
  l.rtn_relative_error = read_attr_f64(gid, "rtn_relative_error", at);
  if (H5Aexists(gid, "awq_scale_exponent") > 0) l.awq_scale_exponent = read_attr_f64(gid, "awq_scale_exponent", at);
  if (H5Aexists(gid, "awq_clip") > 0) l.awq_clip = read_attr_f64(gid, "awq_clip", at);
  l.fallback = read_attr_str(gid, "fallback", at);
  if (H5Aexists(gid, "expert_tokens") > 0) {
    l.expert_tokens = read_attr_i64(gid, "expert_tokens", at);
    l.expert_hessian = read_attr_str(gid, "expert_hessian", at);
  }
  l.in_features = read_attr_i64(gid, "in_features", at);
  l.out_features = read_attr_i64(gid, "out_features", at);
  l.groups = read_attr_i64(gid, "groups", at);
  // at most 2^31 - 1 features, so that the dataset shapes computed from them (linear_shapes) stay in int64
  constexpr int64_t kMaxFeatures = std::numeric_limits<int32_t>::max();
  PQ_REQUIRE(l.in_features > 0 && l.in_features <= kMaxFeatures && l.out_features > 0 &&
                 l.out_features <= kMaxFeatures && l.groups > 0 && l.groups <= l.in_features && l.bits >= 1 &&
                 l.bits <= 16,
             path_, ": ", object, ": attributes describe no valid linear (in ", l.in_features, ", out ", l.out_features,
             ", groups ", l.groups, ", bits ", l.bits, ")");
  return l;
}

PackedLinear ShardReader::read_linear(int64_t block, const std::string& module) const {
  PackedLinear l = read_linear_tables(block, module);  // the attributes, qzeros and g_idx
  const std::string object = block_path(block) + "/" + module;
  const Where at{path_, object};
  GroupHandle g = open_group(file_, object, at);
  const LinearShapes s = linear_shapes(l);
  TypeHandle half = half_type(at);
  read_dataset(g.get(), "qweight", H5T_NATIVE_INT32, s.qweight, l.qweight, at);
  read_dataset(g.get(), "scales", half.get(), s.scales, l.scales, at);
  return l;
}

PackedLinear ShardReader::read_linear_tables(int64_t block, const std::string& module) const {
  PackedLinear l = read_linear_info(block, module);
  const std::string object = block_path(block) + "/" + module;
  const Where at{path_, object};
  GroupHandle g = open_group(file_, object, at);
  const LinearShapes s = linear_shapes(l);
  read_dataset(g.get(), "qzeros", H5T_NATIVE_INT32, s.qzeros, l.qzeros, at);
  read_dataset(g.get(), "g_idx", H5T_NATIVE_INT32, s.g_idx, l.g_idx, at);
  return l;
}

namespace {
// The tensor, or with `with_data` false its name, dtype and shape only.
DenseTensor read_dense(hid_t parent, const std::string& name, const std::string& file, const std::string& object,
                       bool with_data) {
  const Where at{file, object};
  DatasetHandle d =
      checked<DatasetHandle>(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), file, object, "cannot open dataset");
  DenseTensor t;
  t.name = name;
  t.shape = dataset_shape(d.get(), at);
  const int64_t count = stored_element_count(d.get(), t.shape, at);
  const htri_t has = H5Aexists(d.get(), "dtype");
  if (has < 0) hdf5_fail(file, object, "cannot look up attribute dtype");
  if (has > 0) {
    t.dtype = read_attr_str(d.get(), "dtype", at);
  } else {
    // not written by pipequant: name the dtype from the stored type
    TypeHandle ft = checked<TypeHandle>(H5Dget_type(d.get()), file, object, "cannot read the type");
    TypeHandle half = half_type(at);
    const size_t size = H5Tget_size(ft.get());
    if (H5Tget_class(ft.get()) == H5T_FLOAT && size == 4)
      t.dtype = "F32";
    else if (H5Tget_class(ft.get()) == H5T_FLOAT && size == 2)
      t.dtype = H5Tequal(ft.get(), half.get()) > 0 ? "F16" : "BF16";
    else
      fail(file, ": ", object, ": stored type is not F32, F16 or BF16");
  }
  const size_t elem = dtype_bytes(t.dtype);
  PQ_REQUIRE(elem > 0, file, ": ", object, ": dtype '", t.dtype, "' is not one of F32, F16, BF16");
  if (!with_data) return t;
  TypeHandle mt = dense_type(t.dtype, at);
  t.bytes.resize(static_cast<size_t>(count) * elem);
  if (!t.bytes.empty())
    check(H5Dread(d.get(), mt.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.bytes.data()), file, object,
          "cannot read dataset");
  return t;
}
}  // namespace

namespace {
DenseTensor read_block_dense(hid_t file, const std::string& path, int64_t block, const std::string& name,
                             bool with_data) {
  GroupHandle g = open_block(file, block, path);
  const std::string object = block_path(block) + "/" + name;
  PQ_REQUIRE(!name.empty() && hard_link_exists(g.get(), name, Where{path, block_path(block)}), path, ": ", object,
             ": no such tensor");
  return read_dense(g.get(), name, path, object, with_data);
}
}  // namespace

DenseTensor ShardReader::read_block_tensor(int64_t block, const std::string& name) const {
  return read_block_dense(file_, path_, block, name, true);
}

DenseTensor ShardReader::read_block_tensor_info(int64_t block, const std::string& name) const {
  return read_block_dense(file_, path_, block, name, false);
}

bool ShardReader::has_tensor(const std::string& name) const {
  const Where at{path_, "/tensors"};
  if (name.empty() || !hard_link_exists(file_, "tensors", at)) return false;
  GroupHandle g = open_group(file_, "/tensors", at);
  return hard_link_exists(g.get(), name, at);
}

DenseTensor ShardReader::read_tensor(const std::string& name) const {
  PQ_REQUIRE(has_tensor(name), path_, ": /tensors/", name, ": no such tensor");
  GroupHandle g = open_group(file_, "/tensors", Where{path_, "/tensors"});
  return read_dense(g.get(), name, path_, "/tensors/" + name, true);
}

DenseTensor ShardReader::read_tensor_info(const std::string& name) const {
  PQ_REQUIRE(has_tensor(name), path_, ": /tensors/", name, ": no such tensor");
  GroupHandle g = open_group(file_, "/tensors", Where{path_, "/tensors"});
  return read_dense(g.get(), name, path_, "/tensors/" + name, false);
}

std::vector<std::string> ShardReader::tensors() const {
  const Where at{path_, "/tensors"};
  std::vector<std::string> out;
  if (!hard_link_exists(file_, "tensors", at)) return out;
  GroupHandle g = open_group(file_, "/tensors", at);
  for (const auto& c : children(g.get(), at))
    if (c.type == H5O_TYPE_DATASET) out.push_back(c.name);
  return out;
}

std::vector<std::string> ShardReader::verify_block(int64_t block) const {
  GroupHandle bg = open_block(file_, block, path_);
  const std::string bpath = block_path(block);
  const Where bat{path_, bpath};
  std::vector<std::string> bad;
  for (const auto& c : children(bg.get(), bat)) {
    if (c.type == H5O_TYPE_GROUP) {
      const Where at{path_, bpath + "/" + c.name};
      GroupHandle g = open_group(bg.get(), c.name, bat);
      for (const char* ds : {"qweight", "qzeros", "scales", "g_idx"})
        if (auto p = check_dataset(g.get(), ds, g.get(), std::string("checksum_") + ds, c.name + "/" + ds, at))
          bad.push_back(*p);
    } else if (c.type == H5O_TYPE_DATASET) {
      const Where at{path_, bpath + "/" + c.name};
      DatasetHandle d = checked<DatasetHandle>(H5Dopen2(bg.get(), c.name.c_str(), H5P_DEFAULT), path_, at.object,
                                               "cannot open dataset");
      if (auto p = check_dataset(bg.get(), c.name, d.get(), "checksum", c.name, bat)) bad.push_back(*p);
    } else {
      bad.push_back(c.name + " (unreadable)");
    }
  }
  return bad;
}

std::vector<std::string> ShardReader::verify_tensors() const {
  std::vector<std::string> bad;
  const Where at{path_, "/tensors"};
  if (!hard_link_exists(file_, "tensors", at)) return bad;
  GroupHandle g = open_group(file_, "/tensors", at);
  for (const auto& c : children(g.get(), at)) {
    if (c.type != H5O_TYPE_DATASET) {
      bad.push_back(c.name + " (unreadable)");
      continue;
    }
    DatasetHandle d = checked<DatasetHandle>(H5Dopen2(g.get(), c.name.c_str(), H5P_DEFAULT), path_,
                                             "/tensors/" + c.name, "cannot open dataset");
    if (auto p = check_dataset(g.get(), c.name, d.get(), "checksum", c.name, at)) bad.push_back(*p);
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------------------
// model.h5

void write_model_index(const std::string& out_dir, const ModelIndex& index) {
  const std::string final_path = model_path(out_dir);
  const std::string tmp = final_path + ".tmp";
  const auto nshards = static_cast<int64_t>(index.shard_files.size());
  for (const auto& [b, s] : index.block_shard)
    PQ_REQUIRE(b >= 0 && s >= 0 && s < nshards, final_path, ": block ", b, " points to shard ", s, " of ", nshards);
  for (const auto& [name, s] : index.tensor_shard) {
    validate_name(name, final_path, "tensor");
    PQ_REQUIRE(s >= 0 && s < nshards, final_path, ": tensor ", name, " points to shard ", s, " of ", nshards);
  }
  for (const auto& f : index.shard_files) PQ_REQUIRE(!f.empty(), final_path, ": empty shard file name");
  // complete = 1 promises every shard: one removed after its stage closed it must not be linked as done
  if (index.complete)
    for (const auto& f : index.shard_files)
      PQ_REQUIRE(std::filesystem::is_regular_file(out_dir + "/" + f), out_dir, "/", f,
                 ": the shard is missing; the output is not marked complete (run the same command again to resume)");

  {
    // one process, default (POSIX) driver: the index is small and written after the shards are closed
    PlistHandle fapl = checked<PlistHandle>(H5Pcreate(H5P_FILE_ACCESS), tmp, "", "cannot create a property list");
    check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), tmp, "", "cannot set the format");
    FileHandle file = checked<FileHandle>(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), tmp, "",
                                          "cannot create file (is the directory writable?)");
    const Where at{tmp, "/"};
    GroupHandle root = open_group(file.get(), "/", at);
    write_attr_str(root.get(), "config_json", index.config_json, at);
    write_attr_str(root.get(), "args_json", index.args_json, at);
    write_attr_str(root.get(), "fingerprint", index.fingerprint, at);
    write_attr_str(root.get(), "format", index.format, at);
    write_attr_i32(root.get(), "complete", index.complete ? 1 : 0, at);

    {
      const Where sat{tmp, "/shards"};
      TypeHandle st = string_type(sat);
      SpaceHandle space = simple_space({nshards}, sat);
      DatasetHandle d = checked<DatasetHandle>(
          H5Dcreate2(file.get(), "shards", st.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), tmp,
          "/shards", "cannot create dataset");
      std::vector<const char*> names;
      for (const auto& f : index.shard_files) names.push_back(f.c_str());
      if (!names.empty())
        check(H5Dwrite(d.get(), st.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, names.data()), tmp, "/shards",
              "cannot write dataset");
    }
    // external links hold the shard names relative to model.h5; HDF5 resolves them against the directory of
    // the file that holds the link, so the output directory can be moved and opened from anywhere
    GroupHandle blocks = create_group(file.get(), "blocks", at);
    for (const auto& [b, s] : index.block_shard) {
      const std::string target = block_path(b);
      check(H5Lcreate_external(index.shard_files[static_cast<size_t>(s)].c_str(), target.c_str(), blocks.get(),
                               std::to_string(b).c_str(), H5P_DEFAULT, H5P_DEFAULT),
            tmp, target, "cannot create external link");
    }
    GroupHandle tensors = create_group(file.get(), "tensors", at);
    for (const auto& [name, s] : index.tensor_shard) {
      const std::string target = "/tensors/" + name;
      check(H5Lcreate_external(index.shard_files[static_cast<size_t>(s)].c_str(), target.c_str(), tensors.get(),
                               name.c_str(), H5P_DEFAULT, H5P_DEFAULT),
            tmp, target, "cannot create external link");
    }
    tensors.reset();
    blocks.reset();
    root.reset();
    check_write(H5Fclose(file.release()), tmp, "", "cannot close file");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, final_path, ec);
  PQ_REQUIRE(!ec, final_path, ": cannot rename ", tmp, " to it: ", ec.message());
}

bool model_index_exists(const std::string& out_dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(model_path(out_dir), ec);
}

namespace {
// The shard file an external link in `group` points to, as an index into `shards`.
int64_t link_shard(hid_t group, const std::string& name, const std::vector<std::string>& shards, const Where& at) {
  const std::string object = at.object + "/" + name;
  H5L_info_t info;
  check(H5Lget_info(group, name.c_str(), &info, H5P_DEFAULT), at.file, object, "cannot read link");
  PQ_REQUIRE(info.type == H5L_TYPE_EXTERNAL, at.file, ": ", object, ": not an external link into a shard");
  // one NUL more than the value: H5Lunpack_elink_val finds the names with strlen, and a damaged value may lack its own
  std::vector<char> buf(info.u.val_size + 1, '\0');
  check(H5Lget_val(group, name.c_str(), buf.data(), info.u.val_size, H5P_DEFAULT), at.file, object, "cannot read link");
  unsigned flags = 0;
  const char* file = nullptr;
  const char* obj = nullptr;
  check(H5Lunpack_elink_val(buf.data(), info.u.val_size, &flags, &file, &obj), at.file, object, "cannot read link");
  const auto it = std::find(shards.begin(), shards.end(), std::string(file ? file : ""));
  PQ_REQUIRE(it != shards.end(), at.file, ": ", object, ": links to ", file ? file : "?", ", which is not in /shards");
  return static_cast<int64_t>(it - shards.begin());
}
}  // namespace

ModelIndex read_model_index(const std::string& out_dir) {
  const std::string path = model_path(out_dir);
  std::error_code ec;
  PQ_REQUIRE(std::filesystem::is_regular_file(path, ec), path,
             ": not found (is this a pipequant output directory, and did the run finish?)");
  require_hdf5_file_survives(path);
  FileHandle file = checked<FileHandle>(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path, "",
                                        "cannot open (not an HDF5 file, or damaged)");
  const Where at{path, "/"};
  GroupHandle root = open_group(file.get(), "/", at);
  ModelIndex index;
  index.config_json = read_attr_str(root.get(), "config_json", at);
  index.args_json = read_attr_str(root.get(), "args_json", at);
  index.fingerprint = read_attr_str(root.get(), "fingerprint", at);
  index.format = read_attr_str(root.get(), "format", at);
  index.complete = read_attr_i64(root.get(), "complete", at) != 0;

  {
    const Where sat{path, "/shards"};
    PQ_REQUIRE(hard_link_exists(file.get(), "shards", at), path, ": /shards is missing");
    DatasetHandle d =
        checked<DatasetHandle>(H5Dopen2(file.get(), "shards", H5P_DEFAULT), path, "/shards", "cannot open dataset");
    const auto shape = dataset_shape(d.get(), sat);
    PQ_REQUIRE(shape.size() == 1, path, ": /shards is not a list");
    TypeHandle ft = checked<TypeHandle>(H5Dget_type(d.get()), path, "/shards", "cannot read the type");
    PQ_REQUIRE(H5Tget_class(ft.get()) == H5T_STRING && H5Tis_variable_str(ft.get()) > 0, path,
               ": /shards is not a list of strings");
    TypeHandle st = string_type(sat);
    // one shard per stage: far fewer than a model has blocks
    constexpr int64_t kMaxShards = 4096;
    const int64_t count = stored_element_count(d.get(), shape, sat);
    PQ_REQUIRE(count <= kMaxShards, path, ": /shards lists ", count, " files, more than the ", kMaxShards,
               " stages a run can have");
    // one name at a time: each string's length comes from the file's heap, so a damaged one can make every name as
    // long as the file
    SpaceHandle fspace = checked<SpaceHandle>(H5Dget_space(d.get()), path, "/shards", "cannot read the dataspace");
    SpaceHandle one = checked<SpaceHandle>(H5Screate(H5S_SCALAR), path, "/shards", "cannot create a dataspace");
    for (hsize_t i = 0; i < static_cast<hsize_t>(count); ++i) {
      const hsize_t n = 1;
      check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &i, nullptr, &n, nullptr), path, "/shards",
            "cannot select an entry");
      char* name = nullptr;
      check(H5Dread(d.get(), st.get(), one.get(), fspace.get(), H5P_DEFAULT, &name), path, "/shards",
            "cannot read dataset");
      index.shard_files.emplace_back(name ? name : "");
      H5Dvlen_reclaim(st.get(), one.get(), H5P_DEFAULT, &name);
    }
  }
  if (hard_link_exists(file.get(), "blocks", at)) {
    const Where bat{path, "/blocks"};
    GroupHandle g = open_group(file.get(), "/blocks", at);
    const std::vector<std::string> names = link_names(g.get(), bat);
    for (const auto& n : names) {
      const auto b = parse_block(n);
      PQ_REQUIRE(b.has_value(), path, ": /blocks/", n, ": not a block number");
      index.block_shard[*b] = link_shard(g.get(), n, index.shard_files, bat);
    }
  }
  if (hard_link_exists(file.get(), "tensors", at)) {
    const Where tat{path, "/tensors"};
    GroupHandle g = open_group(file.get(), "/tensors", at);
    const std::vector<std::string> names = link_names(g.get(), tat);
    for (const auto& n : names) index.tensor_shard[n] = link_shard(g.get(), n, index.shard_files, tat);
  }
  return index;
}

}  // namespace pipequant::io
