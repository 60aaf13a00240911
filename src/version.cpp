#include "src/version.hpp"

namespace pipequant {
const char* version() { return PIPEQUANT_VERSION; }
}  // namespace pipequant
