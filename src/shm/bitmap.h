// Word-scanning bitmap primitives for the slab allocator. Owner-thread only (plain words).
//
// Convention: bit i of a bitmap is word i/64, bit i%64; 1 = used, 0 = free. A bitmap of `bits`
// bits occupies wordsFor(bits) words and its padding bits (>= bits in the last word) are kept
// set, so scans never need a length mask.
//
// Cost: every scan visits whole 64-bit words and uses ctz/clz (one instruction each on x86-64
// with BMI), so a first-fit search over a 2 MiB slab of 4 KiB units is 8 word reads.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace sidecar::shm::bitmap {

inline constexpr size_t kNoBit = SIZE_MAX;
inline constexpr uint64_t kAllUsed = ~uint64_t{0};

constexpr size_t wordsFor(size_t bits) noexcept { return (bits + 63) / 64; }

// All bits free, padding bits set.
inline void resetFree(uint64_t* words, size_t bits) noexcept {
  size_t n = wordsFor(bits);
  std::fill(words, words + n, 0);
  if (bits % 64) words[n - 1] = kAllUsed << (bits % 64);
}

// Mask of bits [lo, hi) within one word, 0 <= lo < hi <= 64.
constexpr uint64_t rangeMask(unsigned lo, unsigned hi) noexcept {
  uint64_t upper = hi == 64 ? kAllUsed : ((uint64_t{1} << hi) - 1);
  return upper & (kAllUsed << lo);
}

// Calls f(wordIndex, mask) for each word touched by bits [start, start + n), n > 0.
template <class F>
inline void forEachWord(size_t start, size_t n, F&& f) {
  size_t end = start + n;
  size_t w = start / 64;
  size_t lastW = (end - 1) / 64;
  unsigned lo = static_cast<unsigned>(start % 64);
  if (w == lastW) {
    f(w, rangeMask(lo, static_cast<unsigned>(end - lastW * 64)));
    return;
  }
  f(w, rangeMask(lo, 64));
  for (++w; w < lastW; ++w) f(w, kAllUsed);
  f(lastW, rangeMask(0, static_cast<unsigned>(end - lastW * 64)));
}

inline void setRange(uint64_t* words, size_t start, size_t n) noexcept {
  forEachWord(start, n, [&](size_t w, uint64_t m) { words[w] |= m; });
}
inline void clearRange(uint64_t* words, size_t start, size_t n) noexcept {
  forEachWord(start, n, [&](size_t w, uint64_t m) { words[w] &= ~m; });
}
inline bool allSet(const uint64_t* words, size_t start, size_t n) noexcept {
  bool all = true;
  forEachWord(start, n, [&](size_t w, uint64_t m) { all = all && (words[w] & m) == m; });
  return all;
}

// First free bit at or after word `firstWord`, or kNoBit.
inline size_t findFirstFree(const uint64_t* words, size_t wordCount, size_t firstWord) noexcept {
  for (size_t w = firstWord; w < wordCount; ++w) {
    if (words[w] != kAllUsed) return w * 64 + static_cast<size_t>(std::countr_one(words[w]));
  }
  return kNoBit;
}

// Last free bit, or kNoBit.
inline size_t findLastFree(const uint64_t* words, size_t wordCount) noexcept {
  for (size_t w = wordCount; w-- > 0;) {
    if (words[w] != kAllUsed) return w * 64 + 63 - static_cast<size_t>(std::countl_one(words[w]));
  }
  return kNoBit;
}

// First-fit: the lowest start of `n` (> 0) consecutive free bits at or after word `firstWord`,
// or kNoBit. A run may cross any number of words. Per word: one compare for full/empty words;
// otherwise ctz + clz, plus log2(n) shift-ands to find a run inside the word when n < 64.
inline size_t findFreeRun(const uint64_t* words, size_t wordCount, size_t n,
                          size_t firstWord) noexcept {
  if (n == 1) return findFirstFree(words, wordCount, firstWord);
  size_t runStart = 0;
  size_t runLen = 0;
  for (size_t w = firstWord; w < wordCount; ++w) {
    uint64_t used = words[w];
    if (used == 0) {
      if (runLen == 0) runStart = w * 64;
      runLen += 64;
      if (runLen >= n) return runStart;
      continue;
    }
    if (used == kAllUsed) {
      runLen = 0;
      continue;
    }
    size_t low = static_cast<size_t>(std::countr_zero(used));  // free bits continuing the run
    if (runLen + low >= n) return runLen ? runStart : w * 64;
    if (n < 64) {
      // Bit p of y survives iff bits p .. p+len-1 of the free mask are all free.
      uint64_t y = ~used;
      size_t len = 1;
      while (len < n && y) {
        size_t s = std::min(len, n - len);
        y &= y >> s;
        len += s;
      }
      if (y) return w * 64 + static_cast<size_t>(std::countr_zero(y));
    }
    size_t high = static_cast<size_t>(std::countl_zero(used));  // free bits starting a new run
    runLen = high;
    runStart = w * 64 + 64 - high;
  }
  return kNoBit;
}

// Number of free bits (padding excluded: padding bits are set).
inline size_t countFree(const uint64_t* words, size_t wordCount) noexcept {
  size_t used = 0;
  for (size_t w = 0; w < wordCount; ++w) used += static_cast<size_t>(std::popcount(words[w]));
  return wordCount * 64 - used;
}

// Length of the longest run of free bits. O(wordCount).
inline size_t largestFreeRun(const uint64_t* words, size_t wordCount) noexcept {
  size_t best = 0;
  size_t run = 0;
  for (size_t w = 0; w < wordCount; ++w) {
    uint64_t used = words[w];
    if (used == 0) {
      run += 64;
      continue;
    }
    run += static_cast<size_t>(std::countr_zero(used));
    best = std::max(best, run);
    // Longest free run strictly inside the word: walk its free segments.
    uint64_t freeBits = ~used;
    while (freeBits) {
      unsigned start = static_cast<unsigned>(std::countr_zero(freeBits));
      uint64_t shifted = freeBits >> start;
      unsigned len = static_cast<unsigned>(std::countr_one(shifted));
      best = std::max<size_t>(best, len);
      if (start + len >= 64) break;
      freeBits &= ~rangeMask(start, start + len);
    }
    run = static_cast<size_t>(std::countl_zero(used));
  }
  return std::max(best, run);
}

}  // namespace sidecar::shm::bitmap
