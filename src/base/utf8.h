#pragma once
// Cutting UTF-8 text to a byte budget without splitting a character: error texts carry data ids,
// which may be any UTF-8, and Python decodes what we send strictly.

#include <cstddef>
#include <string_view>

namespace sidecar {

// The longest prefix of `text` of at most `maxBytes` bytes that ends on a character boundary.
inline std::string_view utf8Prefix(std::string_view text, size_t maxBytes) {
  if (text.size() <= maxBytes) return text;
  size_t bytes = maxBytes;
  while (bytes > 0 && (static_cast<unsigned char>(text[bytes]) & 0xC0) == 0x80) --bytes;
  return text.substr(0, bytes);
}

}  // namespace sidecar
