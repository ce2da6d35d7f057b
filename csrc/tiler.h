// Jobs of the tiler: each resamples one rectangle of one resized canvas and writes it to its sink.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "resample.h"

namespace grpo_fast {

// A uint8 RGB image held as horizontal bands of `band_rows` rows (the last may be shorter; one band unless Pillow
// keeps the image in several memory blocks): pixels `pixel_stride` = 3 or 4 bytes apart (RGB first: 4 is Pillow's
// own storage, the 4th byte ignored), rows `row_stride` bytes apart (may be negative).
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

// Where output rows go: rows of a canvas cut into `tile`-px square tiles, `cols` per tile row, each float32 planes
// [3][tile][tile] normalized as (v / 255 - mean) / std, tile (r, c) at planes + (r * cols + c) * 3 * tile * tile
// (`planes` set); or a uint8 [canvas height][canvas width][3] image (`pixels` set, for the Pillow-parity resize).
struct Sink {
  float* planes = nullptr;
  uint8_t* pixels = nullptr;
  int tile = 0;
  int cols = 0;
  float mean[3] = {0, 0, 0};
  float std[3] = {1, 1, 1};
};

// A rectangle [x0, x0 + width) x [y0, y0 + height) of the input resized to a canvas of plan_x.out_size x
// plan_y.out_size, written to `sink` (for tiles, x0 and width are multiples of the tile).
struct Target {
  const AxisPlan* plan_x;
  const AxisPlan* plan_y;
  int x0, y0, width, height;
  Sink sink;
};

// Resample `image` into each target with Pillow's pass order. A horizontal-first job streams the input rows its
// targets need once for all of them (e.g. a band of canvas tiles and the matching band of the thumbnail); a
// vertical-first job has one target.
struct Job {
  const ImageView* image;
  bool vertical_first;
  std::vector<Target> targets;
};

// Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice the width's shrink
// (`vertical_first_rule`); older Pillow always starts horizontally. Measured against Pillow, see tests.
bool vertical_first(int in_w, int in_h, int out_w, int out_h, bool vertical_first_rule);

// Testing hook: false makes later calls use the portable scalar kernels instead of AVX2.
void allow_simd(bool allowed);

// Runs `jobs` on `num_threads` native threads (the caller's included); rethrows the first failure.
void run_jobs(const std::vector<Job>& jobs, int num_threads);

// InternVL's grid choice; candidates by tile count, then cols ascending (transformers' GotOcr2 order).
std::pair<int, int> closest_grid(int width, int height, int tile_size, int min_tiles, int max_tiles);

}  // namespace grpo_fast
