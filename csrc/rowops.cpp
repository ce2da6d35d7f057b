// The row ops' engine: the scalar kernels (the portable path, and the definition the SIMD paths equal), the pick
// of a path, and rows spread over native threads, each row done wholly by one thread, so that no result depends
// on the path or the thread count.
#include "rowops.h"

#include <algorithm>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#include <cmath>
#include <cstring>

#include "parallel.h"
#include "rowops_kernels.h"
#include "tiler.h"

namespace grpo_fast::rowops {

namespace scalar {

#define ROWOPS_TARGET

struct Simd {
  using V = float;
  static constexpr int kLanes = 1;
  static V load(const float* p) { return *p; }
  static V load(const uint16_t* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
  static void store(float* p, V v) { *p = v; }
  static void store(uint16_t* p, V v) {  // c10's round_to_nearest_even
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    *p = std::isnan(v) ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V floor(V x) { return std::floor(x); }
  static V scale(V y, V n) {  // as avx2::Simd::scale
    if (std::isnan(n)) return y * n;
    n = std::min(std::max(n, -151.0f), 129.0f);
    const float a = std::min(std::max(n, -100.0f), 127.0f);
    return y * pow2(a) * pow2(n - a);
  }
  static V pow2(V n) {  // 2^n for integral n in [-126, 127]
    const uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
  static float hmax(V v) { return v; }
  static void spill(float* p, V v) { *p = v; }
};

#include "rowops_kernels.inc"

#undef ROWOPS_TARGET

}  // namespace scalar

namespace {

// The accumulators' sum in one fixed order: pairs kAccumulators / 2 apart, then halves, down to one.
float reduce_sums(const float* acc) {
  float t[kAccumulators];
  std::copy(acc, acc + kAccumulators, t);
  for (int w = kAccumulators / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

#if defined(__x86_64__) && defined(__GNUC__)
bool cpu_has_fma() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_FMA);
}
#endif

// The kernels of the tiler's active path (`set_isa` narrows both); the SIMD paths also need FMA.
template <class T>
RowKernels<T> pick_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool fma = cpu_has_fma();
  if (fma && active_isa() == Isa::kAvx512) return avx512::kernels<T>();
  if (fma && active_isa() == Isa::kAvx2) return avx2::kernels<T>();
#endif
  return scalar::kernels<T>();
}

template <class T>
void stats_rows(const Logits& z, const int64_t* targets, float inv_t, const Stats& out, int num_threads) {
  const RowKernels<T> k = pick_kernels<T>();
  parallel_for(z.rows, num_threads, [&](int64_t r) {
    const T* row = static_cast<const T*>(z.data) + r * z.stride;
    const float m = k.row_max(row, z.cols);
    float sums[kAccumulators], dots[kAccumulators];
    k.exp_sums(row, z.cols, m, inv_t, sums, out.entropy != nullptr ? dots : nullptr);
    const float s = reduce_sums(sums), log_s = std::log(s);
    out.lse[r] = m * inv_t + log_s;
    out.logp[r] = (scalar::Simd::load(row + targets[r]) - m) * inv_t - log_s;
    if (out.entropy != nullptr) out.entropy[r] = log_s - reduce_sums(dots) / s;
    if (out.row_max != nullptr) out.row_max[r] = m;
    if (out.log_sum != nullptr) out.log_sum[r] = log_s;
  });
}

template <class T>
void grad_rows(const Logits& z, const int64_t* targets, float inv_t, const GradInputs& in, T* out,
               ptrdiff_t out_stride, int num_threads) {
  const RowKernels<T> k = pick_kernels<T>();
  const bool entropy = in.grad_entropy != nullptr;
  parallel_for(z.rows, num_threads, [&](int64_t r) {
    const T* row = static_cast<const T*>(z.data) + r * z.stride;
    T* dst = out + r * out_stride;
    const float g = in.grad_logp[r];
    const GradRow c{in.shift != nullptr ? in.shift[r] : 0.0f, inv_t, in.log_norm[r], -g * inv_t,
                    entropy ? -in.grad_entropy[r] * inv_t : 0.0f, entropy ? in.entropy[r] : 0.0f};
    const float target_logit = scalar::Simd::load(row + targets[r]);  // before `dst` may overwrite it
    k.grad(row, dst, z.cols, c, entropy);
    const scalar::GradVecs cs = scalar::broadcast(c);
    const float d = entropy ? scalar::grad_value<true>(target_logit, cs) : scalar::grad_value<false>(target_logit, cs);
    scalar::Simd::store(dst + targets[r], d + g * inv_t);
  });
}

}  // namespace

void row_stats(const Logits& z, const int64_t* targets, float inv_t, const Stats& out, int num_threads) {
  if (z.bf16)
    stats_rows<uint16_t>(z, targets, inv_t, out, num_threads);
  else
    stats_rows<float>(z, targets, inv_t, out, num_threads);
}

void row_grad(const Logits& z, const int64_t* targets, float inv_t, const GradInputs& in, void* out,
              ptrdiff_t out_stride, int num_threads) {
  if (z.bf16)
    grad_rows(z, targets, inv_t, in, static_cast<uint16_t*>(out), out_stride, num_threads);
  else
    grad_rows(z, targets, inv_t, in, static_cast<float*>(out), out_stride, num_threads);
}

}  // namespace grpo_fast::rowops
