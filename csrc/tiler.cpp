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

// RGB row `y` (interleaved, 3 * sink.width bytes) -> the sink.
void emit_row(const Kernels& kern, const Sink& sink, int y, const uint8_t* rgb) {
  const size_t w = sink.width;
  if (sink.planes != nullptr) {
    kern.normalize_row(rgb, sink.width, sink.mean, sink.std, sink.planes + y * w, w * sink.height);
  } else {
    std::memcpy(sink.pixels + y * w * 3, rgb, w * 3);
  }
}

// Input columns [lo, hi) that the outputs [o0, o0 + n) of `plan` read (windows are monotone in o).
std::pair<int, int> input_span(const AxisPlan& plan, int o0, int n) {
  return {plan.start[o0], plan.start[o0 + n - 1] + plan.count[o0 + n - 1]};
}

// Horizontal pass first (Pillow's default): rows of the horizontally resampled band are made 8 at a time
// straight into a ring of RGB rows, and each output row is one vertical pass over the ring.
// Memory: ring (ksize_y + 16) x 3 x width, strip 24 x input span: independent of the input height.
void run_horizontal_first(const Job& job, const Kernels& kern) {
  const ImageView& im = *job.image;
  const AxisPlan &px = *job.plan_x, &py = *job.plan_y;
  const int w = job.sink.width, h = job.sink.height;
  const auto [sx0, sx1] = input_span(px, job.x0, w);
  const auto [sy0, sy1] = input_span(py, job.y0, h);
  const size_t row_len = static_cast<size_t>(3) * w;
  const int ring_rows = py.ksize + 2 * kStripRows;
  std::vector<uint8_t> strip(static_cast<size_t>(sx1 - sx0) * kStripLanes);
  std::vector<uint8_t> strip_out(static_cast<size_t>(w) * kStripLanes + 8);  // +8: convolve_strip's 32-byte stores
  std::vector<uint8_t> ring(ring_rows * row_len), spare(row_len), out_row(row_len);
  std::vector<const uint8_t*> taps(py.ksize);
  const uint8_t* rows[kStripRows];
  uint8_t* ring_slots[kStripRows];
  int next = sy0;  // first input row not yet resampled horizontally
  for (int y = 0; y < h; ++y) {
    const int lo = py.start[job.y0 + y], n = py.count[job.y0 + y];
    while (next < lo + n) {
      const int g = std::min(kStripRows, sy1 - next);
      for (int r = 0; r < kStripRows; ++r) {
        rows[r] = im.row(next + std::min(r, g - 1)) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
        ring_slots[r] = r < g ? ring.data() + ((next + r) % ring_rows) * row_len : spare.data();
      }
      kern.pack_strip(rows, sx1 - sx0, im.pixel_stride, strip.data());
      kern.convolve_strip(strip.data(), sx0, px, job.x0, w, strip_out.data());
      kern.unpack_strip(strip_out.data(), w, ring_slots);
      next += g;
    }
    for (int j = 0; j < n; ++j) taps[j] = ring.data() + ((lo + j) % ring_rows) * row_len;
    kern.convolve_rows(taps.data(), py.coef.data() + static_cast<size_t>(job.y0 + y) * py.ksize, n, row_len,
                       out_row.data());
    emit_row(kern, job.sink, y, out_row.data());
  }
}

// Vertical pass first (Pillow >= 13 when the height shrinks much more): 8 output rows at a time are resampled
// vertically over the input span (whole pixels, the 4th byte too when there is one), packed into a strip and
// resampled horizontally.
void run_vertical_first(const Job& job, const Kernels& kern) {
  const ImageView& im = *job.image;
  const AxisPlan &px = *job.plan_x, &py = *job.plan_y;
  const int w = job.sink.width, h = job.sink.height;
  const auto [sx0, sx1] = input_span(px, job.x0, w);
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
      const int o = job.y0 + y0 + r;
      for (int j = 0; j < py.count[o]; ++j)
        taps[j] = im.row(py.start[o] + j) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
      uint8_t* dst = vrows.data() + r * span_len;
      kern.convolve_rows(taps.data(), py.coef.data() + static_cast<size_t>(o) * py.ksize, py.count[o], span_len, dst);
      rows[r] = dst;
    }
    for (int r = g; r < kStripRows; ++r) rows[r] = rows[0];
    kern.pack_strip(rows, sx1 - sx0, im.pixel_stride, strip.data());
    kern.convolve_strip(strip.data(), sx0, px, job.x0, w, strip_out.data());
    kern.unpack_strip(strip_out.data(), w, out_slots);
    for (int r = 0; r < g; ++r) emit_row(kern, job.sink, y0 + r, out_slots[r]);
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
          run_vertical_first(jobs[i], kern);
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
