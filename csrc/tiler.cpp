#include "tiler.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>

namespace grpo_fast {
namespace {

// The hot kernels, picked once per call: AVX2 where the CPU has it, else the scalar definitions.
struct Kernels {
  decltype(&scalar::pack_strip) pack_strip;
  decltype(&scalar::unpack_strip) unpack_strip;
  decltype(&scalar::convolve_rows) convolve_rows;
  decltype(&scalar::convolve_strip) convolve_strip;
  decltype(&scalar::normalize_row) normalize_row;
};

std::atomic<bool> simd_allowed{true};

Kernels pick_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd_allowed && __builtin_cpu_supports("avx2"))
    return {avx2::pack_strip, avx2::unpack_strip, avx2::convolve_rows, avx2::convolve_strip, avx2::normalize_row};
#endif
  return {scalar::pack_strip,    scalar::unpack_strip,   scalar::convolve_rows,
          scalar::convolve_strip, scalar::normalize_row};
}

// Canvas row `y`, columns [t.x0, t.x0 + t.width) as interleaved RGB -> the target's sink.
void emit_row(const Kernels& kern, const Target& t, int y, const uint8_t* rgb) {
  const Sink& sink = t.sink;
  if (sink.pixels != nullptr) {
    std::memcpy(sink.pixels + (static_cast<size_t>(y) * t.plan_x->out_size + t.x0) * 3, rgb, t.width * 3);
    return;
  }
  const size_t plane = static_cast<size_t>(sink.tile) * sink.tile;
  for (int c = t.x0 / sink.tile; c < (t.x0 + t.width) / sink.tile; ++c) {
    float* tile = sink.planes + (static_cast<size_t>(y / sink.tile) * sink.cols + c) * 3 * plane;
    kern.normalize_row(rgb + static_cast<size_t>(c * sink.tile - t.x0) * 3, sink.tile, sink.mean, sink.std,
                       tile + static_cast<size_t>(y % sink.tile) * sink.tile, plane);
  }
}

// Input columns [lo, hi) that the outputs [o0, o0 + n) of `plan` read (windows are monotone in o).
std::pair<int, int> input_span(const AxisPlan& plan, int o0, int n) {
  return {plan.start[o0], plan.start[o0 + n - 1] + plan.count[o0 + n - 1]};
}

// A target of a horizontal-first job: its horizontally resampled rows, made 8 at a time straight into a ring of
// RGB rows, and the next output row to make from the ring by a vertical pass.
struct HorizontalState {
  const Target* target;
  int sy0, sy1;  // input rows it reads
  size_t row_len;
  int ring_rows;
  std::vector<uint8_t> strip_out, ring, spare, out_row;
  int y = 0;  // next output row of the rectangle
};

// Horizontal pass first (Pillow's default): the input rows all targets read are packed once into strips of 8 rows
// over the union of their column spans; each target resamples the strip horizontally into its ring, then makes
// every output row whose vertical window the ring now holds.
// Memory: per target a ring of (ksize_y + 16) rows of 3 x width bytes, and a strip of 24 x input span bytes:
// independent of the input height.
void run_horizontal_first(const Job& job, const Kernels& kern) {
  const ImageView& im = *job.image;
  int sx0 = im.width, sx1 = 0, sy0 = im.height, sy1 = 0;
  std::vector<HorizontalState> states;
  for (const Target& t : job.targets) {
    const auto [x0, x1] = input_span(*t.plan_x, t.x0, t.width);
    const auto [y0, y1] = input_span(*t.plan_y, t.y0, t.height);
    sx0 = std::min(sx0, x0), sx1 = std::max(sx1, x1), sy0 = std::min(sy0, y0), sy1 = std::max(sy1, y1);
    const size_t row_len = static_cast<size_t>(3) * t.width;
    const int ring_rows = t.plan_y->ksize + 2 * kStripRows;
    states.push_back({&t, y0, y1, row_len, ring_rows,
                      std::vector<uint8_t>(static_cast<size_t>(t.width) * kStripLanes + 8),  // +8: 32-byte stores
                      std::vector<uint8_t>(ring_rows * row_len), std::vector<uint8_t>(row_len),
                      std::vector<uint8_t>(row_len)});
  }
  std::vector<uint8_t> strip(static_cast<size_t>(sx1 - sx0) * kStripLanes);
  std::vector<const uint8_t*> taps;
  const uint8_t* rows[kStripRows];
  uint8_t* ring_slots[kStripRows];
  for (int next = sy0; next < sy1; next += kStripRows) {
    const int g = std::min(kStripRows, sy1 - next);
    for (int r = 0; r < kStripRows; ++r)
      rows[r] = im.row(next + std::min(r, g - 1)) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
    kern.pack_strip(rows, sx1 - sx0, im.pixel_stride, strip.data());
    for (HorizontalState& st : states) {
      const Target& t = *st.target;
      if (next + g <= st.sy0 || next >= st.sy1) continue;  // none of its rows
      for (int r = 0; r < kStripRows; ++r)
        ring_slots[r] = r < g ? st.ring.data() + ((next + r) % st.ring_rows) * st.row_len : st.spare.data();
      kern.convolve_strip(strip.data(), sx0, *t.plan_x, t.x0, t.width, st.strip_out.data());
      kern.unpack_strip(st.strip_out.data(), t.width, ring_slots);
      for (; st.y < t.height; ++st.y) {
        const int o = t.y0 + st.y, lo = t.plan_y->start[o], n = t.plan_y->count[o];
        if (lo + n > next + g) break;  // its window is not complete yet
        taps.resize(n);
        for (int j = 0; j < n; ++j) taps[j] = st.ring.data() + ((lo + j) % st.ring_rows) * st.row_len;
        kern.convolve_rows(taps.data(), t.plan_y->coef.data() + static_cast<size_t>(o) * t.plan_y->ksize, n,
                           st.row_len, st.out_row.data());
        emit_row(kern, t, o, st.out_row.data());
      }
    }
  }
}

// Vertical pass first (Pillow >= 13 when the height shrinks much more): 8 output rows at a time are resampled
// vertically over the input span (whole pixels, the 4th byte too when there is one), packed into a strip and
// resampled horizontally.
void run_vertical_first(const Target& t, const ImageView& im, const Kernels& kern) {
  const AxisPlan &px = *t.plan_x, &py = *t.plan_y;
  const int w = t.width, h = t.height;
  const auto [sx0, sx1] = input_span(px, t.x0, w);
  const size_t span_len = static_cast<size_t>(im.pixel_stride) * (sx1 - sx0), row_len = static_cast<size_t>(3) * w;
  std::vector<uint8_t> vrows(kStripRows * span_len);
  std::vector<uint8_t> strip(static_cast<size_t>(sx1 - sx0) * kStripLanes);
  std::vector<uint8_t> strip_out(static_cast<size_t>(w) * kStripLanes + 8), out_rows(kStripRows * row_len);
  std::vector<const uint8_t*> taps(py.ksize);
  const uint8_t* rows[kStripRows];
  uint8_t* out_slots[kStripRows];
  for (int r = 0; r < kStripRows; ++r) out_slots[r] = out_rows.data() + r * row_len;
  for (int y0 = 0; y0 < h; y0 += kStripRows) {
    const int g = std::min(kStripRows, h - y0);
    for (int r = 0; r < g; ++r) {
      const int o = t.y0 + y0 + r;
      for (int j = 0; j < py.count[o]; ++j)
        taps[j] = im.row(py.start[o] + j) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
      uint8_t* dst = vrows.data() + r * span_len;
      kern.convolve_rows(taps.data(), py.coef.data() + static_cast<size_t>(o) * py.ksize, py.count[o], span_len, dst);
      rows[r] = dst;
    }
    for (int r = g; r < kStripRows; ++r) rows[r] = rows[0];
    kern.pack_strip(rows, sx1 - sx0, im.pixel_stride, strip.data());
    kern.convolve_strip(strip.data(), sx0, px, t.x0, w, strip_out.data());
    kern.unpack_strip(strip_out.data(), w, out_slots);
    for (int r = 0; r < g; ++r) emit_row(kern, t, t.y0 + y0 + r, out_slots[r]);
  }
}

}  // namespace

void allow_simd(bool allowed) { simd_allowed = allowed; }

bool vertical_first(int in_w, int in_h, int out_w, int out_h, bool vertical_first_rule) {
  return vertical_first_rule && out_h < in_h &&
         static_cast<int64_t>(in_h) - out_h > 2 * (static_cast<int64_t>(in_w) - out_w);
}

void run_jobs(const std::vector<Job>& jobs, int num_threads) {
  const Kernels kern = pick_kernels();
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto worker = [&] {
    for (size_t i = next++; i < jobs.size(); i = next++) {
      try {
        if (jobs[i].vertical_first)
          for (const Target& t : jobs[i].targets) run_vertical_first(t, *jobs[i].image, kern);
        else
          run_horizontal_first(jobs[i], kern);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next = jobs.size();
      }
    }
  };
  const int extra = std::max(0, std::min<int>(num_threads, static_cast<int>(jobs.size())) - 1);
  std::vector<std::thread> threads;
  threads.reserve(extra);
  for (int t = 0; t < extra; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  if (failure) std::rethrow_exception(failure);
}

std::pair<int, int> closest_grid(int width, int height, int tile_size, int min_tiles, int max_tiles) {
  const double aspect = static_cast<double>(width) / height;
  const double area = static_cast<double>(width) * height;
  const double tile_area = static_cast<double>(tile_size) * tile_size;
  std::pair<int, int> best{1, 1};
  double best_diff = std::numeric_limits<double>::infinity();
  for (int count = min_tiles; count <= max_tiles; ++count) {
    for (int cols = 1; cols <= count; ++cols) {
      if (count % cols != 0) continue;
      const int rows = count / cols;
      const double diff = std::abs(aspect - static_cast<double>(cols) / rows);
      if (diff < best_diff) {
        best_diff = diff;
        best = {cols, rows};
      } else if (diff == best_diff && area > 0.5 * tile_area * cols * rows) {
        best = {cols, rows};
      }
    }
  }
  return best;
}

}  // namespace grpo_fast
