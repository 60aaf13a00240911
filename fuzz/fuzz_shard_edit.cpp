// Fuzzes pipequant's readers of its HDF5 output (io/shard.cpp: ShardReader, read_model_index) with files that are
// valid HDF5 but not what pipequant wrote: the input is a script of edits, applied with the HDF5 C API to a copy of a
// valid output directory written by ShardWriter and write_model_index (shard_fixture.hpp), which is then read as
// resume, inspect, eval and export read it. Raw byte corruption exercises libhdf5's own decoder (fuzz_shard_raw.cpp);
// this harness fuzzes our code: missing, retyped and reshaped attributes and datasets, wrong values and checksums,
// complete markers, links where groups were.
//
// Script: a sequence of edits, each one byte of operation (low 4 bits; bit 7: the edit goes to model.h5 instead of
// the shard) and its operands, read from the bytes that follow (an exhausted input reads as zeros). Objects are
// chosen by index among the links of the file as it is at that moment, in name order.
#include <hdf5.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "fuzz/shard_fixture.hpp"
#include "io/hdf5_handle.hpp"

namespace {

using namespace pipequant;

// ---------------------------------------------------------------------------------------------------------
// The script's operands

class Script {
 public:
  Script(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  bool done() const { return i_ >= n_; }
  uint8_t u8() { return i_ < n_ ? p_[i_++] : 0; }
  uint64_t bytes_le(int count) {
    uint64_t v = 0;
    for (int b = 0; b < count; ++b) v |= static_cast<uint64_t>(u8()) << (8 * b);
    return v;
  }
  uint32_t u32() { return static_cast<uint32_t>(bytes_le(4)); }
  uint64_t u64() { return bytes_le(8); }
  // One of `count` choices (0 when count is 0).
  size_t pick(size_t count) { return count == 0 ? 0 : u8() % count; }
  template <typename T, size_t N>
  const T& pick_from(const T (&table)[N]) {
    return table[pick(N)];
  }
  // Up to max_len raw bytes: a length byte, then the bytes.
  std::string text(size_t max_len) {
    const size_t len = std::min<size_t>(u8(), max_len);
    std::string s;
    for (size_t k = 0; k < len && !done(); ++k) s += static_cast<char>(u8());
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t i_ = 0;
};

// Values that sit on the edges of what the reader checks: small sizes, the int32 and int64 limits, powers of two
// whose products overflow.
inline constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max(), kI32Min = std::numeric_limits<int32_t>::min();
inline constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max(), kI64Min = std::numeric_limits<int64_t>::min();
inline constexpr int64_t k2To32 = int64_t{1} << 32, k2To40 = int64_t{1} << 40, k2To62 = int64_t{1} << 62;
inline constexpr int64_t kInterestingInts[] = {0,       1,      -1,     2,      3,       4,      5,     8,
                                               16,      17,     32,     33,     64,      255,    65535, kI32Max,
                                               kI32Min, k2To32, k2To40, k2To62, kI64Max, kI64Min};
inline constexpr double kInterestingDoubles[] = {0.0,    -0.0,   1.0,   0.5,    -1.0, 4.5,    1e300,
                                                 -1e300, 9.3e18, 3.0e9, 1e-310, 16.0, 2.0e-45};

inline constexpr const char* kAttrNames[] = {"bits",
                                             "group_size",
                                             "sym",
                                             "act_order",
                                             "static_groups",
                                             "damp",
                                             "relative_error",
                                             "rtn_relative_error",
                                             "awq_scale_exponent",
                                             "awq_clip",
                                             "fallback",
                                             "in_features",
                                             "out_features",
                                             "groups",
                                             "checksum_qweight",
                                             "checksum_qzeros",
                                             "checksum_scales",
                                             "checksum_g_idx",
                                             "dtype",
                                             "checksum",
                                             "complete",
                                             "config_json",
                                             "args_json",
                                             "fingerprint",
                                             "format"};

inline constexpr const char* kLinkNames[] = {"0",
                                             "1",
                                             "2",
                                             "3",
                                             "-1",
                                             "01",
                                             "x",
                                             "99999999999999999999",
                                             "9223372036854775807",
                                             "blocks",
                                             "tensors",
                                             "shards",
                                             "qweight",
                                             "qzeros",
                                             "scales",
                                             "g_idx",
                                             "input_layernorm.weight",
                                             "post_attention_layernorm.weight",
                                             "self_attn.q_proj",
                                             "self_attn.q_proj.bias",
                                             "mlp.down_proj",
                                             "model.embed_tokens.weight",
                                             "lm_head.weight",
                                             "model.norm.weight",
                                             "complete",
                                             " ",
                                             ".."};

inline constexpr const char* kExternalFiles[] = {"shard-00000.h5",    "model.h5", "missing.h5", "",
                                                 "../shard-00000.h5", "/"};

// ---------------------------------------------------------------------------------------------------------
// HDF5 handles (closed on scope exit; an edit that fails is skipped)

using File = io::FileHandle;
using Object = io::Handle<H5Oclose>;
using Dataset = io::DatasetHandle;
using Space = io::SpaceHandle;
using Type = io::TypeHandle;
using Plist = io::PlistHandle;
using Attr = io::AttrHandle;

// ---------------------------------------------------------------------------------------------------------
// What is in the file: every link (hard links followed into groups), with its kind and the type of its object

struct Link {
  std::string path;  // absolute, "/" for the root
  H5L_type_t type = H5L_TYPE_HARD;
  H5O_type_t object = H5O_TYPE_UNKNOWN;  // for hard links
};

std::vector<Link> links_of(hid_t file) {
  std::vector<Link> links = {{"/", H5L_TYPE_HARD, H5O_TYPE_GROUP}};
  auto visit = [](hid_t loc, const char* name, const H5L_info_t* info, void* data) -> herr_t {
    auto& out = *static_cast<std::vector<Link>*>(data);
    Link l{std::string("/") + name, info->type, H5O_TYPE_UNKNOWN};
    H5O_info_t oi;
    if (info->type == H5L_TYPE_HARD && H5Oget_info_by_name2(loc, name, &oi, H5O_INFO_BASIC, H5P_DEFAULT) >= 0)
      l.object = oi.type;
    out.push_back(std::move(l));
    return out.size() < 256 ? 0 : 1;
  };
  H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, visit, &links);
  H5Eclear2(H5E_DEFAULT);
  return links;
}

std::vector<const Link*> of_kind(const std::vector<Link>& links, H5O_type_t object) {
  std::vector<const Link*> out;
  for (const auto& l : links)
    if (l.type == H5L_TYPE_HARD && l.object == object) out.push_back(&l);
  return out;
}

std::string parent_of(const std::string& path) {
  const auto at = path.rfind('/');
  return at == 0 ? "/" : path.substr(0, at);
}
std::string base_of(const std::string& path) { return path.substr(path.rfind('/') + 1); }
std::string child(const std::string& group, const std::string& name) {
  return group == "/" ? "/" + name : group + "/" + name;
}

// ---------------------------------------------------------------------------------------------------------
// Types, spaces and values

// IEEE half and bfloat16 as the shard writes them (float types shrunk to 16 bits).
hid_t half_type(bool bfloat) {
  const hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  if (bfloat)
    H5Tset_fields(t, 15, 7, 8, 0, 7);
  else
    H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_size(t, 2);
  H5Tset_precision(t, 16);
  H5Tset_offset(t, 0);
  H5Tset_ebias(t, bfloat ? 127 : 15);
  return t;
}

// A new datatype handle of the kind the script picks.
hid_t make_type(Script& s) {
  switch (s.pick(17)) {
    case 0:
      return H5Tcopy(H5T_STD_I8LE);
    case 1:
      return H5Tcopy(H5T_STD_U8LE);
    case 2:
      return H5Tcopy(H5T_STD_I32LE);
    case 3:
      return H5Tcopy(H5T_STD_U32LE);
    case 4:
      return H5Tcopy(H5T_STD_I64LE);
    case 5:
      return H5Tcopy(H5T_STD_U64LE);
    case 6:
      return H5Tcopy(H5T_IEEE_F32LE);
    case 7:
      return H5Tcopy(H5T_IEEE_F64LE);
    case 8:
      return half_type(false);
    case 9:
      return half_type(true);
    case 10: {
      const hid_t t = H5Tcopy(H5T_C_S1);
      H5Tset_size(t, H5T_VARIABLE);
      H5Tset_cset(t, H5T_CSET_UTF8);
      return t;
    }
    case 11: {
      const hid_t t = H5Tcopy(H5T_C_S1);
      H5Tset_size(t, 1 + s.pick(40));
      return t;
    }
    case 12:
      return H5Tcopy(H5T_STD_I32BE);
    case 13:
      return H5Tcopy(H5T_IEEE_F64BE);
    case 14: {
      const hid_t t = H5Tcreate(H5T_COMPOUND, 12);
      H5Tinsert(t, "a", 0, H5T_STD_I32LE);
      H5Tinsert(t, "b", 4, H5T_IEEE_F64LE);
      return t;
    }
    case 15: {
      const hsize_t two = 2;
      return H5Tarray_create2(H5T_STD_I32LE, 1, &two);
    }
    default:
      return H5Tcreate(H5T_OPAQUE, 1 + s.pick(8));
  }
}

// Scalar mostly; sometimes a short list or the null space.
hid_t make_attr_space(Script& s) {
  const uint8_t k = s.u8();
  if (k < 200) return H5Screate(H5S_SCALAR);
  if (k < 240) {
    const hsize_t n = k % 4;
    return H5Screate_simple(1, &n, nullptr);
  }
  return H5Screate(H5S_NULL);
}

// A dimension: small mostly, sometimes one of the sizes that overflow a careless product.
hsize_t make_dim(Script& s) {
  static constexpr hsize_t kDims[] = {0,
                                      1,
                                      2,
                                      3,
                                      4,
                                      5,
                                      7,
                                      8,
                                      15,
                                      16,
                                      17,
                                      31,
                                      32,
                                      33,
                                      48,
                                      63,
                                      64,
                                      1u << 20,
                                      hsize_t{1} << 31,
                                      hsize_t{1} << 32,
                                      hsize_t{1} << 40,
                                      hsize_t{1} << 62};
  const uint8_t k = s.u8();
  if (k < 128) return k % 34;
  return kDims[k % (sizeof kDims / sizeof kDims[0])];
}

// Bytes for `count` elements of `type`: from the script, or an interesting value repeated. Variable-length strings
// get pointers into `strings`.
std::vector<char> make_values(Script& s, hid_t type, size_t count, std::vector<std::string>& strings,
                              std::vector<const char*>& pointers) {
  const size_t width = H5Tget_size(type);
  std::vector<char> out(width * count, 0);
  if (H5Tis_variable_str(type) > 0) {
    strings.clear();
    pointers.clear();
    for (size_t i = 0; i < count; ++i) strings.push_back(s.text(48));
    for (const auto& str : strings) pointers.push_back(str.c_str());
    out.assign(reinterpret_cast<const char*>(pointers.data()),
               reinterpret_cast<const char*>(pointers.data() + pointers.size()));
    return out;
  }
  const uint8_t mode = s.u8() % 4;
  for (size_t i = 0; i < count; ++i) {
    char* e = out.data() + i * width;
    if (mode == 0 && H5Tget_class(type) == H5T_FLOAT && width == 8) {
      const double d = s.pick_from(kInterestingDoubles);
      std::memcpy(e, &d, 8);
    } else if (mode == 1 && H5Tget_class(type) == H5T_INTEGER && width <= 8) {
      const int64_t v = s.pick_from(kInterestingInts);
      std::memcpy(e, &v, width);  // little-endian: the low bytes
    } else {
      for (size_t b = 0; b < width; ++b) e[b] = static_cast<char>(s.u8());
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Edits

void replace_attr(hid_t obj, const std::string& name, hid_t type, hid_t space, const void* value) {
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  Attr a(H5Acreate2(obj, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT));
  if (a.ok() && value) H5Awrite(a.get(), type, value);
}

std::string attr_name(Script& s, hid_t obj) {
  H5O_info_t info;
  if (s.u8() % 3 == 0 && H5Oget_info2(obj, &info, H5O_INFO_NUM_ATTRS) >= 0 && info.num_attrs > 0) {
    char name[256] = "";
    H5Aget_name_by_idx(obj, ".", H5_INDEX_NAME, H5_ITER_INC, s.pick(info.num_attrs), name, sizeof name, H5P_DEFAULT);
    return name;
  }
  return s.pick_from(kAttrNames);
}

const Link* pick_link(Script& s, const std::vector<const Link*>& links) {
  return links.empty() ? nullptr : links[s.pick(links.size())];
}

void edit_delete_attr(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  const auto datasets = of_kind(links, H5O_TYPE_DATASET);
  if (s.u8() & 1) l = pick_link(s, datasets);
  if (!l) return;
  Object obj(H5Oopen(file, l->path.c_str(), H5P_DEFAULT));
  if (obj.ok()) H5Adelete(obj.get(), attr_name(s, obj.get()).c_str());
}

void edit_set_attr(Script& s, hid_t file, const std::vector<Link>& links) {
  auto objects = of_kind(links, H5O_TYPE_GROUP);
  for (const Link* d : of_kind(links, H5O_TYPE_DATASET)) objects.push_back(d);
  const Link* l = pick_link(s, objects);
  if (!l) return;
  Object obj(H5Oopen(file, l->path.c_str(), H5P_DEFAULT));
  if (!obj.ok()) return;
  const std::string name = attr_name(s, obj.get());
  Type type(make_type(s));
  Space space(make_attr_space(s));
  if (!type.ok() || !space.ok()) return;
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  std::vector<std::string> strings;
  std::vector<const char*> pointers;
  const std::vector<char> v =
      make_values(s, type.get(), static_cast<size_t>(std::max<hssize_t>(n, 0)), strings, pointers);
  replace_attr(obj.get(), name, type.get(), space.get(), n > 0 ? v.data() : nullptr);
}

// A scalar numeric attribute set to an interesting value in one of the types the writer uses.
void edit_set_number(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!l) return;
  Object obj(H5Oopen(file, l->path.c_str(), H5P_DEFAULT));
  if (!obj.ok()) return;
  const std::string name = attr_name(s, obj.get());
  Space space(H5Screate(H5S_SCALAR));
  const int64_t v = s.pick_from(kInterestingInts);
  switch (s.pick(4)) {
    case 0: {
      const auto w = static_cast<int32_t>(v);
      replace_attr(obj.get(), name, H5T_STD_I32LE, space.get(), &w);
      break;
    }
    case 1:
      replace_attr(obj.get(), name, H5T_STD_I64LE, space.get(), &v);
      break;
    case 2: {
      const auto w = static_cast<uint32_t>(v);
      replace_attr(obj.get(), name, H5T_STD_U32LE, space.get(), &w);
      break;
    }
    default: {
      const double d = s.pick_from(kInterestingDoubles);
      replace_attr(obj.get(), name, H5T_IEEE_F64LE, space.get(), &d);
    }
  }
}

void edit_delete_link(Script& s, hid_t file, const std::vector<Link>& links) {
  if (links.size() < 2) return;
  H5Ldelete(file, links[1 + s.pick(links.size() - 1)].path.c_str(), H5P_DEFAULT);
}

// Raw bytes of a whole dataset as stored (its file type), if it is small; empty when it cannot be read.
std::vector<char> read_raw(hid_t d, hid_t type, hssize_t count) {
  const size_t width = H5Tget_size(type);
  if (count <= 0 || width == 0 || static_cast<size_t>(count) * width > (size_t{1} << 20) ||
      H5Tis_variable_str(type) > 0 || H5Tdetect_class(type, H5T_VLEN) > 0)
    return {};
  std::vector<char> out(static_cast<size_t>(count) * width);
  if (H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0) return {};
  return out;
}

// A dataset at `path` (deleting what is there) of the given type and shape, holding `values` (cycled) when it is
// small. Large shapes are created without storage (allocated late, never written), or chunked.
void create_dataset(Script& s, hid_t file, const std::string& path, hid_t type, const std::vector<hsize_t>& dims,
                    const std::vector<char>& values) {
  H5Ldelete(file, path.c_str(), H5P_DEFAULT);
  Space space(dims.empty() ? H5Screate(H5S_SCALAR)
                           : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
  if (!space.ok()) return;
  const hssize_t count = H5Sget_simple_extent_npoints(space.get());
  const size_t width = H5Tget_size(type);
  const bool small = count >= 0 && static_cast<double>(count) * static_cast<double>(width) <= double(1 << 20);
  Plist dcpl(H5Pcreate(H5P_DATASET_CREATE));
  const uint8_t layout = s.u8() % 8;
  if (layout == 0 && !dims.empty()) {  // chunked, maybe compressed
    std::vector<hsize_t> chunk(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) chunk[i] = std::max<hsize_t>(1, std::min<hsize_t>(dims[i], 8));
    H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data());
    if (s.u8() & 1) H5Pset_deflate(dcpl.get(), 6);
  } else if (layout == 1 && small && count * static_cast<hssize_t>(width) < 8000) {
    H5Pset_layout(dcpl.get(), H5D_COMPACT);
  } else {
    H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS);
  }
  if (!small) H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_LATE);
  Dataset d(H5Dcreate2(file, path.c_str(), type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT));
  if (!d.ok() || !small || count == 0 || values.empty() || H5Tis_variable_str(type) > 0) return;
  std::vector<char> buf(static_cast<size_t>(count) * width);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = values[i % values.size()];
  H5Dwrite(d.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data());
}

// A dataset replaced by one of a new type and shape (at an existing dataset's place, or a new name in a group).
void edit_replace_dataset(Script& s, hid_t file, const std::vector<Link>& links) {
  std::string path;
  if (s.u8() % 4 == 0) {
    const Link* g = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
    if (!g) return;
    path = child(g->path, s.pick_from(kLinkNames));
  } else {
    const Link* d = pick_link(s, of_kind(links, H5O_TYPE_DATASET));
    if (!d) return;
    path = d->path;
  }
  Type type(make_type(s));
  if (!type.ok()) return;
  std::vector<hsize_t> dims(s.pick(4));
  for (auto& d : dims) d = make_dim(s);
  hsize_t count = 1;
  for (hsize_t d : dims) count = d > 0 && count > (hsize_t{1} << 40) / d ? (hsize_t{1} << 40) : count * d;
  if (H5Tis_variable_str(type.get()) > 0) {
    // vlen strings are written from pointers: at most a few, from the script
    if (count > 16) return;
    std::vector<std::string> strings;
    std::vector<const char*> pointers;
    make_values(s, type.get(), static_cast<size_t>(count), strings, pointers);
    H5Ldelete(file, path.c_str(), H5P_DEFAULT);
    Space space(dims.empty() ? H5Screate(H5S_SCALAR)
                             : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr));
    Dataset d(H5Dcreate2(file, path.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    if (d.ok() && count > 0) H5Dwrite(d.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, pointers.data());
    return;
  }
  std::vector<char> values;
  for (size_t i = 0, n = s.pick(64) + 1; i < n; ++i) values.push_back(static_cast<char>(s.u8()));
  create_dataset(s, file, path, type.get(), dims, values);
}

// Some bytes of a small dataset overwritten (values, codes, g_idx entries), its checksum left as it was.
void edit_overwrite_bytes(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_DATASET));
  if (!l) return;
  Dataset d(H5Dopen2(file, l->path.c_str(), H5P_DEFAULT));
  Type type(d.ok() ? H5Dget_type(d.get()) : -1);
  Space space(d.ok() ? H5Dget_space(d.get()) : -1);
  if (!type.ok() || !space.ok()) return;
  std::vector<char> bytes = read_raw(d.get(), type.get(), H5Sget_simple_extent_npoints(space.get()));
  if (bytes.empty()) return;
  for (size_t k = 0, n = 1 + s.pick(8); k < n; ++k) {
    const size_t at = s.u32() % bytes.size();
    const uint8_t how = s.u8();
    if (how < 64)
      bytes[at] = static_cast<char>(0xff);
    else if (how < 128)
      bytes[at] = 0;
    else
      bytes[at] = static_cast<char>(s.u8());
  }
  H5Dwrite(d.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data());
}

// The checksum attribute of a dataset set to the CRC-32 of its bytes as stored, where the reader looks for it:
// checksum_<name> on the linear's group, or checksum on a dense tensor. Lets edited data pass verify_block.
void edit_fix_checksum(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_DATASET));
  if (!l) return;
  Dataset d(H5Dopen2(file, l->path.c_str(), H5P_DEFAULT));
  Type type(d.ok() ? H5Dget_type(d.get()) : -1);
  Space space(d.ok() ? H5Dget_space(d.get()) : -1);
  if (!type.ok() || !space.ok()) return;
  const hssize_t count = H5Sget_simple_extent_npoints(space.get());
  const std::vector<char> bytes = read_raw(d.get(), type.get(), count);
  if (bytes.empty() && count != 0) return;
  uLong crc = crc32(0L, Z_NULL, 0);
  if (!bytes.empty()) crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size()));
  const auto value = static_cast<uint32_t>(crc);
  Space scalar(H5Screate(H5S_SCALAR));
  const std::string name = base_of(l->path);
  const bool packed = name == "qweight" || name == "qzeros" || name == "scales" || name == "g_idx";
  if (packed) {
    Object parent(H5Oopen(file, parent_of(l->path).c_str(), H5P_DEFAULT));
    if (parent.ok()) replace_attr(parent.get(), "checksum_" + name, H5T_STD_U32LE, scalar.get(), &value);
  } else {
    replace_attr(d.get(), "checksum", H5T_STD_U32LE, scalar.get(), &value);
  }
}

void edit_set_complete(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!l) return;
  Object obj(H5Oopen(file, l->path.c_str(), H5P_DEFAULT));
  if (!obj.ok()) return;
  static constexpr int32_t kValues[] = {1, 0, 2, -1};
  const int32_t v = s.pick_from(kValues);
  Space space(H5Screate(H5S_SCALAR));
  replace_attr(obj.get(), "complete", H5T_STD_I32LE, space.get(), &v);
}

void edit_create_group(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* g = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!g) return;
  io::GroupHandle created(
      H5Gcreate2(file, child(g->path, s.pick_from(kLinkNames)).c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
}

// A soft, hard or external link (valid, dangling, cyclic, or an external link with a value made of script bytes).
void edit_create_link(Script& s, hid_t file, const std::vector<Link>& links) {
  const Link* g = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!g) return;
  const std::string at = child(g->path, s.pick_from(kLinkNames));
  const Link* target = links.empty() ? nullptr : &links[s.pick(links.size())];
  const std::string target_path = target ? target->path : "/";
  H5Ldelete(file, at.c_str(), H5P_DEFAULT);
  switch (s.pick(5)) {
    case 0:
      H5Lcreate_soft(target_path.c_str(), file, at.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      break;
    case 1:
      H5Lcreate_soft("/nowhere", file, at.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      break;
    case 2:
      H5Lcreate_hard(file, target_path.c_str(), file, at.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      break;
    case 3:
      H5Lcreate_external(s.pick_from(kExternalFiles), target_path.c_str(), file, at.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      break;
    default: {
      // an external link's value as HDF5 stores it: a version/flags byte, the file name, the object name (here
      // whatever the script says, NUL-terminated or not). Not empty: libhdf5 1.10 dereferences the first byte of an
      // empty one (H5L__extern_query, from H5Literate and H5Lget_info) and crashes every reader of the group, h5py
      // included; pipequant cannot guard against that.
      const std::string value = std::string(1, '\0') + s.text(64);  // version 0, no flags
      H5Lcreate_ud(file, at.c_str(), H5L_TYPE_EXTERNAL, value.data(), value.size(), H5P_DEFAULT, H5P_DEFAULT);
    }
  }
}

void edit_move_link(Script& s, hid_t file, const std::vector<Link>& links) {
  if (links.size() < 2) return;
  const std::string from = links[1 + s.pick(links.size() - 1)].path;
  const Link* g = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!g) return;
  H5Lmove(file, from.c_str(), file, child(g->path, s.pick_from(kLinkNames)).c_str(), H5P_DEFAULT, H5P_DEFAULT);
}

// The attributes of `from` written again on `to` (values read and written in their own types).
void copy_attributes(hid_t from, hid_t to) {
  H5O_info_t info;
  if (H5Oget_info2(from, &info, H5O_INFO_NUM_ATTRS) < 0) return;
  for (hsize_t i = 0; i < info.num_attrs; ++i) {
    Attr a(H5Aopen_by_idx(from, ".", H5_INDEX_NAME, H5_ITER_INC, i, H5P_DEFAULT, H5P_DEFAULT));
    Type type(a.ok() ? H5Aget_type(a.get()) : -1);
    Space space(a.ok() ? H5Aget_space(a.get()) : -1);
    if (!type.ok() || !space.ok()) continue;
    char name[256] = "";
    H5Aget_name(a.get(), sizeof name, name);
    const hssize_t n = H5Sget_simple_extent_npoints(space.get());
    std::vector<char> value(static_cast<size_t>(std::max<hssize_t>(n, 0)) * H5Tget_size(type.get()));
    if (!value.empty() && H5Aread(a.get(), type.get(), value.data()) < 0) continue;
    Attr b(H5Acreate2(to, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
    if (b.ok() && !value.empty()) H5Awrite(b.get(), type.get(), value.data());
    if (!value.empty() && H5Tdetect_class(type.get(), H5T_VLEN) + H5Tis_variable_str(type.get()) > 0)
      H5Dvlen_reclaim(type.get(), space.get(), H5P_DEFAULT, value.data());
  }
}

// An object copied elsewhere (a linear into another block, a block to a new number, a tensor into a block).
// Libhdf5 1.10's H5Ocopy crashes copying attributes in dense storage that hold variable-length strings (a linear's
// group has 18 attributes), so the objects are copied without attributes and the attributes copied here.
void edit_copy_object(Script& s, hid_t file, const std::vector<Link>& links) {
  if (links.size() < 2) return;
  const std::string from = links[1 + s.pick(links.size() - 1)].path;
  const Link* g = pick_link(s, of_kind(links, H5O_TYPE_GROUP));
  if (!g) return;
  const std::string to = child(g->path, s.pick_from(kLinkNames));
  H5Ldelete(file, to.c_str(), H5P_DEFAULT);
  Plist ocpy(H5Pcreate(H5P_OBJECT_COPY));
  H5Pset_copy_object(ocpy.get(), H5O_COPY_WITHOUT_ATTR_FLAG);
  if (H5Ocopy(file, from.c_str(), file, to.c_str(), ocpy.get(), H5P_DEFAULT) < 0) return;
  // every object of the copy (hard links only, as H5Ocopy made them) gets the attributes of its original
  std::vector<std::string> paths = {"."};
  auto visit = [](hid_t, const char* name, const H5O_info_t*, void* data) -> herr_t {
    if (std::strcmp(name, ".") != 0) static_cast<std::vector<std::string>*>(data)->emplace_back(name);
    return 0;
  };
  {
    Object src(H5Oopen(file, from.c_str(), H5P_DEFAULT));
    if (src.ok()) H5Ovisit2(src.get(), H5_INDEX_NAME, H5_ITER_INC, visit, &paths, H5O_INFO_BASIC);
  }
  for (const std::string& p : paths) {
    Object a(H5Oopen(file, (from + "/" + p).c_str(), H5P_DEFAULT));
    Object b(H5Oopen(file, (to + "/" + p).c_str(), H5P_DEFAULT));
    if (a.ok() && b.ok()) copy_attributes(a.get(), b.get());
  }
}

// A dataset rewritten with the same bytes in another shape (the element count kept, or not), or converted to
// another type with the same shape. Attributes on the dataset are lost, as a re-creation by another tool loses them.
void edit_reshape_or_retype(Script& s, hid_t file, const std::vector<Link>& links, bool retype) {
  const Link* l = pick_link(s, of_kind(links, H5O_TYPE_DATASET));
  if (!l) return;
  std::vector<char> bytes;
  std::vector<hsize_t> dims;
  Type type(-1);
  {
    Dataset d(H5Dopen2(file, l->path.c_str(), H5P_DEFAULT));
    Space space(d.ok() ? H5Dget_space(d.get()) : -1);
    if (!space.ok()) return;
    const int rank = H5Sget_simple_extent_ndims(space.get());
    if (rank < 0 || rank > 8) return;
    dims.resize(static_cast<size_t>(rank));
    H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    const hssize_t count = H5Sget_simple_extent_npoints(space.get());
    if (retype) {
      Type to(make_type(s));
      if (!to.ok() || H5Tis_variable_str(to.get()) > 0 || count <= 0 ||
          static_cast<size_t>(count) * H5Tget_size(to.get()) > (size_t{1} << 20))
        return;
      bytes.resize(static_cast<size_t>(count) * H5Tget_size(to.get()));
      if (H5Dread(d.get(), to.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()) < 0) return;
      type.reset(H5Tcopy(to.get()));
    } else {
      type.reset(H5Dget_type(d.get()));
      bytes = read_raw(d.get(), type.get(), count);
    }
  }
  if (!type.ok()) return;
  if (!retype) {
    const uint8_t how = s.u8() % 4;
    if (how == 0 && !dims.empty()) {  // transposed
      std::reverse(dims.begin(), dims.end());
    } else if (how == 1 && !dims.empty()) {  // one dimension changed
      dims[s.pick(dims.size())] = make_dim(s);
    } else if (how == 2) {  // flattened, or a dimension of 1 added
      if (dims.size() > 1) {
        hsize_t n = 1;
        for (hsize_t d : dims) n *= d;
        dims = {n};
      } else {
        dims.insert(dims.begin(), 1);
      }
    } else if (!dims.empty()) {  // a dimension dropped
      dims.pop_back();
    }
  }
  create_dataset(s, file, l->path, type.get(), dims, bytes);
}

void apply_edit(uint8_t op, Script& s, hid_t file) {
  const std::vector<Link> links = links_of(file);
  switch (op % 14) {
    case 0:
      return edit_delete_attr(s, file, links);
    case 1:
      return edit_set_attr(s, file, links);
    case 2:
      return edit_set_number(s, file, links);
    case 3:
      return edit_delete_link(s, file, links);
    case 4:
      return edit_replace_dataset(s, file, links);
    case 5:
      return edit_overwrite_bytes(s, file, links);
    case 6:
      return edit_fix_checksum(s, file, links);
    case 7:
      return edit_set_complete(s, file, links);
    case 8:
      return edit_create_group(s, file, links);
    case 9:
      return edit_create_link(s, file, links);
    case 10:
      return edit_move_link(s, file, links);
    case 11:
      return edit_copy_object(s, file, links);
    case 12:
      return edit_reshape_or_retype(s, file, links, false);
    default:
      return edit_reshape_or_retype(s, file, links, true);
  }
}

// The fixture's two files, as bytes, and where each input's copy goes.
struct Fixture {
  std::string work;
  std::vector<uint8_t> shard, model;
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::start_mpi();
  const std::string base = fuzz::scratch_dir("shard_edit_base");
  fuzz::write_fixture_output(base);
  Fixture& f = fixture();
  f.shard = fuzz::read_file(base + "/" + fuzz::kShardName);
  f.model = fuzz::read_file(base + "/model.h5");
  f.work = fuzz::scratch_dir("shard_edit");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = fixture();
  const std::string shard = f.work + "/" + fuzz::kShardName;
  const std::string model = f.work + "/model.h5";
  fuzz::write_file(shard, f.shard.data(), f.shard.size());
  fuzz::write_file(model, f.model.data(), f.model.size());
  {
    // each file opened once for all its edits (an open costs a metadata cache of a few MB, most of an input's time)
    File files[2];
    Script s(data, size);
    for (int edits = 0; edits < 24 && !s.done(); ++edits) {
      const uint8_t op = s.u8();
      File& file = files[op >> 7];
      if (!file.ok()) file.reset(H5Fopen((op & 0x80 ? model : shard).c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
      if (!file.ok()) break;
      apply_edit(op & 0x7f, s, file.get());
      H5Eclear2(H5E_DEFAULT);
    }
  }
  fuzz::read_output(f.work);
  return 0;
}
