// AVX2 versions of the hot kernels in resample.h: the same int32 sums, 8 lanes at a time (built for AVX2 and
// called only where the CPU has it, see tiler.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "resample.h"
#include "transpose_avx2.h"

namespace grpo_fast::avx2 {
namespace {

using x86::load24_as_dwords;
using x86::store_dwords_as24;
using x86::transpose8x8;

GRPO_FAST_AVX2 inline __m256i load8_epi32(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// clip8 of 4 x 8 accumulators -> 32 bytes in order: >> 22, then saturating packs (== clamp to [0, 255]).
GRPO_FAST_AVX2 inline __m256i clip8_x32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i p01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, kPrecisionBits), _mm256_srai_epi32(a1, kPrecisionBits));
  const __m256i p23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, kPrecisionBits), _mm256_srai_epi32(a3, kPrecisionBits));
  // packs/packus work per 128-bit lane: dwords come out as a0 a1 a2 a3 (low halves), then the high halves.
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

// Both directions are an 8x8 transpose of pixels (one dword each): 8 pixels of 8 rows <-> 8 rows of 8 pixels.
GRPO_FAST_AVX2 void pack_strip(const uint8_t* const* rows, int n, int pixel_stride, uint8_t* strip) {
  __m256i v[8];
  // 4-byte pixels load 32 bytes per 8: the last pixel is left to the scalar tail, so its 4th byte (past the row's
  // last RGB byte, maybe past the buffer) is never read.
  const int simd_n = pixel_stride == 4 ? n - 1 : n;
  int x = 0;
  for (; x + 8 <= simd_n; x += 8) {
    for (int r = 0; r < kStripRows; ++r)
      v[r] = pixel_stride == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + 4 * x))
                               : load24_as_dwords(rows[r] + 3 * x);
    transpose8x8(v);
    for (int p = 0; p < 8; ++p) store_dwords_as24(v[p], strip + (x + p) * kStripLanes);
  }
  const uint8_t* tail[kStripRows];
  for (int r = 0; r < kStripRows; ++r) tail[r] = rows[r] + x * pixel_stride;
  scalar::pack_strip(tail, n - x, pixel_stride, strip + x * kStripLanes);
}

GRPO_FAST_AVX2 void unpack_strip(const uint8_t* strip, int n, uint8_t* const* rows) {
  __m256i v[8];
  int x = 0;
  for (; x + 8 <= n; x += 8) {
    for (int p = 0; p < 8; ++p) v[p] = load24_as_dwords(strip + (x + p) * kStripLanes);
    transpose8x8(v);
    for (int r = 0; r < kStripRows; ++r) store_dwords_as24(v[r], rows[r] + 3 * x);
  }
  uint8_t* tail[kStripRows];
  for (int r = 0; r < kStripRows; ++r) tail[r] = rows[r] + 3 * x;
  scalar::unpack_strip(strip + x * kStripLanes, n - x, tail);
}

GRPO_FAST_AVX2 void convolve_rows(const uint8_t* const* rows, const int32_t* k, int n, size_t len, uint8_t* dst) {
  const __m256i init = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  size_t i0 = 0;
  for (; i0 + 32 <= len; i0 += 32) {
    __m256i a0 = init, a1 = init, a2 = init, a3 = init;
    for (int j = 0; j < n; ++j) {
      const uint8_t* s = rows[j] + i0;
      const __m256i kj = _mm256_set1_epi32(k[j]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(load8_epi32(s), kj));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(load8_epi32(s + 8), kj));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(load8_epi32(s + 16), kj));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(load8_epi32(s + 24), kj));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i0), clip8_x32(a0, a1, a2, a3));
  }
  for (; i0 < len; ++i0) {
    int32_t acc = 1 << (kPrecisionBits - 1);
    for (int j = 0; j < n; ++j) acc += rows[j][i0] * k[j];
    dst[i0] = clip8(acc);
  }
}

GRPO_FAST_AVX2 void convolve_strip(const uint8_t* strip, int x0, const AxisPlan& plan, int o0, int n_out,
                                   uint8_t* out) {
  const __m256i init = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (int o = 0; o < n_out; ++o) {
    const int32_t* k = plan.coef.data() + static_cast<size_t>(o0 + o) * plan.ksize;
    const uint8_t* s = strip + static_cast<size_t>(plan.start[o0 + o] - x0) * kStripLanes;
    const int n = plan.count[o0 + o];
    __m256i a0 = init, a1 = init, a2 = init;
    for (int j = 0; j < n; ++j, s += kStripLanes) {
      const __m256i kj = _mm256_set1_epi32(k[j]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(load8_epi32(s), kj));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(load8_epi32(s + 8), kj));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(load8_epi32(s + 16), kj));
    }
    // 24 useful bytes (a3 := a2 is ignored); the 8 extra land in the next output's slot or the padding.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o * kStripLanes), clip8_x32(a0, a1, a2, a2));
  }
}

GRPO_FAST_AVX2 void normalize_row(const uint8_t* src, int n, const float* mean, const float* std, float* dst,
                                  size_t plane) {
  // De-interleave 8 RGB pixels (24 bytes) with byte shuffles: channel c of pixel p sits at byte 3p + c.
  const __m128i lo_idx[3] = {_mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
                             _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1),
                             _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)};
  const __m128i hi_idx[3] = {_mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, -1, -1, -1, -1, -1, -1, -1, -1),
                             _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, -1, -1, -1, -1, -1, -1, -1, -1),
                             _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, -1, -1, -1, -1, -1, -1, -1, -1)};
  const __m256 v255 = _mm256_set1_ps(255.0f);
  int x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 3 * x));  // bytes 0..15
    const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 3 * x + 16));  // bytes 16..23
    for (int c = 0; c < 3; ++c) {
      const __m128i bytes = _mm_or_si128(_mm_shuffle_epi8(lo, lo_idx[c]), _mm_shuffle_epi8(hi, hi_idx[c]));
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      const __m256 y =
          _mm256_div_ps(_mm256_sub_ps(_mm256_div_ps(v, v255), _mm256_set1_ps(mean[c])), _mm256_set1_ps(std[c]));
      _mm256_storeu_ps(dst + c * plane + x, y);
    }
  }
  if (x < n) {
    float tail[3][8];
    scalar::normalize_row(src + 3 * x, n - x, mean, std, &tail[0][0], 8);
    for (int c = 0; c < 3; ++c) std::memcpy(dst + c * plane + x, tail[c], sizeof(float) * (n - x));
  }
}

}  // namespace grpo_fast::avx2
#endif
