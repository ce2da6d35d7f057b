// AVX-512 (F, BW, VL) versions of the hot kernels: the same int32 sums and float32 operations as resample.h's scalar
// kernels, 16 lanes at a time. Built for AVX-512 and called only where the CPU and the OS have it (see tiler.cpp).
//
// The passes use exact 16-bit multiply-adds (vpmaddwd: int16 words multiplied pairwise, each pair summed into an
// int32; one uop on Intel, where vpmulld takes two with 10 cycles of latency). Pillow's coefficients have 22
// fractional bits, so a coefficient k is split into the words (k >> 8, k & 255) (split_words in resample.h):
//   horizontal: the strip holds each pixel p as the words ((p - 128) << 8, p - 128), whose pairwise product with
//     the split k is (p - 128) * k; the 128 * sum(k) this leaves out starts the accumulator (AxisPlan::bias). The
//     strip takes 4 bytes per lane, so it is packed and consumed a cache-sized chunk at a time (tiler.cpp).
//   vertical: two taps per multiply-add, the words (p_j, p_j+1) times (k_j >> 8, k_j+1 >> 8) and times
//     (k_j & 255, k_j+1 & 255), recombined as 256 * high + low.
// Every sum equals the scalar kernel's modulo 2**32, so exactly, as Pillow's int32 sums do not overflow.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's avx512fintrin.h passes _mm512_undefined_* vectors to the masked builtins, which -Wmaybe-uninitialized
// reports at every inlined use (fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "resample.h"
#include "transpose_avx2.h"

#define GRPO_FAST_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl")))

namespace grpo_fast::avx512 {
namespace {

// One pixel of 8 rows, (R, G, B, X) bytes per row in a ymm -> the 24 wide lanes of those rows (96 bytes at dst).
// Lane i = 3 * row + channel reads byte 4 * row + channel. With x = p ^ 0x80 (p - 128 as an int8), the dword with x
// in its two high bytes, shifted right arithmetically by 8, is the words (x << 8, x) sign-extended. vpshufb moves
// bytes within 128-bit blocks only, so each block first receives the source block holding its four lanes' bytes:
// lanes 0..11 read bytes 0..14 (source block 0), lanes 12..23 bytes 16..30 (block 1).
alignas(64) constexpr int8_t kSpread[96] = {  // per block: the source byte of each lane at bytes 2 and 3 of its dword
    -1, -1, 0,  0,  -1, -1, 1,  1,  -1, -1, 2,  2,  -1, -1, 4,  4,   // lanes 0..3 (source block 0)
    -1, -1, 5,  5,  -1, -1, 6,  6,  -1, -1, 8,  8,  -1, -1, 9,  9,   // lanes 4..7 (block 0)
    -1, -1, 10, 10, -1, -1, 12, 12, -1, -1, 13, 13, -1, -1, 14, 14,  // lanes 8..11 (block 0)
    -1, -1, 0,  0,  -1, -1, 1,  1,  -1, -1, 2,  2,  -1, -1, 4,  4,   // lanes 12..15 (block 1: bytes 16..20)
    -1, -1, 5,  5,  -1, -1, 6,  6,  -1, -1, 8,  8,  -1, -1, 9,  9,   // lanes 16..19 (block 1)
    -1, -1, 10, 10, -1, -1, 12, 12, -1, -1, 13, 13, -1, -1, 14, 14,  // lanes 20..23 (block 1)
};

GRPO_FAST_AVX512 inline void store_wide(__m256i rgbx, uint8_t* dst) {
  const __m256i x = _mm256_xor_si256(rgbx, _mm256_set1_epi8(static_cast<char>(0x80)));
  const __m512i blocks = _mm512_shuffle_i64x2(_mm512_castsi256_si512(x), _mm512_castsi256_si512(x), 0x40);  // 0 0 0 1
  const __m256i block1 = _mm256_permute2x128_si256(x, x, 0x11);                                            // 1 1
  const __m512i lo = _mm512_shuffle_epi8(blocks, _mm512_load_si512(kSpread));
  const __m256i hi = _mm256_shuffle_epi8(block1, _mm256_load_si256(reinterpret_cast<const __m256i*>(kSpread + 64)));
  _mm512_storeu_si512(dst, _mm512_srai_epi32(lo, 8));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64), _mm256_srai_epi32(hi, 8));
}

// clip8 of 16 sums -> 16 bytes: >> 22, clamp to [0, 255] (max with 0, then unsigned saturation).
GRPO_FAST_AVX512 inline __m128i clip8_x16(__m512i acc) {
  return _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(acc, kPrecisionBits), _mm512_setzero_si512()));
}

// Dword indices that de-interleave 16 RGB pixels held as 48 dwords (a, b, c: pixels' bytes 0..15, 16..31, 32..47):
// channel ch of pixel p is dword 3p + ch, taken from (a, b) by `ab` when below 32, else from c by `c` (bits `from_c`).
struct PlanarIndex {
  uint32_t ab[3][16];
  uint32_t c[3][16];
  uint16_t from_c[3];
};

constexpr PlanarIndex make_planar_index() {
  PlanarIndex q{};
  for (int ch = 0; ch < 3; ++ch) {
    for (int p = 0; p < 16; ++p) {
      const int i = 3 * p + ch;
      q.ab[ch][p] = static_cast<uint32_t>(i & 31);
      q.c[ch][p] = static_cast<uint32_t>(i & 15);
      if (i >= 32) q.from_c[ch] = static_cast<uint16_t>(q.from_c[ch] | 1u << p);
    }
  }
  return q;
}

alignas(64) constexpr PlanarIndex kPlanarIndex = make_planar_index();

// x / d as x * r (r = 1 / d rounded), corrected by one FMA step on the exact residual x - q * d. Not the correctly
// rounded quotient for every x and d: the tiler uses it only for (mean, std) whose 256 possible inputs per channel it
// has checked against the true division (normalize_matches_division in tiler.cpp).
GRPO_FAST_AVX512 inline __m512 divide(__m512 x, __m512 d, __m512 r) {
  const __m512 q = _mm512_mul_ps(x, r);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, d, x), r, q);
}

}  // namespace

// How far ahead of the pixels being packed the rows are prefetched.
constexpr int kPrefetchPixels = 256;

// Per half of the 16 rows: the AVX2 8x8 transpose of pixels (8 pixels of 8 rows -> 8 rows of each pixel), then
// each pixel widened.
GRPO_FAST_AVX512 void pack_strip(const uint8_t* const* rows, int n, int pixel_stride, uint8_t* strip) {
  constexpr int kHalfBytes = kWideStripBytes / 2;
  __m256i v[8];
  // 4-byte pixels load 32 bytes per 8: the last pixel is left to the tail, so its 4th byte (past the row's last RGB
  // byte, maybe past the buffer) is never read.
  const int simd_n = pixel_stride == 4 ? n - 1 : n;
  int x = 0;
  for (; x + 8 <= simd_n; x += 8) {
    // 16 rows are 16 input streams read in short bursts (the strip is packed a chunk at a time): fetch each row's
    // next cache lines ahead of the hardware prefetchers.
    if (x % 16 == 0)
      for (int r = 0; r < kWideStripRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + static_cast<ptrdiff_t>(x + kPrefetchPixels) * pixel_stride),
                     _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* const* half_rows = rows + 8 * half;
      for (int r = 0; r < 8; ++r)
        v[r] = pixel_stride == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half_rows[r] + 4 * x))
                                 : x86::load24_as_dwords(half_rows[r] + 3 * x);
      x86::transpose8x8(v);
      for (int p = 0; p < 8; ++p)
        store_wide(v[p], strip + static_cast<size_t>(x + p) * kWideStripBytes + half * kHalfBytes);
    }
  }
  for (; x < n; ++x) {
    for (int half = 0; half < 2; ++half) {
      alignas(32) uint8_t pixel[32] = {};
      for (int r = 0; r < 8; ++r)
        std::memcpy(pixel + 4 * r, rows[8 * half + r] + static_cast<ptrdiff_t>(x) * pixel_stride, 3);
      store_wide(_mm256_load_si256(reinterpret_cast<const __m256i*>(pixel)), strip + static_cast<size_t>(x) * kWideStripBytes + half * kHalfBytes);
    }
  }
}

// [n][16][3] -> 16 packed RGB rows (n pixels each): per half of the rows, the AVX2 8x8 transpose.
GRPO_FAST_AVX512 void unpack_strip(const uint8_t* strip, int n, uint8_t* const* rows) {
  constexpr int kHalfLanes = kWideStripLanes / 2;
  __m256i v[8];
  int x = 0;
  for (; x + 8 <= n; x += 8) {
    for (int half = 0; half < 2; ++half) {
      for (int p = 0; p < 8; ++p) v[p] = x86::load24_as_dwords(strip + (x + p) * kWideStripLanes + half * kHalfLanes);
      x86::transpose8x8(v);
      for (int r = 0; r < 8; ++r) x86::store_dwords_as24(v[r], rows[8 * half + r] + 3 * x);
    }
  }
  for (; x < n; ++x)
    for (int r = 0; r < kWideStripRows; ++r) std::memcpy(rows[r] + 3 * x, strip + x * kWideStripLanes + 3 * r, 3);
}

GRPO_FAST_AVX512 void convolve_strip(const uint8_t* strip, int x0, const AxisPlan& plan, int o0, int n_out,
                                     uint8_t* out) {
  // Locals: stores through `out` (uint8_t) may alias the plan's vectors, which would reload them every output.
  const uint32_t* coef = plan.coef_words.data() + static_cast<size_t>(o0) * plan.ksize;
  const int* start = plan.start.data() + o0;
  const int* count = plan.count.data() + o0;
  const int32_t* bias = plan.bias.data() + o0;
  const int ksize = plan.ksize;
  for (int o = 0; o < n_out; ++o, coef += ksize, out += kWideStripLanes) {
    const uint8_t* s = strip + static_cast<size_t>(start[o] - x0) * kWideStripBytes;
    __m512i a0 = _mm512_set1_epi32(bias[o]), a1 = a0, a2 = a0;  // lanes 0..15, 16..31, 32..47
    for (int j = 0; j < count[o]; ++j, s += kWideStripBytes) {
      const __m512i kj = _mm512_set1_epi32(static_cast<int>(coef[j]));
      a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_load_si512(s), kj));
      a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_load_si512(s + 64), kj));
      a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(_mm512_load_si512(s + 128), kj));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), clip8_x16(a0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), clip8_x16(a1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32), clip8_x16(a2));
  }
}

GRPO_FAST_AVX512 void convolve_rows(const uint8_t* const* rows, const int32_t* k, int n, size_t len, uint8_t* dst) {
  // Taps in pairs (an odd last one pairs with itself at weight 0): the pair's row pointers and coefficient words.
  constexpr int kStackPairs = 64;
  const int pairs = (n + 1) / 2;
  const uint8_t* stack_rows[2 * kStackPairs];
  uint32_t stack_words[2 * kStackPairs];
  std::vector<const uint8_t*> heap_rows;
  std::vector<uint32_t> heap_words;
  const uint8_t** pair_rows = stack_rows;
  uint32_t* words = stack_words;  // [pair][high words, low words]
  if (pairs > kStackPairs) {
    heap_rows.resize(2 * pairs);
    heap_words.resize(2 * pairs);
    pair_rows = heap_rows.data();
    words = heap_words.data();
  }
  for (int p = 0; p < pairs; ++p) {
    const int32_t k0 = k[2 * p], k1 = 2 * p + 1 < n ? k[2 * p + 1] : 0;
    pair_rows[2 * p] = rows[2 * p];
    pair_rows[2 * p + 1] = rows[std::min(2 * p + 1, n - 1)];
    words[2 * p] = static_cast<uint16_t>(k0 >> 8) | static_cast<uint32_t>(k1 >> 8) << 16;
    words[2 * p + 1] = static_cast<uint32_t>(k0 & 255) | static_cast<uint32_t>(k1 & 255) << 16;
  }
  const __m512i zero = _mm512_setzero_si512(), init = _mm512_set1_epi32(1 << (kPrecisionBits - 1));
  for (size_t i0 = 0; i0 < len; i0 += 64) {
    const __mmask64 mask = len - i0 >= 64 ? ~0ULL : (1ULL << (len - i0)) - 1;
    // Per 128-bit block, accumulator q holds lanes 4q..4q+3: the order the packs below put back.
    __m512i hi[4] = {zero, zero, zero, zero}, lo[4] = {init, init, init, init};
    for (int p = 0; p < pairs; ++p) {
      const __m512i a = _mm512_maskz_loadu_epi8(mask, pair_rows[2 * p] + i0);
      const __m512i b = _mm512_maskz_loadu_epi8(mask, pair_rows[2 * p + 1] + i0);
      const __m512i kh = _mm512_set1_epi32(static_cast<int>(words[2 * p]));
      const __m512i kl = _mm512_set1_epi32(static_cast<int>(words[2 * p + 1]));
      const __m512i ab_lo = _mm512_unpacklo_epi8(a, b), ab_hi = _mm512_unpackhi_epi8(a, b);  // a0 b0 a1 b1 ...
      const __m512i w[4] = {_mm512_unpacklo_epi8(ab_lo, zero), _mm512_unpackhi_epi8(ab_lo, zero),
                            _mm512_unpacklo_epi8(ab_hi, zero), _mm512_unpackhi_epi8(ab_hi, zero)};  // words a, b
      for (int q = 0; q < 4; ++q) {
        hi[q] = _mm512_add_epi32(hi[q], _mm512_madd_epi16(w[q], kh));
        lo[q] = _mm512_add_epi32(lo[q], _mm512_madd_epi16(w[q], kl));
      }
    }
    __m512i acc[4];
    for (int q = 0; q < 4; ++q)
      acc[q] = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi[q], 8), lo[q]), kPrecisionBits);
    // Signed packs keep [-512, 511]; the unsigned pack clamps to [0, 255]; both per 128-bit block, in lane order.
    const __m512i bytes =
        _mm512_packus_epi16(_mm512_packs_epi32(acc[0], acc[1]), _mm512_packs_epi32(acc[2], acc[3]));
    _mm512_mask_storeu_epi8(dst + i0, mask, bytes);
  }
}

GRPO_FAST_AVX512 void normalize_row(const uint8_t* src, int n, const float* mean, const float* std, float* dst,
                                    size_t plane) {
  const __m512 d255 = _mm512_set1_ps(255.0f), r255 = _mm512_set1_ps(1.0f / 255.0f);
  __m512 m[3], d[3], r[3];
  __m512i ab[3], c_idx[3];
  for (int ch = 0; ch < 3; ++ch) {
    m[ch] = _mm512_set1_ps(mean[ch]);
    d[ch] = _mm512_set1_ps(std[ch]);
    r[ch] = _mm512_set1_ps(1.0f / std[ch]);
    ab[ch] = _mm512_load_si512(kPlanarIndex.ab[ch]);
    c_idx[ch] = _mm512_load_si512(kPlanarIndex.c[ch]);
  }
  for (int x = 0; x < n; x += 16) {
    const int pixels = std::min(16, n - x);
    const __mmask64 bytes = pixels == 16 ? (1ULL << 48) - 1 : (1ULL << (3 * pixels)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(bytes, src + 3 * x);
    const __m512i a = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(v));
    const __m512i b = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, 1));
    const __m512i c = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, 2));
    const __mmask16 keep = static_cast<__mmask16>((1u << pixels) - 1);
    for (int ch = 0; ch < 3; ++ch) {
      const __m512i values = _mm512_mask_permutexvar_epi32(_mm512_permutex2var_epi32(a, ab[ch], b),
                                                           kPlanarIndex.from_c[ch], c_idx[ch], c);
      const __m512 unit = divide(_mm512_cvtepi32_ps(values), d255, r255);
      _mm512_mask_storeu_ps(dst + ch * plane + x, keep, divide(_mm512_sub_ps(unit, m[ch]), d[ch], r[ch]));
    }
  }
}

}  // namespace grpo_fast::avx512
#endif
