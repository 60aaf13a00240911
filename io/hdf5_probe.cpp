// The child-process read of an HDF5 file before pipequant reads it (io/hdf5_probe.hpp says why).
#include "io/hdf5_probe.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/error.hpp"
#include "io/hdf5_handle.hpp"

extern char** environ;

namespace pipequant::io {

namespace {

constexpr const char* kProbeVariable = "PIPEQUANT_INTERNAL_HDF5_PROBE";
constexpr const char* kTimeoutVariable = "PIPEQUANT_HDF5_PROBE_TIMEOUT_S";
constexpr int kTimeoutDefaultS = 300;
// the child's exit status when libhdf5 ran out of the memory the child allows it (a healthy file's metadata needs
// far less): the file is damaged
constexpr int kExitOutOfMemory = 2;
// the most memory the child's reads may take, beyond what the process has mapped at its start
constexpr int64_t kMemoryLimitBytes = int64_t{2} << 30;
// the most elements of one string dataset the child reads (model.h5's /shards has one per stage)
constexpr hssize_t kMaxStrings = 1 << 16;

// ---------------------------------------------------------------------------------------------------------
// The child's reads

// True when HDF5's error stack holds an allocation failure (libhdf5 reports what it could not allocate as a
// resource error); clears the stack.
bool allocation_failed() {
  bool failed = false;
  auto visit = [](unsigned, const H5E_error2_t* err, void* data) -> herr_t {
    if (err && err->maj_num == H5E_RESOURCE) *static_cast<bool*>(data) = true;
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, visit, &failed);
  H5Eclear2(H5E_DEFAULT);
  return failed;
}

struct Walk {
  bool out_of_memory = false;
  void note_failure() { out_of_memory = out_of_memory || allocation_failed(); }
};

TypeHandle variable_string_type() {
  TypeHandle t(H5Tcopy(H5T_C_S1));
  if (t.get() >= 0) H5Tset_size(t.get(), H5T_VARIABLE);
  return t;
}

// A single-valued attribute read as pipequant's readers read one: a vlen or fixed-length string, or a number
// converted to each native type they ask for. Attributes of other shapes are never read by pipequant.
void read_attribute(hid_t attr, Walk& walk) {
  TypeHandle ft(H5Aget_type(attr));
  SpaceHandle space(H5Aget_space(attr));
  if (ft.get() < 0 || space.get() < 0 || H5Sget_simple_extent_npoints(space.get()) != 1) return walk.note_failure();
  const H5T_class_t cls = H5Tget_class(ft.get());
  if (cls == H5T_STRING && H5Tis_variable_str(ft.get()) > 0) {
    TypeHandle mt = variable_string_type();
    char* value = nullptr;
    if (H5Aread(attr, mt.get(), &value) < 0) return walk.note_failure();
    H5Dvlen_reclaim(mt.get(), space.get(), H5P_DEFAULT, &value);
  } else if (cls == H5T_STRING) {
    std::vector<char> value(H5Tget_size(ft.get()));
    if (H5Aread(attr, ft.get(), value.data()) < 0) walk.note_failure();
  } else if (cls == H5T_INTEGER || cls == H5T_FLOAT) {
    int64_t i = 0;
    double d = 0;
    uint32_t u = 0;
    if (H5Aread(attr, H5T_NATIVE_INT64, &i) < 0) walk.note_failure();
    if (H5Aread(attr, H5T_NATIVE_DOUBLE, &d) < 0) walk.note_failure();
    if (H5Aread(attr, H5T_NATIVE_UINT32, &u) < 0) walk.note_failure();
  }
}

void read_attributes(hid_t object, Walk& walk) {
  auto visit = [](hid_t obj, const char* name, const H5A_info_t*, void* data) -> herr_t {
    AttrHandle attr(H5Aopen(obj, name, H5P_DEFAULT));
    if (attr.get() >= 0)
      read_attribute(attr.get(), *static_cast<Walk*>(data));
    else
      static_cast<Walk*>(data)->note_failure();
    return 0;
  };
  hsize_t idx = 0;
  if (H5Aiterate2(object, H5_INDEX_NAME, H5_ITER_INC, &idx, visit, &walk) < 0) walk.note_failure();
}

// A dataset's shape, storage and type as the readers query them; the data of a string dataset (model.h5's
// /shards), one element at a time as read_model_index reads it; one element of a numeric dataset converted as the
// readers convert it (the rest of the data is plain bytes at a stored offset: contiguous layout).
void read_dataset(hid_t dset, Walk& walk) {
  TypeHandle ft(H5Dget_type(dset));
  SpaceHandle fspace(H5Dget_space(dset));
  PlistHandle dcpl(H5Dget_create_plist(dset));
  if (ft.get() < 0 || fspace.get() < 0 || dcpl.get() < 0) return walk.note_failure();
  H5Dget_storage_size(dset);
  H5Dget_offset(dset);
  const hssize_t points = H5Sget_simple_extent_npoints(fspace.get());
  if (points <= 0) return walk.note_failure();
  const int rank = H5Sget_simple_extent_ndims(fspace.get());
  if (rank < 0 || rank > H5S_MAX_RANK) return walk.note_failure();
  const H5T_class_t cls = H5Tget_class(ft.get());
  const bool strings = cls == H5T_STRING && H5Tis_variable_str(ft.get()) > 0;
  if (!strings && cls != H5T_INTEGER && cls != H5T_FLOAT) return;
  SpaceHandle one(H5Screate(H5S_SCALAR));
  const hssize_t count = strings ? std::min(points, kMaxStrings) : 1;
  for (hssize_t e = 0; e < count; ++e) {
    std::vector<hsize_t> start(static_cast<size_t>(rank)), n(static_cast<size_t>(rank), 1);
    if (rank > 0) start[static_cast<size_t>(rank) - 1] = static_cast<hsize_t>(e);  // the strings are a list
    if (rank > 0 && H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, n.data(), nullptr) < 0)
      return walk.note_failure();
    if (strings) {
      TypeHandle mt = variable_string_type();
      char* value = nullptr;
      if (H5Dread(dset, mt.get(), one.get(), fspace.get(), H5P_DEFAULT, &value) < 0) return walk.note_failure();
      H5Dvlen_reclaim(mt.get(), one.get(), H5P_DEFAULT, &value);
    } else {
      std::vector<char> value(std::max<size_t>(H5Tget_size(ft.get()), 8));
      if (H5Dread(dset, ft.get(), one.get(), fspace.get(), H5P_DEFAULT, value.data()) < 0) walk.note_failure();
      if (H5Dread(dset, H5T_NATIVE_INT32, one.get(), fspace.get(), H5P_DEFAULT, value.data()) < 0)
        walk.note_failure();
      if (H5Dread(dset, H5T_NATIVE_FLOAT, one.get(), fspace.get(), H5P_DEFAULT, value.data()) < 0)
        walk.note_failure();
    }
  }
}

// The object a hard link names: its attributes, and a dataset's shape, type and sample data.
void read_object(hid_t loc, const char* name, const H5O_info_t& info, Walk& walk) {
  Handle<H5Oclose> object(H5Oopen(loc, name, H5P_DEFAULT));
  if (object.get() < 0) return walk.note_failure();
  read_attributes(object.get(), walk);
  if (info.type == H5O_TYPE_DATASET) read_dataset(object.get(), walk);
}

// The value of an external link decoded as read_model_index decodes it.
void read_external_link(hid_t group, const char* name, size_t size, Walk& walk) {
  if (size == 0 || size >= (1u << 20)) return walk.note_failure();
  std::vector<char> value(size);
  unsigned flags = 0;
  const char* target_file = nullptr;
  const char* target_object = nullptr;
  if (H5Lget_val(group, name, value.data(), value.size(), H5P_DEFAULT) < 0 ||
      H5Lunpack_elink_val(value.data(), value.size(), &flags, &target_file, &target_object) < 0)
    walk.note_failure();
}

// The link names of a group in name order, listed as the readers list them (a listing that fails part way keeps
// the names it has).
std::vector<std::string> list_links(hid_t group, Walk& walk) {
  std::vector<std::string> names;
  auto collect = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->emplace_back(name);
    return 0;
  };
  hsize_t idx = 0;
  if (H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, &idx, collect, &names) < 0) walk.note_failure();
  return names;
}

constexpr int kMaxDepth = 16;  // pipequant's files nest three groups deep

// Every link of a group and of the groups below it, each listed, looked up and followed as the readers do: a
// failure on one link does not end the walk (a reader may go on to the next block), and each group is walked once
// (hard links may form cycles).
void walk_group(hid_t group, int depth, std::set<haddr_t>& seen, Walk& walk) {
  for (const std::string& name : list_links(group, walk)) {
    H5L_info_t link;
    if (H5Lget_info(group, name.c_str(), &link, H5P_DEFAULT) < 0) {
      walk.note_failure();
      continue;
    }
    if (link.type == H5L_TYPE_EXTERNAL) read_external_link(group, name.c_str(), link.u.val_size, walk);
    if (link.type != H5L_TYPE_HARD) continue;
    H5O_info_t info;
    if (H5Oget_info_by_name2(group, name.c_str(), &info, H5O_INFO_BASIC, H5P_DEFAULT) < 0) {
      walk.note_failure();
      continue;
    }
    read_object(group, name.c_str(), info, walk);
    if (info.type != H5O_TYPE_GROUP || depth >= kMaxDepth || !seen.insert(info.addr).second) continue;
    GroupHandle child(H5Gopen2(group, name.c_str(), H5P_DEFAULT));
    if (child.get() < 0) {
      walk.note_failure();
      continue;
    }
    walk_group(child.get(), depth + 1, seen, walk);
  }
}

// Every read above on the file at path; true when libhdf5 could not allocate what the file asks for.
bool read_metadata(const char* path) {
  Walk walk;
  PlistHandle fapl(H5Pcreate(H5P_FILE_ACCESS));
  H5Pset_file_locking(fapl.get(), true, true);
  FileHandle file(H5Fopen(path, H5F_ACC_RDONLY, fapl.get()));
  if (file.get() < 0) {
    walk.note_failure();
    return walk.out_of_memory;
  }
  read_attributes(file.get(), walk);
  std::set<haddr_t> seen;
  H5O_info_t root;
  if (H5Oget_info2(file.get(), &root, H5O_INFO_BASIC) >= 0) seen.insert(root.addr);
  walk_group(file.get(), 0, seen, walk);
  return walk.out_of_memory;
}

// Caps the child's address space a little above what it has mapped at its start, so that a damaged length makes
// libhdf5's allocation fail instead of taking gigabytes (AddressSanitizer reserves terabytes of address space, so
// there the cap is its own max_allocation_size_mb, set by the parent).
void limit_memory() {
#if defined(__SANITIZE_ADDRESS__)
  return;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return;
#endif
#endif
  std::ifstream status("/proc/self/status");
  std::string line;
  int64_t mapped_kib = 0;
  while (std::getline(status, line))
    if (line.rfind("VmSize:", 0) == 0) mapped_kib = std::strtoll(line.c_str() + 7, nullptr, 10);
  const rlim_t limit = static_cast<rlim_t>(mapped_kib * 1024 + kMemoryLimitBytes);
  const rlimit r{limit, limit};
  setrlimit(RLIMIT_AS, &r);
}

// Runs in every process of an executable that links this file, before main: in the child started by
// require_hdf5_file_survives it reads the file and exits, in every other process it returns at once.
[[gnu::constructor]] void run_probe_when_asked() {
  const char* path = std::getenv(kProbeVariable);
  if (path == nullptr) return;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  limit_memory();
  int status = 0;
  try {
    status = read_metadata(path) ? kExitOutOfMemory : 0;
  } catch (const std::bad_alloc&) {
    status = kExitOutOfMemory;
  }
  std::fflush(nullptr);
  _exit(status);
}

// ---------------------------------------------------------------------------------------------------------
// The parent

int probe_timeout_s() {
  const char* v = std::getenv(kTimeoutVariable);
  const int s = v ? std::atoi(v) : 0;
  return s > 0 ? s : kTimeoutDefaultS;
}

// This process's environment with the probe's variable, and the child's allocator set to fill every allocation
// with a non-zero byte (glibc's perturb with its per-thread cache off; AddressSanitizer's fill, which covers only
// the first 4 KiB by default): libhdf5 frees or follows uninitialized table entries when a damaged count promises
// more entries than the file holds, and a fresh process's zeroed pages would hide that where the reading process's
// reused memory crashes. AddressSanitizer builds also get an allocation cap that fails instead of aborting and the
// crash signals left to the system (later ASAN_OPTIONS entries win): a crash the child exists to take ends it by
// its signal, as in other builds, without a sanitizer report.
std::vector<std::string> child_environment(const std::string& path) {
  std::vector<std::string> env;
  std::string asan = "ASAN_OPTIONS=";
  std::string tunables = "GLIBC_TUNABLES=";
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    if (entry.rfind(asan, 0) == 0)
      asan = entry + ":";
    else if (entry.rfind(tunables, 0) == 0)
      tunables = entry + ":";
    else if (entry.rfind(std::string(kProbeVariable) + "=", 0) != 0)
      env.push_back(entry);
  }
  env.push_back(asan +
                "allocator_may_return_null=1:max_allocation_size_mb=1024:detect_leaks=0:max_malloc_fill_size=" +
                std::to_string(kMemoryLimitBytes) + ":handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_sigill=0");
  env.push_back(tunables + "glibc.malloc.perturb=190:glibc.malloc.tcache_count=0");
  env.push_back(std::string(kProbeVariable) + "=" + path);
  return env;
}

// Starts this executable as the probe child of path, its output thrown away; -1 where it cannot be started.
pid_t start_child(const std::string& path) {
  std::vector<std::string> env = child_environment(path);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  char name[] = "pipequant-hdf5-probe";
  char* argv[] = {name, nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  for (int fd : {0, 1, 2}) posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0);
  // the child dies of the signals libhdf5 raises whatever this process does with them, and is not stopped by a
  // signal this process blocks
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int s : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL, SIGTERM, SIGINT, SIGPIPE}) sigaddset(&defaults, s);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &actions, &attr, argv, envp.data());
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

// The child's wait status, or nothing when it ran past timeout_s (it is then killed) or cannot be waited for.
std::optional<int> wait_for_child(pid_t pid, int timeout_s, bool& timed_out) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  auto pause = std::chrono::milliseconds(1);
  timed_out = false;
  for (;;) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return std::nullopt;
    if (Clock::now() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      timed_out = true;
      return std::nullopt;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

// The signals a crash of libhdf5 raises (a fault, an abort from a failed check); not a stop or a kill from outside.
bool crash_signal(int sig) {
  return sig == SIGSEGV || sig == SIGBUS || sig == SIGABRT || sig == SIGFPE || sig == SIGILL || sig == SIGSYS ||
         sig == SIGTRAP;
}

}  // namespace

void require_hdf5_file_survives(const std::string& path) {
  const pid_t pid = start_child(path);
  if (pid < 0) {
    static bool warned = false;
    if (!warned)
      std::fprintf(stderr, "warning: cannot start a process to check %s before reading it (%s); reading unchecked\n",
                   path.c_str(), std::strerror(errno));
    warned = true;
    return;
  }
  const int timeout_s = probe_timeout_s();
  bool timed_out = false;
  const std::optional<int> status = wait_for_child(pid, timeout_s, timed_out);
  PQ_REQUIRE(!timed_out, path, ": damaged: reading its HDF5 metadata did not finish within ", timeout_s, " s");
  if (!status) return;  // reaped elsewhere: nothing known about the file
  // a stop from outside (SIGTERM to the job's process group, which holds the child too) says nothing of the file:
  // this process is being stopped as well and its stop handling takes over
  if (WIFSIGNALED(*status) && !crash_signal(WTERMSIG(*status))) return;
  PQ_REQUIRE(!WIFSIGNALED(*status), path, ": damaged: libhdf5 crashes reading its metadata (",
             strsignal(WTERMSIG(*status)), ")");
  PQ_REQUIRE(WEXITSTATUS(*status) != kExitOutOfMemory, path,
             ": damaged: reading its HDF5 metadata needs more memory than any pipequant output's does");
  PQ_REQUIRE(WEXITSTATUS(*status) == 0, path, ": damaged: libhdf5 fails reading its metadata (the check ended with "
             "status ", WEXITSTATUS(*status), ")");
}

}  // namespace pipequant::io
