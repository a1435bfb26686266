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
  // Round x and the decoded (scaled) weights to bf16 before multiplying, as bitsandbytes' bf16
  // compute does (x is exact there: it came from bf16); products exact, sums in fp32. Only the
  // AVX512-BF16 and AMX tiled paths act on it; the others compute in fp32 (more precise).
  bool bf16_products;
};

// Which path qlora_gemv takes for M rows: "scalar", "avx2", "avx2-tiled", "avx512",
// "avx512-tiled", "avx512bf16-tiled", "amx-tiled" (dispatch reports it in plan(...).reason).
const char* gemv_path(int64_t M, bool bf16_products, int simd_level);

// Whether that path adds the low-rank term at no extra pass (in its accumulators); on the others
// a separate addmm after the kernel is faster than the epilogue's scalar loop.
bool gemv_lora_in_kernel(int64_t M, bool bf16_products, int simd_level);

// simd_level: 3 = the path measured fastest on this CPU's class (AMX for bf16 compute, AVX-512,
// AVX2), 2 = the AVX-512 paths where the CPU has them (no AMX), 1 = at most AVX2, 0 = scalar.
// Lower levels exist so that tests cover every path on any machine.
void qlora_gemv(const GemvArgs& args, int simd_level);

}  // namespace peftkern::cpu
