// Row ops of the CPU loss head (grpo_fast/kernels/rowwise_torch.py): log-softmax statistics of logit rows and
// `d logits`, fp32 math over fp32 or bf16 rows, on native threads. Callers (rowops_bindings.cpp) check shapes,
// strides and target ids before calling; nothing here touches Python.
#pragma once

#include <cstddef>
#include <cstdint>

namespace grpo_fast::rowops {

// `rows` rows of `cols` logits, fp32 or bf16 (held as its uint16 bit patterns), row r at `data + r * stride`
// elements (stride >= cols).
struct Logits {
  const void* data;
  bool bf16;
  int64_t rows, cols;
  ptrdiff_t stride;
};

// row_stats outputs, fp32 [rows] each; those but logp and lse may be null. With m the row max and
// s = sum_j exp((z_j - m) / T): lse = m / T + log s, logp = (z_target - m) / T - log s,
// entropy = log s - sum_j e_j (z_j - m) / T / s, row_max = m, log_sum = log s.
struct Stats {
  float* logp;
  float* lse;
  float* entropy;
  float* row_max;
  float* log_sum;
};

// row_grad inputs, fp32 [rows] each: log p_j = (z_j - shift) / T - log_norm (shift null: 0, log_norm then the
// lse), g = grad_logp; grad_entropy (g_H) and entropy (H) both null or both given.
struct GradInputs {
  const float* shift;
  const float* log_norm;
  const float* grad_logp;
  const float* grad_entropy;
  const float* entropy;
};

// Fills `out` for every row of `z` (targets [rows] in [0, cols)), on `num_threads` threads (the caller's included).
void row_stats(const Logits& z, const int64_t* targets, float inv_t, const Stats& out, int num_threads);

// Writes d_j = (g (1[j = target] - p_j) - g_H p_j (log p_j + H)) / T over `out` (z's dtype, row r at
// `out + r * out_stride` elements; may be z itself), on `num_threads` threads.
void row_grad(const Logits& z, const int64_t* targets, float inv_t, const GradInputs& in, void* out,
              ptrdiff_t out_stride, int num_threads);

}  // namespace grpo_fast::rowops
