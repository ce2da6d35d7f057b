// The tiler: Pillow-exact BICUBIC resizes of uint8 RGB images, cut into normalized float32 tiles on native threads.
// Callers (module.cpp) check sizes and memory before calling; nothing here touches Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace grpo_fast {

// A uint8 RGB image held as horizontal bands of `band_rows` rows (the last may be shorter; one band unless Pillow
// keeps the image in several memory blocks): pixels `pixel_stride` = 3 or 4 bytes apart (RGB first: 4 is Pillow's
// own storage or an RGBA array's RGB, the 4th byte ignored and never read past a row's last RGB byte), rows
// `row_stride` bytes apart (may be negative).
struct ImageView {
  std::vector<const uint8_t*> bands;  // row 0 of each band
  int band_rows = 0;
  int width = 0;
  int height = 0;
  ptrdiff_t row_stride = 0;
  int pixel_stride = 3;
  const uint8_t* row(int y) const {
    return bands[y / band_rows] + static_cast<ptrdiff_t>(y % band_rows) * row_stride;
  }
};

// One image of a tile batch: `image` resized to a (cols * tile) x (rows * tile) canvas, cut into tiles row-major and
// written to `planes`, float32 [cols * rows (+1 thumbnail)][3][tile][tile]; the thumbnail (the whole image resized
// to tile x tile) when `thumbnail`.
struct TileRequest {
  ImageView image;
  int cols = 1;
  int rows = 1;
  bool thumbnail = false;
  float* planes = nullptr;
};

// The kernel paths, narrowest first: portable scalar code, AVX2, AVX-512 (F, BW, VL). Every path gives the same
// bytes and floats.
enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest path this CPU and OS support (detected once).
Isa supported_isa();

// The path later calls run: the supported one, or narrower after `limit_isa` (a testing hook, for all threads).
Isa active_isa();
void limit_isa(Isa isa);

// Pillow-exact BICUBIC resize of `image` to uint8 [height][width][3] at `pixels`, on the calling thread.
// `vertical_first_rule`: Pillow >= 13's pass order (vertical first when the height shrinks much more).
void resize(const ImageView& image, int width, int height, bool vertical_first_rule, uint8_t* pixels);

// Tiles every request, normalized as (v / 255 - mean) / std, on `num_threads` native threads (the caller's
// included); rethrows the first failure. Sizes were checked by the caller (cols * tile and rows * tile < 2**26).
void tile_batch(const std::vector<TileRequest>& requests, int tile_size, const float mean[3], const float std[3],
                bool vertical_first_rule, int num_threads);

// InternVL's grid choice; candidates by tile count, then cols ascending (transformers' GotOcr2 order).
std::pair<int, int> closest_grid(int width, int height, int tile_size, int min_tiles, int max_tiles);

}  // namespace grpo_fast
