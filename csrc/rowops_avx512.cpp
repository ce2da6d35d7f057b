// AVX-512 (F, BW, VL) + FMA row kernels (rowops_kernels.inc over 16-float vectors); called only where the CPU and
// the OS have them (see rowops.cpp).
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's avx512fintrin.h passes _mm512_undefined_* vectors to the masked builtins, which -Wmaybe-uninitialized
// reports at every inlined use (fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "rowops_kernels.h"

#define ROWOPS_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

namespace grpo_fast::rowops::avx512 {

struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  ROWOPS_TARGET static V load(const float* p) { return _mm512_loadu_ps(p); }
  ROWOPS_TARGET static V load(const uint16_t* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  ROWOPS_TARGET static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  ROWOPS_TARGET static void store(uint16_t* p, V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                      _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  ROWOPS_TARGET static V set1(float x) { return _mm512_set1_ps(x); }
  ROWOPS_TARGET static V add(V a, V b) { return _mm512_add_ps(a, b); }
  ROWOPS_TARGET static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  ROWOPS_TARGET static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  ROWOPS_TARGET static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  ROWOPS_TARGET static V max(V a, V b) { return _mm512_max_ps(a, b); }
  ROWOPS_TARGET static V floor(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  ROWOPS_TARGET static V scale(V y, V n) { return _mm512_scalef_ps(y, n); }
  ROWOPS_TARGET static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  ROWOPS_TARGET static void spill(float* p, V v) { _mm512_storeu_ps(p, v); }
};

#include "rowops_kernels.inc"

}  // namespace grpo_fast::rowops::avx512
#endif
