// The per-row kernels behind rowops.h, one set per ISA path (scalar in rowops.cpp, rowops_avx2.cpp,
// rowops_avx512.cpp), all written once in rowops_kernels.inc over each path's vector type. Every path gives the
// same floats: the same operations per element (explicit FMAs, no contraction), element j of a row summed into
// accumulator j % kAccumulators, the accumulators combined in one fixed order (reduce_sums in rowops.cpp).
#pragma once

#include <cstdint>

namespace grpo_fast::rowops {

constexpr int kAccumulators = 32;  // 2 AVX-512 registers of 16 lanes, 4 AVX2 registers of 8 (of 16), 32 scalars

// A row's constants for the gradient: log p_j = (z_j - shift) * inv_t - log_norm in one rounding (an FMA),
// d_j = p_j * (a + b (log p_j + h)) (b, h unused without the entropy term) off the target; a = -g / T, b = -g_H / T.
struct GradRow {
  float shift, inv_t, log_norm, a, b, h;
};

// T: float, or uint16_t holding bf16 bits (read exactly, written rounded to nearest even, NaN as 0x7fc0).
template <class T>
struct RowKernels {
  float (*row_max)(const T* z, int64_t n);
  // sums[k] = sum over j = k mod kAccumulators of e_j = exp((z_j - m) * inv_t); dots[k] likewise of
  // e_j (z_j - m) * inv_t, unless dots is null. A -inf logit adds 0 to both.
  void (*exp_sums)(const T* z, int64_t n, float m, float inv_t, float* sums, float* dots);
  // out[j] = d_j for every j (the target's value is the caller's to fix); `entropy`: with the b, h term.
  void (*grad)(const T* z, T* out, int64_t n, const GradRow& c, bool entropy);
};

namespace scalar {
template <class T>
RowKernels<T> kernels();
}  // namespace scalar
namespace avx2 {  // needs AVX2 and FMA
template <class T>
RowKernels<T> kernels();
}  // namespace avx2
namespace avx512 {  // needs AVX-512 F, BW, VL and FMA
template <class T>
RowKernels<T> kernels();
}  // namespace avx512

}  // namespace grpo_fast::rowops
