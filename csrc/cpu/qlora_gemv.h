// CPU fused QLoRA GEMV (decode-size batches): plain pointers, validated by csrc/bindings.cpp.
#pragma once
#include <stdint.h>

#include "peftkern/codes.h"  // kMaxGemvRows

namespace peftkern::cpu {

struct GemvArgs {
  const float* x;        // [M, K] fp32, contiguous
  int64_t M, K, N;
  const uint8_t* packed;  // flat 4-bit codes of W [N, K]
  const float* absmax;    // plain absmax, or nullptr when absmax_q is set
  const uint8_t* absmax_q;
  const float* absmax2;
  const float* code8;
  float offset;
  int quant_type;
  int64_t blocksize;      // must divide K
  const float* bias;      // [N] or nullptr
  const float* xa;        // [M, R] = drop(x)·Aᵀ, or nullptr (no LoRA term)
  const float* lora_B;    // [N, R]
  int64_t R;
  float scaling;
  float* y;               // [M, N]
};

// simd_level: 2 = the best the CPU has (AVX-512, else AVX2), 1 = at most AVX2, 0 = scalar.
// Lower levels exist so that tests cover every path on any machine.
void qlora_gemv(const GemvArgs& args, int simd_level);

}  // namespace peftkern::cpu
