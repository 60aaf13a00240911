#pragma once
// JSON files and texts read the strict way: a key that appears twice in one object is refused (JSON readers differ
// in which of the two they keep; the safetensors library refuses such headers), and a parse error names the file.

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace pipequant::io {

// `text` parsed as JSON; `origin` names it in errors ("FILE", "FILE: header"). Throws UserError.
nlohmann::json parse_json_strict(std::string_view text, const std::string& origin);

// The whole file parsed as above (at most `max_bytes`: a config or an index is small, so a larger file is refused
// before it is read). Throws UserError naming the file.
nlohmann::json read_json_file(const std::string& file, size_t max_bytes = size_t{256} << 20);

}  // namespace pipequant::io
