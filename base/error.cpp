#include "base/error.hpp"

#include "base/abort.hpp"

namespace pipequant::detail {

void assertion_failed(const char* expr, const char* file, int line, const std::string& message) {
  std::string what = concat("internal error: ", expr, " failed at ", file, ":", line);
  if (!message.empty()) what += ": " + message;
  abort_job(what, 3, Failure::kInternal);
}

}  // namespace pipequant::detail
