#include "io/json.hpp"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <vector>

#include "base/error.hpp"

namespace pipequant::io {

using json = nlohmann::json;

constexpr int kMaxJsonDepth = 64;

json parse_json_strict(std::string_view text, const std::string& origin) {
  std::vector<std::set<std::string>> keys;  // the keys seen so far in each object being parsed, innermost last
  std::string duplicate;
  bool found = false;
  const json::parser_callback_t note_keys = [&](int depth, json::parse_event_t event, json& parsed) {
    // deeper documents would overflow the stack of the recursive copies and dumps that follow; no config needs them
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth)
      fail(origin, ": nested deeper than ", kMaxJsonDepth, " levels");
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.empty() && !keys.back().insert(parsed.get<std::string>()).second &&
        !found) {
      found = true;
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), note_keys);
  } catch (const json::exception& e) {
    fail(origin, ": not valid JSON (", e.what(), ")");
  }
  PQ_REQUIRE(!found, origin, ": key \"", duplicate,
             "\" appears twice in one object (readers differ in which one they keep; refused)");
  return j;
}

json read_json_file(const std::string& file, size_t max_bytes) {
  std::error_code ec;
  PQ_REQUIRE(std::filesystem::is_regular_file(file, ec), file, ": not found or not a regular file");
  const auto size = std::filesystem::file_size(file, ec);
  PQ_REQUIRE(!ec, file, ": cannot read its size: ", ec.message());
  PQ_REQUIRE(size <= max_bytes, file, ": ", size, " bytes, more than the ", max_bytes,
             " a JSON file of a checkpoint may have");
  std::ifstream in(file, std::ios::binary);
  PQ_REQUIRE(in.good(), file, ": cannot open: ", std::strerror(errno));
  std::string text(static_cast<size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  PQ_REQUIRE(in.gcount() == static_cast<std::streamsize>(size), file, ": cannot read its ", size, " bytes");
  return parse_json_strict(text, file);
}

}  // namespace pipequant::io
