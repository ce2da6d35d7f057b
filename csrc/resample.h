// Pillow-exact separable 8-bit BICUBIC resampling: coefficients and the row kernels the tiler is built from.
//
// Pillow (src/libImaging/Resample.c) resizes an 8-bit image in two passes. Per axis it computes, for every
// output index, a window [start, start + count) of input indices and bicubic weights (a = -0.5; support
// 2 * max(1, in/out), i.e. antialiased when shrinking) in double, normalizes them to sum 1 and rounds them to
// fixed point with PRECISION_BITS = 22. Each pass accumulates in int32 from 1 << 21 (rounding) and clips
// `acc >> 22` to uint8, so the first pass's output is rounded to uint8 before the second pass reads it. We
// reproduce that arithmetic bit for bit; only the loop order differs (for speed), never a sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace grpo_fast {

constexpr int kPrecisionBits = 22;
// A strip holds 8 rows side by side so that a horizontal pass vectorizes across rows: [x][row 8][channel 3].
constexpr int kStripRows = 8;
constexpr int kStripLanes = kStripRows * 3;

// One axis of a resize: output index o reads inputs [start[o], start[o] + count[o]) with coef[o * ksize + j].
struct AxisPlan {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  std::vector<int> start, count;
  std::vector<int32_t> coef;  // [out_size, ksize], fixed point 1 << 22 == 1.0
  // For 16-bit multiply-adds (vpmaddwd, the AVX-512 horizontal pass): each k as the int16 words (k >> 8, k & 255),
  // and per output 128 * sum(k) + rounding, see avx512::convolve_strip.
  std::vector<uint32_t> coef_words;  // [out_size, ksize]
  std::vector<int32_t> bias;         // [out_size]
};

// k == 256 * (k >> 8) + (k & 255): both words fit an int16 for |k| < 2**23. Pillow's normalized coefficients lie in
// [-0.125, 1.125] * 2**22: the extremes are the first output of a large upscale, whose cut window holds the weights
// 0.5625 and -0.0625 (sum 0.5).
inline uint32_t split_words(int32_t k) {
  return static_cast<uint16_t>(k >> 8) | static_cast<uint32_t>(k & 255) << 16;
}

inline double bicubic(double x) {
  // Keys' cubic convolution with a = -0.5, written in Pillow's operation order (bit-identical doubles).
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline AxisPlan make_plan(int in_size, int out_size) {
  AxisPlan p;
  p.in_size = in_size;
  p.out_size = out_size;
  // Pillow takes the box as float: (double)(in1 - in0) with in0 = 0.f, in1 = (float)in_size.
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  p.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  p.start.resize(out_size);
  p.count.resize(out_size);
  p.coef.assign(static_cast<size_t>(out_size) * p.ksize, 0);
  std::vector<double> w(p.ksize);
  for (int o = 0; o < out_size; ++o) {
    const double center = (o + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int n = std::min(static_cast<int>(center + support + 0.5), in_size) - lo;
    double ww = 0.0;
    for (int j = 0; j < n; ++j) {
      w[j] = bicubic((j + lo - center + 0.5) * ss);
      ww += w[j];
    }
    for (int j = 0; j < n; ++j) {
      const double k = ww != 0.0 ? w[j] / ww : w[j];
      p.coef[static_cast<size_t>(o) * p.ksize + j] =
          static_cast<int32_t>(k < 0 ? -0.5 + k * (1 << kPrecisionBits) : 0.5 + k * (1 << kPrecisionBits));
    }
    p.start[o] = lo;
    p.count[o] = n;
  }
  p.coef_words.resize(p.coef.size());
  std::transform(p.coef.begin(), p.coef.end(), p.coef_words.begin(), split_words);
  p.bias.resize(out_size);
  for (int o = 0; o < out_size; ++o) {
    const int32_t* k = p.coef.data() + static_cast<size_t>(o) * p.ksize;
    p.bias[o] = 128 * std::accumulate(k, k + p.count[o], 0) + (1 << (kPrecisionBits - 1));
  }
  return p;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Scalar kernels: the portable path and the definition the AVX2 kernels (kernels_avx2.cpp) must equal.
namespace scalar {

// Vertical-style pass: dst[i] = clip8(sum_j rows[j][i] * k[j]) for i < len; vectorizes across i.
inline void convolve_rows(const uint8_t* const* rows, const int32_t* k, int n, size_t len, uint8_t* dst) {
  constexpr size_t kChunk = 32;  // 4 AVX2 int32 accumulators stay in registers across the taps
  size_t i0 = 0;
  for (; i0 + kChunk <= len; i0 += kChunk) {
    int32_t acc[kChunk];
    for (size_t i = 0; i < kChunk; ++i) acc[i] = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < n; ++j) {
      const uint8_t* s = rows[j] + i0;
      const int32_t kj = k[j];
      for (size_t i = 0; i < kChunk; ++i) acc[i] += s[i] * kj;
    }
    for (size_t i = 0; i < kChunk; ++i) dst[i0 + i] = clip8(acc[i]);
  }
  for (; i0 < len; ++i0) {
    int32_t acc = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < n; ++j) acc += rows[j][i0] * k[j];
    dst[i0] = clip8(acc);
  }
}

// Horizontal pass over a strip whose pixel 0 is input x = x0: outputs [o0, o0 + n_out) -> out [n_out][8][3]
// (`out` has 8 bytes of padding: the AVX2 kernel stores 32 bytes per output).
inline void convolve_strip(const uint8_t* strip, int x0, const AxisPlan& plan, int o0, int n_out, uint8_t* out) {
  for (int o = 0; o < n_out; ++o) {
    const int32_t* k = plan.coef.data() + static_cast<size_t>(o0 + o) * plan.ksize;
    const uint8_t* s = strip + static_cast<size_t>(plan.start[o0 + o] - x0) * kStripLanes;
    const int n = plan.count[o0 + o];
    int32_t acc[kStripLanes];
    for (int i = 0; i < kStripLanes; ++i) acc[i] = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < n; ++j) {
      const int32_t kj = k[j];
      for (int i = 0; i < kStripLanes; ++i) acc[i] += s[j * kStripLanes + i] * kj;
    }
    for (int i = 0; i < kStripLanes; ++i) out[o * kStripLanes + i] = clip8(acc[i]);
  }
}

// Packs pixels [0, n) of 8 rows (RGB first in each pixel, pixels `pixel_stride` = 3 or 4 bytes apart) into a
// strip [n][8][3]; nothing past the last pixel's RGB bytes is read.
inline void pack_strip(const uint8_t* const* rows, int n, int pixel_stride, uint8_t* strip) {
  for (int x = 0; x < n; ++x)
    for (int r = 0; r < kStripRows; ++r) std::memcpy(strip + x * kStripLanes + r * 3, rows[r] + x * pixel_stride, 3);
}

// Unpacks a strip [n][8][3] into 8 packed RGB rows (n pixels each).
inline void unpack_strip(const uint8_t* strip, int n, uint8_t* const* rows) {
  for (int x = 0; x < n; ++x)
    for (int r = 0; r < kStripRows; ++r) std::memcpy(rows[r] + x * 3, strip + x * kStripLanes + r * 3, 3);
}

// Channel-planar float32 row from an RGB row: dst[c * plane + x] = (src[3x + c] / 255 - mean[c]) / std[c], the
// same float32 operations as ToTensor + Normalize, so values match torch/numpy bit for bit.
inline void normalize_row(const uint8_t* src, int n, const float* mean, const float* std, float* dst, size_t plane) {
  for (int c = 0; c < 3; ++c)
    for (int x = 0; x < n; ++x) dst[c * plane + x] = (static_cast<float>(src[3 * x + c]) / 255.0f - mean[c]) / std[c];
}
}  // namespace scalar

// AVX2 versions of the hot kernels (kernels_avx2.cpp), same signatures and results.
namespace avx2 {
void pack_strip(const uint8_t* const* rows, int n, int pixel_stride, uint8_t* strip);
void unpack_strip(const uint8_t* strip, int n, uint8_t* const* rows);
void convolve_rows(const uint8_t* const* rows, const int32_t* k, int n, size_t len, uint8_t* dst);
void convolve_strip(const uint8_t* strip, int x0, const AxisPlan& plan, int o0, int n_out, uint8_t* out);
void normalize_row(const uint8_t* src, int n, const float* mean, const float* std, float* dst, size_t plane);
}  // namespace avx2

// AVX-512 versions (kernels_avx512.cpp), same results. Their strip holds 16 rows, and for each pixel and lane
// (row, channel) the int32 of int16 words ((p - 128) << 8, p - 128): kWideStripBytes per pixel, 64-byte aligned
// loads; their convolve_strip writes [n_out][16][3] for their unpack_strip.
constexpr int kWideStripRows = 16;
constexpr int kWideStripLanes = kWideStripRows * 3;
constexpr int kWideStripBytes = kWideStripLanes * 4;
constexpr int kMaxStripRows = kWideStripRows;
namespace avx512 {
void pack_strip(const uint8_t* const* rows, int n, int pixel_stride, uint8_t* strip);
void unpack_strip(const uint8_t* strip, int n, uint8_t* const* rows);
void convolve_rows(const uint8_t* const* rows, const int32_t* k, int n, size_t len, uint8_t* dst);
void convolve_strip(const uint8_t* strip, int x0, const AxisPlan& plan, int o0, int n_out, uint8_t* out);
// Divides with a corrected reciprocal: equal to scalar::normalize_row only where checked (see kernels_avx512.cpp).
void normalize_row(const uint8_t* src, int n, const float* mean, const float* std, float* dst, size_t plane);
}  // namespace avx512

}  // namespace grpo_fast
