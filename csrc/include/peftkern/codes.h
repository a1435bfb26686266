// 4-bit code tables and the small pieces of decoding shared by the CPU (g++) and CUDA (nvcc) code.
// Mirrors peftkern/codes.py, the Python source of truth; tests/test_csrc.py checks that they agree
// bit for bit. Plain C++17 when compiled without CUDA: no torch, no CUDA headers.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define PEFTKERN_HD __host__ __device__ __forceinline__
#else
#define PEFTKERN_HD inline
#endif

namespace peftkern {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };
constexpr int kNestedBlocksize = 256;  // blocksize of the 8-bit quantization of absmax
constexpr int kMaxGemvRows = 16;       // the CPU and CUDA decode GEMVs take M <= 16 rows of x

// Values of codes 0..15 as fp32, bit-equal to peftkern.codes.code_table (exact hex-float literals).
#define PEFTKERN_NF4_VALUES                                                                \
  -0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f, -0x1.23449ap-2f,     \
      -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f,         \
      0x1.f809bap-3f, 0x1.5a0674p-2f, 0x1.c34970p-2f, 0x1.200f56p-1f, 0x1.722766p-1f,      \
      0x1.000000p+0f
// FP4 = bnb's raw e2m1 values / 12 in fp32: 0, 1/192, 8/12, 1, 4/12, 6/12, 2/12, 3/12, then the
// negatives (code 8 is -0.0).
#define PEFTKERN_FP4_VALUES                                                                \
  0x0.0p+0f, 0x1.555556p-8f, 0x1.555556p-1f, 0x1.000000p+0f, 0x1.555556p-2f, 0x1.000000p-1f, \
      0x1.555556p-3f, 0x1.000000p-2f, -0x0.0p+0f, -0x1.555556p-8f, -0x1.555556p-1f,        \
      -0x1.000000p+0f, -0x1.555556p-2f, -0x1.000000p-1f, -0x1.555556p-3f, -0x1.000000p-2f
// Quantization sorts the table: bucket i holds code FP4_ORDER[i] (identity for NF4). bnb's order
// puts +0 (code 0) before -0 (code 8).
#define PEFTKERN_FP4_ORDER_VALUES 11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3

// Host copies (g++ and nvcc's host pass).
inline constexpr float NF4[16] = {PEFTKERN_NF4_VALUES};
inline constexpr float FP4[16] = {PEFTKERN_FP4_VALUES};
inline constexpr uint8_t FP4_ORDER[16] = {PEFTKERN_FP4_ORDER_VALUES};

#if defined(__CUDACC__)
// Device copies: device code cannot index host constexpr arrays.
namespace device {
static __constant__ float NF4[16] = {PEFTKERN_NF4_VALUES};
static __constant__ float FP4[16] = {PEFTKERN_FP4_VALUES};
}  // namespace device
#endif

// The 16 values of `quant_type` (kNF4 or kFP4).
PEFTKERN_HD const float* code_table(int quant_type) {
#if defined(__CUDA_ARCH__)
  return quant_type == kNF4 ? device::NF4 : device::FP4;
#else
  return quant_type == kNF4 ? NF4 : FP4;
#endif
}

PEFTKERN_HD float code_value(int quant_type, int code) { return code_table(quant_type)[code]; }

#if !defined(__CUDA_ARCH__)
// Code of sorted bucket `bucket` (host only: quantization runs on the CPU).
inline int bucket_code(int quant_type, int bucket) {
  return quant_type == kNF4 ? bucket : FP4_ORDER[bucket];
}

// Upper bound of bucket j (j = 0..14): the fp32 midpoint of sorted values j and j+1, computed as
// peftkern.codes.bucket_bounds does: (a + b) / 2 in fp32.
inline float bucket_bound(int quant_type, int j) {
  return (code_value(quant_type, bucket_code(quant_type, j)) +
          code_value(quant_type, bucket_code(quant_type, j + 1))) / 2.0f;
}
#endif

// Packing: the element at an even flat index is the HIGH nibble of its byte, odd is the LOW one.
PEFTKERN_HD int high_code(uint8_t byte) { return byte >> 4; }
PEFTKERN_HD int low_code(uint8_t byte) { return byte & 0xF; }
PEFTKERN_HD int unpack_code(uint8_t byte, int64_t flat_index) {
  return (flat_index & 1) ? low_code(byte) : high_code(byte);
}
PEFTKERN_HD uint8_t pack_codes(int even_code, int odd_code) {
  return (uint8_t)((even_code << 4) | odd_code);
}

// Double-quantized absmax of quantization block `block`:
//   (code8[absmax_q[block]] * absmax2[block / 256]) + offset
// as two separately rounded fp32 operations, never one fused multiply-add (bnb dequantizes the
// 8-bit absmax, then adds the offset in a second op). Device code uses the _rn intrinsics, which
// nvcc never contracts; host code relies on -ffp-contract=off (setup.py).
PEFTKERN_HD float decode_absmax(uint8_t q, float absmax2, const float* code8, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(code8[q], absmax2), offset);
#else
  const float scaled = code8[q] * absmax2;
  return scaled + offset;
#endif
}

PEFTKERN_HD float decode_absmax(const uint8_t* absmax_q, const float* absmax2, const float* code8,
                                float offset, int64_t block) {
  return decode_absmax(absmax_q[block], absmax2[block / kNestedBlocksize], code8, offset);
}

}  // namespace peftkern
