// CPU 4-bit blockwise quantize/dequantize, bit-identical to bitsandbytes (see peftkern/reference.py).
// OpenMP across quantization blocks. Compiled with -ffp-contract=off: the arithmetic must round
// exactly as the reference does.
#include <algorithm>
#include <cmath>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "peftkern/codes.h"
#include "quant_4bit.h"

namespace peftkern::cpu {

namespace {
inline int bucket_of(float s, const float* bounds) {
  int b = 0;
  for (int i = 0; i < 15; ++i) b += bounds[i] < s;  // torch.bucketize(right=False)
  return b;
}
}  // namespace

template <typename T>
void quantize_4bit(const T* A, int64_t n, int quant_type, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  float bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = bucket_bound(quant_type, i);
  const int zero_code = sorted_code(quant_type, bucket_of(0.0f, bounds));  // pad of odd n
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
    float amax = 0.0f;
    for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(static_cast<float>(A[i])));
    // bnb multiplies full blocks by the reciprocal and divides the partial tail block.
    const bool full = end - start == blocksize;
    const float safe = std::max(amax, 1e-38f), recip = 1.0f / safe;
    absmax[b] = full ? amax : safe;
    auto code = [&](int64_t i) {
      const float x = static_cast<float>(A[i]);
      const float s = std::min(std::max(full ? x * recip : x / safe, -1.0f), 1.0f);
      return sorted_code(quant_type, bucket_of(s, bounds));
    };
    for (int64_t i = start; i < end; i += 2)
      packed[i / 2] = pack_codes(code(i), i + 1 < end ? code(i + 1) : zero_code);
  }
}

template <typename T>
void dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                     const float* absmax2, const float* code8, float offset, int quant_type,
                     int64_t blocksize, int64_t n, T* out) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const float scale = absmax_q ? decode_absmax(absmax_q, absmax2, code8, offset, b) : absmax[b];
    const int64_t start = b * blocksize, end = std::min(start + blocksize, n);
    for (int64_t i = start; i < end; ++i)
      out[i] = static_cast<T>(table[unpack_code(packed[i / 2], i & 1)] * scale);
  }
}

#define PK_INSTANTIATE(T)                                                                        \
  template void quantize_4bit<T>(const T*, int64_t, int, int64_t, uint8_t*, float*);             \
  template void dequantize_4bit<T>(const uint8_t*, const float*, const uint8_t*, const float*,   \
                                   const float*, float, int, int64_t, int64_t, T*);
PK_INSTANTIATE(float)
PK_INSTANTIATE(c10::Half)
PK_INSTANTIATE(c10::BFloat16)

}  // namespace peftkern::cpu
