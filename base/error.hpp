#pragma once
// Errors: user-caused problems are exceptions with a message that names the file, the field and what was
// expected; they are caught at the top of the program and turned into one line and a non-zero exit.
// Internal invariants use PQ_ASSERT, which aborts the whole MPI job with file:line, rank and host.

#include <sstream>
#include <stdexcept>
#include <string>

namespace pipequant {

// A problem the user can fix: bad file, bad flag, not enough memory.
class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
// Formats its arguments with operator<< into one string.
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void assertion_failed(const char* expr, const char* file, int line, const std::string& message);
}  // namespace detail

// Throws UserError with the concatenated message.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw UserError(detail::concat(args...));
}

}  // namespace pipequant

// PQ_REQUIRE(cond, parts...): a user-facing check; throws UserError(parts...) when cond is false.
#define PQ_REQUIRE(cond, ...)                 \
  do {                                        \
    if (!(cond)) ::pipequant::fail(__VA_ARGS__); \
  } while (0)

// PQ_ASSERT(cond, parts...): an internal invariant; aborts the whole job with the location.
#define PQ_ASSERT(cond, ...)                                                                       \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::pipequant::detail::assertion_failed(#cond, __FILE__, __LINE__, ::pipequant::detail::concat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
