// Unit test of csrc/include/chunk_policy.h (built and run by tests/test_shared_constants.py).
#include <cstdio>

#include "../../csrc/include/chunk_policy.h"

using eofd::kMaxChunkRows;
using eofd::tiles_per_chunk;

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

int main() {
  // The launcher asks for one chunk over many tiles: capped at kMaxChunkRows rows.
  expect(tiles_per_chunk(4096, 32, 1) == kMaxChunkRows / 32, "one chunk wanted: capped");
  expect(tiles_per_chunk(4096, 32, 0) == kMaxChunkRows / 32, "zero wanted counts as one");
  // Enough chunks wanted: an even split below the cap is kept.
  expect(tiles_per_chunk(100, 32, 10) == 10, "even split kept");
  expect(tiles_per_chunk(101, 32, 10) == 11, "ceil of the split");
  // At least one tile per chunk, also for tiles larger than the cap.
  expect(tiles_per_chunk(3, 32, 100) == 1, "more chunks than tiles");
  expect(tiles_per_chunk(8, 4096, 1) == 1, "a tile larger than the cap");
  // Whatever is asked, no chunk holds more than kMaxChunkRows rows.
  for (long tiles = 1; tiles < 5000; tiles += 37) {
    for (long wanted = 0; wanted < 300; wanted += 7) {
      const long rows = tiles_per_chunk(tiles, 32, wanted) * 32;
      expect(rows <= kMaxChunkRows && rows >= 32, "bound holds");
    }
  }
  static_assert(tiles_per_chunk(64, 32, 1) == 32, "usable in constant expressions");
  std::printf("%s\n", failures == 0 ? "ok" : "failed");
  return failures == 0 ? 0 : 1;
}
