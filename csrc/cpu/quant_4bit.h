// CPU kernels: plain pointers in, validated by the caller (csrc/bindings.cpp).
#pragma once
#include <stdint.h>

namespace peftkern::cpu {

template <typename T>
void quantize_4bit(const T* A, int64_t n, int quant_type, int64_t blocksize, uint8_t* packed,
                   float* absmax);

// absmax_q != nullptr selects double-quantized absmax (then absmax is unused).
// simd_level as for qlora_gemv: 2 or more = the best the CPU has (AVX-512, else AVX2; no AMX path
// here), 1 = at most AVX2, 0 = scalar.
template <typename T>
void dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                     const float* absmax2, const float* code8, float offset, int quant_type,
                     int64_t blocksize, int64_t n, T* out, int simd_level);

}  // namespace peftkern::cpu
