#pragma once
namespace pipequant {
const char* version();
}  // namespace pipequant
