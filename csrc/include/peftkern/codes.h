// 4-bit code tables and decoding shared by the CPU and CUDA kernels.
// Mirrors peftkern/codes.py (the Python source of truth); tests/test_csrc.py checks they agree.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#define PK_TABLE __device__ __constant__
#else
#define PK_HD inline
#define PK_TABLE
#endif

namespace peftkern {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };
constexpr int kNestedBlocksize = 256;

// Values of codes 0..15, bit-equal to bitsandbytes' get_4bit_type (exact hex-float literals).
PK_HD float code_value(int quant_type, int code) {
  constexpr float nf4[16] = {
      -0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f,
      -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f,
      0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
      0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f,  0x1.000000p+0f};
  constexpr float fp4[16] = {
      0x0.0p+0f,       0x1.555556p-8f,  0x1.555556p-1f,  0x1.000000p+0f,
      0x1.555556p-2f,  0x1.000000p-1f,  0x1.555556p-3f,  0x1.000000p-2f,
      -0x0.0p+0f,      -0x1.555556p-8f, -0x1.555556p-1f, -0x1.000000p+0f,
      -0x1.555556p-2f, -0x1.000000p-1f, -0x1.555556p-3f, -0x1.000000p-2f};
  return quant_type == kNF4 ? nf4[code] : fp4[code];
}

// Quantization buckets the scaled value between the sorted table's fp32 midpoints;
// bucket i holds code sorted_code(i) (identity for NF4, bnb's argsort order for FP4).
PK_HD int sorted_code(int quant_type, int bucket) {
  constexpr int8_t fp4_order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
  return quant_type == kNF4 ? bucket : fp4_order[bucket];
}

PK_HD float bucket_bound(int quant_type, int i) {
  return (code_value(quant_type, sorted_code(quant_type, i)) +
          code_value(quant_type, sorted_code(quant_type, i + 1))) / 2.0f;
}

// Even flat element -> high nibble, odd -> low nibble.
PK_HD int unpack_code(uint8_t byte, int odd) { return odd ? (byte & 0xF) : (byte >> 4); }
PK_HD uint8_t pack_codes(int even_code, int odd_code) {
  return (uint8_t)((even_code << 4) | odd_code);
}

// Double-quantized absmax: code8[q] * absmax2[block / 256] + offset with two separate roundings,
// as bitsandbytes computes it. Device code uses the _rn intrinsics, which are never fused into an
// FMA; host code is compiled with -ffp-contract=off (setup.py).
PK_HD float decode_absmax(const uint8_t* q, const float* absmax2, const float* code8,
                          float offset, int64_t block) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(code8[q[block]], absmax2[block / kNestedBlocksize]), offset);
#else
  float scaled = code8[q[block]] * absmax2[block / kNestedBlocksize];
  return scaled + offset;
#endif
}

}  // namespace peftkern
