// Byte-layout helpers of the AVX2 strip pack/unpack, shared by the AVX2 and AVX-512 kernels (x86-64 only; each
// includer builds them into functions that run only where the CPU has AVX2).
#pragma once
#include <immintrin.h>

#include <cstdint>

#define GRPO_FAST_AVX2 __attribute__((target("avx2")))

namespace grpo_fast::x86 {
namespace {  // internal linkage: every includer gets its own copy

// 8 packed 3-byte values (24 bytes at p, nothing read past them) -> 8 dwords, the 4th byte of each zero.
GRPO_FAST_AVX2 inline __m256i load24_as_dwords(const uint8_t* p) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));        // bytes 0..15
  const __m128i hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16));   // bytes 16..23
  const __m256i both = _mm256_set_m128i(_mm_alignr_epi8(hi, lo, 12), lo);         // lanes start at bytes 0 and 12
  const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,  //
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return _mm256_shuffle_epi8(both, spread);
}

// The first 3 bytes of each of 8 dwords -> 24 packed bytes at p (nothing written past them).
GRPO_FAST_AVX2 inline void store_dwords_as24(__m256i v, uint8_t* p) {
  const __m256i squeeze = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,  //
                                           0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  const __m256i packed =
      _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, squeeze), _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 3, 7));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p + 16), _mm256_extracti128_si256(packed, 1));
}

// In-place 8x8 transpose of dwords: v[i] element j <-> v[j] element i.
GRPO_FAST_AVX2 inline void transpose8x8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

}  // namespace
}  // namespace grpo_fast::x86
