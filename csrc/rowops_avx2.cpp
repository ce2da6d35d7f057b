// AVX2 + FMA row kernels (rowops_kernels.inc over 8-float vectors); called only where the CPU and the OS have them
// (see rowops.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#include "rowops_kernels.h"

#define ROWOPS_TARGET __attribute__((target("avx2,fma")))

namespace grpo_fast::rowops::avx2 {

struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  ROWOPS_TARGET static V load(const float* p) { return _mm256_loadu_ps(p); }
  ROWOPS_TARGET static V load(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  ROWOPS_TARGET static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  ROWOPS_TARGET static void store(uint16_t* p, V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                      _mm256_set1_epi32(1)));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // packus works per 128-bit half: words r0..3 r0..3 | r4..7 r4..7; qwords 0 and 2 hold r0..7
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  ROWOPS_TARGET static V set1(float x) { return _mm256_set1_ps(x); }
  ROWOPS_TARGET static V add(V a, V b) { return _mm256_add_ps(a, b); }
  ROWOPS_TARGET static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  ROWOPS_TARGET static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  ROWOPS_TARGET static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  ROWOPS_TARGET static V max(V a, V b) { return _mm256_max_ps(a, b); }
  ROWOPS_TARGET static V floor(V x) { return _mm256_floor_ps(x); }
  // y 2^n as (y 2^a) 2^(n - a), a = n clamped to [-100, 127]: the first product is exact, the second rounds once
  // (scalef's value for every integral n once it is clamped to [-151, 129], beyond which both give 0 or inf).
  ROWOPS_TARGET static V scale(V y, V n) {
    n = _mm256_min_ps(_mm256_set1_ps(129.0f), _mm256_max_ps(_mm256_set1_ps(-151.0f), n));
    const V a = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-100.0f), n));
    return _mm256_mul_ps(_mm256_mul_ps(y, pow2(a)), pow2(_mm256_sub_ps(n, a)));
  }
  // 2^n for integral n in [-126, 127]
  ROWOPS_TARGET static V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  ROWOPS_TARGET static float hmax(V v) {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, v);
    float m = lanes[0];
    for (int i = 1; i < kLanes; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
  ROWOPS_TARGET static void spill(float* p, V v) { _mm256_storeu_ps(p, v); }
};

#include "rowops_kernels.inc"

}  // namespace grpo_fast::rowops::avx2
#endif
