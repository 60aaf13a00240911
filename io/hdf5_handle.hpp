#pragma once
// Owning handles of HDF5 identifiers: each closes its identifier with the matching H5*close when it goes out of scope,
// so that nothing stays open when an exception unwinds.
#include <hdf5.h>

#include <utility>

namespace pipequant::io {

// Owns one HDF5 identifier and closes it with Close.
template <herr_t (*Close)(hid_t)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  ~Handle() { reset(); }
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, -1)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, -1);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  hid_t release() { return std::exchange(id_, -1); }
  bool ok() const { return id_ >= 0; }
  // closes the identifier held, if any (closing errors have nowhere to go here; close() paths check explicitly), and
  // takes id
  void reset(hid_t id = -1) {
    if (id_ >= 0) Close(id_);
    id_ = id;
  }

 private:
  hid_t id_ = -1;
};

using FileHandle = Handle<H5Fclose>;
using GroupHandle = Handle<H5Gclose>;
using DatasetHandle = Handle<H5Dclose>;
using SpaceHandle = Handle<H5Sclose>;
using TypeHandle = Handle<H5Tclose>;
using PlistHandle = Handle<H5Pclose>;
using AttrHandle = Handle<H5Aclose>;

}  // namespace pipequant::io
