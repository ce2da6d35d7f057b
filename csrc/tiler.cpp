// The tiler's engine: jobs, each resampling rectangles of resized canvases into sinks, run on a pool of threads;
// `resize` and `tile_batch` plan the jobs of one call.
#include "tiler.h"

#include <algorithm>
#include <atomic>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>

#include "parallel.h"
#include "resample.h"

namespace grpo_fast {
namespace {

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

// The hot kernels of one ISA path, picked once per call. Its strips hold `strip_rows` rows (up to kMaxStripRows),
// `strip_bytes` per pixel as its pack_strip writes and its convolve_strip reads; its convolve_strip writes
// [n_out][strip_rows][3] bytes for its unpack_strip.
struct Kernels {
  int strip_rows;
  int strip_bytes;
  decltype(&scalar::pack_strip) pack_strip;
  decltype(&scalar::unpack_strip) unpack_strip;
  decltype(&scalar::convolve_rows) convolve_rows;
  decltype(&scalar::convolve_strip) convolve_strip;
  decltype(&scalar::normalize_row) normalize_row;
};

// The widest path this CPU and OS support: cpuid for the instructions, xgetbv for the OS saving the registers
// (ymm for AVX2; ymm, zmm and the mask registers for AVX-512).
Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE) || !(ecx & bit_AVX)) return Isa::kScalar;
  uint32_t xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  constexpr uint32_t kYmmState = 0x6, kZmmState = 0xe6;  // XCR0: SSE|AVX; + opmask|ZMM_Hi256|Hi16_ZMM
  if ((xcr0_lo & kYmmState) != kYmmState || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(ebx & bit_AVX2))
    return Isa::kScalar;
  constexpr unsigned kAvx512 = bit_AVX512F | bit_AVX512BW | bit_AVX512VL;
  if ((xcr0_lo & kZmmState) == kZmmState && (ebx & kAvx512) == kAvx512) return Isa::kAvx512;
  return Isa::kAvx2;
#else
  return Isa::kScalar;
#endif
}

const Isa best_isa = detect_isa();
std::atomic<Isa> isa_limit{best_isa};

// Whether `normalize` gives scalar::normalize_row's floats for every byte value of every channel with this mean and
// std: a row of the 256 gray levels holds them all.
bool normalize_matches_scalar(decltype(&scalar::normalize_row) normalize, const float mean[3], const float std[3]) {
  uint8_t gray[256 * 3];
  for (int v = 0; v < 256; ++v) gray[3 * v] = gray[3 * v + 1] = gray[3 * v + 2] = static_cast<uint8_t>(v);
  float got[3 * 256], want[3 * 256];
  normalize(gray, 256, mean, std, got, 256);
  scalar::normalize_row(gray, 256, mean, std, want, 256);
  return std::memcmp(got, want, sizeof(got)) == 0;
}

// The kernels of the active path; `mean` and `std` (null for uint8 output) pick AVX-512's normalize where it gives
// exactly the divisions' floats, else AVX2's.
Kernels pick_kernels(const float* mean, const float* std) {
  switch (active_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case Isa::kAvx512: {
      const bool fast_normalize = mean != nullptr && normalize_matches_scalar(avx512::normalize_row, mean, std);
      return {kWideStripRows,         kWideStripBytes,       avx512::pack_strip,
              avx512::unpack_strip,   avx512::convolve_rows, avx512::convolve_strip,
              fast_normalize ? avx512::normalize_row : avx2::normalize_row};
    }
    case Isa::kAvx2:
      return {kStripRows,         kStripLanes,          avx2::pack_strip,   avx2::unpack_strip,
              avx2::convolve_rows, avx2::convolve_strip, avx2::normalize_row};
#endif
    default:
      return {kStripRows,            kStripLanes,            scalar::pack_strip,   scalar::unpack_strip,
              scalar::convolve_rows, scalar::convolve_strip, scalar::normalize_row};
  }
}

// A strip of `pixels` pixels for `kern`, 64-byte aligned: the AVX-512 strip's 64-byte loads (192 bytes per pixel)
// then never split a cache line.
struct Strip {
  Strip(const Strip&) = delete;
  Strip(int pixels, const Kernels& kern)
      : bytes(static_cast<size_t>(pixels) * kern.strip_bytes + 63),
        data(bytes.data() + (-reinterpret_cast<uintptr_t>(bytes.data()) & 63)) {}
  std::vector<uint8_t> bytes;
  uint8_t* data;
};

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
  int x = 0;  // next output column of the strip being resampled
};

// A strip is packed and resampled this many bytes at a time in a window of the strip that stays in cache (an AVX-512
// strip of a whole 4000-pixel span would take 750 KiB).
constexpr int kStripChunkBytes = 24 << 10;

// Horizontal pass first (Pillow's default): the input rows all targets read are packed once into strips (8 rows; 16
// on AVX-512) over the union of their column spans; each target resamples the strip horizontally into its ring,
// then makes every output row whose vertical window the ring now holds. The strip is packed a chunk of columns at a
// time into a window that slides along the span, each target resampling the outputs whose windows the chunk
// completes.
// Memory: per target a ring of (ksize_y + 2 x strip rows) rows of 3 x width bytes, and a strip window of 24 KiB plus
// the widest tap window (24 bytes per pixel; AVX-512: 192): independent of the input size.
void run_horizontal_first(const Job& job, const Kernels& kern) {
  const ImageView& im = *job.image;
  int sx0 = im.width, sx1 = 0, sy0 = im.height, sy1 = 0;
  std::vector<HorizontalState> states;
  for (const Target& t : job.targets) {
    const auto [x0, x1] = input_span(*t.plan_x, t.x0, t.width);
    const auto [y0, y1] = input_span(*t.plan_y, t.y0, t.height);
    sx0 = std::min(sx0, x0), sx1 = std::max(sx1, x1), sy0 = std::min(sy0, y0), sy1 = std::max(sy1, y1);
    const size_t row_len = static_cast<size_t>(3) * t.width;
    const int ring_rows = t.plan_y->ksize + 2 * kern.strip_rows;
    states.push_back({&t, y0, y1, row_len, ring_rows,
                      std::vector<uint8_t>(static_cast<size_t>(t.width) * 3 * kern.strip_rows + 8),  // +8: AVX2 stores
                      std::vector<uint8_t>(ring_rows * row_len), std::vector<uint8_t>(row_len),
                      std::vector<uint8_t>(row_len)});
  }
  // A window of the strip: a chunk of columns beyond the widest tap window, so that every pack adds a chunk.
  int max_taps = 0;
  for (const Target& t : job.targets) max_taps = std::max(max_taps, t.plan_x->ksize);
  const int strip_pixels = std::min(sx1 - sx0, max_taps + std::max(1, kStripChunkBytes / kern.strip_bytes));
  Strip strip(strip_pixels, kern);
  std::vector<const uint8_t*> taps;
  const int strip_rows = kern.strip_rows;
  const uint8_t* rows[kMaxStripRows];
  uint8_t* ring_slots[kMaxStripRows];
  for (int next = sy0; next < sy1; next += strip_rows) {
    const int g = std::min(strip_rows, sy1 - next);
    for (int r = 0; r < strip_rows; ++r)
      rows[r] = im.row(next + std::min(r, g - 1)) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
    // The strip holds columns [base, packed): pack a chunk, let every target resample the outputs whose windows it
    // completes, then move the columns still needed to the front.
    int base = sx0, packed = sx0;
    for (HorizontalState& st : states) st.x = st.target->x0;
    while (true) {
      const int end = std::min(sx1, base + strip_pixels);
      const uint8_t* chunk_rows[kMaxStripRows];
      for (int r = 0; r < strip_rows; ++r)
        chunk_rows[r] = rows[r] + static_cast<ptrdiff_t>(packed - sx0) * im.pixel_stride;
      kern.pack_strip(chunk_rows, end - packed, im.pixel_stride,
                      strip.data + static_cast<size_t>(packed - base) * kern.strip_bytes);
      packed = end;
      int needed = packed;  // the first column an output still to make reads
      for (HorizontalState& st : states) {
        const Target& t = *st.target;
        if (next + g <= st.sy0 || next >= st.sy1) continue;  // none of its rows
        const AxisPlan& px = *t.plan_x;
        int o = st.x;
        while (o < t.x0 + t.width && px.start[o] + px.count[o] <= packed) ++o;
        kern.convolve_strip(strip.data, base, px, st.x, o - st.x,
                            st.strip_out.data() + static_cast<size_t>(st.x - t.x0) * 3 * strip_rows);
        st.x = o;
        if (o < t.x0 + t.width) needed = std::min(needed, px.start[o]);
      }
      if (needed == packed) break;  // every output made
      std::memmove(strip.data, strip.data + static_cast<size_t>(needed - base) * kern.strip_bytes,
                   static_cast<size_t>(packed - needed) * kern.strip_bytes);
      base = needed;
    }
    for (HorizontalState& st : states) {
      const Target& t = *st.target;
      if (next + g <= st.sy0 || next >= st.sy1) continue;
      for (int r = 0; r < strip_rows; ++r)
        ring_slots[r] = r < g ? st.ring.data() + ((next + r) % st.ring_rows) * st.row_len : st.spare.data();
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

// Vertical pass first (Pillow >= 13 when the height shrinks much more): a strip's rows of output at a time are
// resampled vertically over the input span (whole pixels, the 4th byte too when there is one, but the last pixel's
// RGB only), packed into a strip and resampled horizontally.
void run_vertical_first(const Target& t, const ImageView& im, const Kernels& kern) {
  const AxisPlan &px = *t.plan_x, &py = *t.plan_y;
  const int w = t.width, h = t.height;
  const auto [sx0, sx1] = input_span(px, t.x0, w);
  const size_t span_len = static_cast<size_t>(im.pixel_stride) * (sx1 - sx0 - 1) + 3;
  const size_t row_len = static_cast<size_t>(3) * w;
  const int strip_rows = kern.strip_rows;
  std::vector<uint8_t> vrows(strip_rows * span_len);
  Strip strip(sx1 - sx0, kern);
  std::vector<uint8_t> strip_out(static_cast<size_t>(w) * 3 * strip_rows + 8), out_rows(strip_rows * row_len);
  std::vector<const uint8_t*> taps(py.ksize);
  const uint8_t* rows[kMaxStripRows];
  uint8_t* out_slots[kMaxStripRows];
  for (int r = 0; r < strip_rows; ++r) out_slots[r] = out_rows.data() + r * row_len;
  for (int y0 = 0; y0 < h; y0 += strip_rows) {
    const int g = std::min(strip_rows, h - y0);
    for (int r = 0; r < g; ++r) {
      const int o = t.y0 + y0 + r;
      for (int j = 0; j < py.count[o]; ++j)
        taps[j] = im.row(py.start[o] + j) + static_cast<ptrdiff_t>(sx0) * im.pixel_stride;
      uint8_t* dst = vrows.data() + r * span_len;
      kern.convolve_rows(taps.data(), py.coef.data() + static_cast<size_t>(o) * py.ksize, py.count[o], span_len, dst);
      rows[r] = dst;
    }
    for (int r = g; r < strip_rows; ++r) rows[r] = rows[0];
    kern.pack_strip(rows, sx1 - sx0, im.pixel_stride, strip.data);
    kern.convolve_strip(strip.data, sx0, px, t.x0, w, strip_out.data());
    kern.unpack_strip(strip_out.data(), w, out_slots);
    for (int r = 0; r < g; ++r) emit_row(kern, t, t.y0 + y0 + r, out_slots[r]);
  }
}

// Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice the width's shrink
// (`vertical_first_rule`); older Pillow always starts horizontally. Measured against Pillow, see tests.
bool vertical_first(int in_w, int in_h, int out_w, int out_h, bool vertical_first_rule) {
  return vertical_first_rule && out_h < in_h &&
         static_cast<int64_t>(in_h) - out_h > 2 * (static_cast<int64_t>(in_w) - out_w);
}

// Runs `jobs` with `kern` on `num_threads` native threads (the caller's included); rethrows the first failure.
void run_jobs(const std::vector<Job>& jobs, const Kernels& kern, int num_threads) {
  std::exception_ptr failure;
  std::mutex failure_mutex;
  std::atomic<bool> failed{false};
  parallel_for(static_cast<int64_t>(jobs.size()), num_threads, [&](int64_t i) {
    if (failed) return;  // after a failure the remaining jobs are skipped
    try {
      if (jobs[i].vertical_first)
        for (const Target& t : jobs[i].targets) run_vertical_first(t, *jobs[i].image, kern);
      else
        run_horizontal_first(jobs[i], kern);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      failed = true;
    }
  });
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

Isa supported_isa() { return best_isa; }

Isa active_isa() { return std::min(isa_limit.load(), best_isa); }

void limit_isa(Isa isa) { isa_limit = isa; }

void resize(const ImageView& image, int width, int height, bool vertical_first_rule, uint8_t* pixels) {
  const AxisPlan px = make_plan(image.width, width), py = make_plan(image.height, height);
  Sink sink;
  sink.pixels = pixels;
  const Job job{&image, vertical_first(image.width, image.height, width, height, vertical_first_rule),
                {Target{&px, &py, 0, 0, width, height, sink}}};
  run_jobs({job}, pick_kernels(nullptr, nullptr), 1);
}

void tile_batch(const std::vector<TileRequest>& requests, int tile_size, const float mean[3], const float std[3],
                bool vertical_first_rule, int num_threads) {
  // Plans per image: [0] canvas x, [1] canvas y, [2] thumbnail x, [3] thumbnail y. unique_ptr keeps addresses.
  std::vector<std::unique_ptr<AxisPlan[]>> plans(requests.size());
  std::vector<Job> jobs;
  // Horizontal-first canvases run as bands of tile rows (each with its share of the thumbnail, so the input is read
  // once); tile rows are split further when there are fewer of them than threads, into bands of >= 1 canvas row.
  long long tile_rows = 0;
  for (const TileRequest& r : requests) tile_rows += r.rows;
  const int splits = static_cast<int>(
      std::clamp((num_threads + tile_rows - 1) / std::max(1LL, tile_rows), 1LL, static_cast<long long>(tile_size)));
  const size_t tile_floats = static_cast<size_t>(3) * tile_size * tile_size;
  for (size_t i = 0; i < requests.size(); ++i) {
    const TileRequest& r = requests[i];
    const ImageView& v = r.image;
    const int cols = r.cols, rows = r.rows;
    const long long n_grid = static_cast<long long>(cols) * rows;
    plans[i].reset(new AxisPlan[4]);
    AxisPlan* p = plans[i].get();
    p[0] = make_plan(v.width, cols * tile_size);
    p[1] = make_plan(v.height, rows * tile_size);
    if (r.thumbnail) {
      p[2] = make_plan(v.width, tile_size);
      p[3] = make_plan(v.height, tile_size);
    }
    Sink canvas_sink, thumb_sink;
    for (Sink* sink : {&canvas_sink, &thumb_sink}) {
      sink->tile = tile_size;
      for (int c = 0; c < 3; ++c) sink->mean[c] = mean[c], sink->std[c] = std[c];
    }
    canvas_sink.planes = r.planes;
    canvas_sink.cols = cols;
    thumb_sink.planes = r.planes + n_grid * tile_floats;
    thumb_sink.cols = 1;
    const bool canvas_vf = vertical_first(v.width, v.height, cols * tile_size, rows * tile_size, vertical_first_rule);
    const bool thumb_vf = vertical_first(v.width, v.height, tile_size, tile_size, vertical_first_rule);
    const bool thumb_in_bands = r.thumbnail && !canvas_vf && !thumb_vf;
    if (canvas_vf) {
      for (long long t = 0; t < n_grid; ++t) {
        const int x0 = static_cast<int>(t % cols) * tile_size, y0 = static_cast<int>(t / cols) * tile_size;
        jobs.push_back(Job{&v, true, {Target{&p[0], &p[1], x0, y0, tile_size, tile_size, canvas_sink}}});
      }
    } else {
      const int bands = rows * splits, canvas_h = rows * tile_size;
      for (int b = 0; b < bands; ++b) {
        const int y0 = static_cast<int>(static_cast<long long>(b) * canvas_h / bands);
        const int y1 = static_cast<int>(static_cast<long long>(b + 1) * canvas_h / bands);
        Job job{&v, false, {Target{&p[0], &p[1], 0, y0, cols * tile_size, y1 - y0, canvas_sink}}};
        if (thumb_in_bands && y0 / rows < y1 / rows)  // thumbnail rows [y0 / rows, y1 / rows): the same image band
          job.targets.push_back(Target{&p[2], &p[3], 0, y0 / rows, tile_size, y1 / rows - y0 / rows, thumb_sink});
        jobs.push_back(std::move(job));
      }
    }
    if (r.thumbnail && !thumb_in_bands)
      jobs.push_back(Job{&v, thumb_vf, {Target{&p[2], &p[3], 0, 0, tile_size, tile_size, thumb_sink}}});
  }
  run_jobs(jobs, pick_kernels(mean, std), num_threads);
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
