// CPU 4-bit blockwise quantize/dequantize, bit-identical to bitsandbytes 0.50's CPU path (its
// default torch implementation; the spec is written out in tests/test_csrc.py). OpenMP across
// quantization blocks. Compiled with -ffp-contract=off: every operation must round exactly as
// the reference rounds it.
#include <algorithm>
#include <cmath>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <type_traits>

#include "cpu_features.h"
#include "peftkern/codes.h"
#include "quant_4bit.h"

namespace peftkern::cpu {

namespace {

constexpr int64_t kChunk = 4096;  // elements bucketed per pass (even)

struct Buckets {
  float bounds[15];
  uint8_t code[16];  // code of each sorted bucket
  explicit Buckets(int quant_type) {
    for (int j = 0; j < 15; ++j) bounds[j] = bucket_bound(quant_type, j);
    for (int j = 0; j < 16; ++j) code[j] = (uint8_t)bucket_code(quant_type, j);
  }
};

// torch.bucketize(s, bounds, right=False): the number of bounds strictly below s. Written as
// !(bound >= s) so that NaN lands in the last bucket, as torch's binary search puts it.
inline uint8_t bucket_of(float s, const float* bounds) {
  int b = 0;
  for (int j = 0; j < 15; ++j) b += !(bounds[j] >= s);
  return (uint8_t)b;
}

// torch.clamp(s, -1, 1), NaN propagating.
inline float clamp1(float s) {
  s = s < -1.0f ? -1.0f : s;
  return s > 1.0f ? 1.0f : s;
}

// max |x| with torch's NaN propagation (a NaN anywhere makes the max NaN).
template <typename T>
inline float abs_max(const T* x, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float v = std::fabs(static_cast<float>(x[i]));
    m = (v > m || v != v) && m == m ? v : m;
  }
  return m;
}

}  // namespace

template <typename T>
void quantize_4bit(const T* A, int64_t n, int quant_type, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  const Buckets bk(quant_type);
  const uint8_t zero_code = bk.code[bucket_of(0.0f, bk.bounds)];  // pads the last byte of odd n
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
    const bool full = len == blocksize;
    const float amax = abs_max(A + start, len);
    const float safe = std::max(amax, 1e-38f);  // a NaN amax stays NaN (std::max keeps the first)
    // Full blocks multiply by the reciprocal and store the unclamped max; the last, partial
    // block divides and stores the clamped max (as bnb does).
    absmax[b] = full ? amax : safe;
    const float r = 1.0f / safe;
    uint8_t bucket[kChunk];
    for (int64_t c = start; c < start + len; c += kChunk) {  // blocks start at even indices
      const T* x = A + c;
      const int64_t m = std::min(kChunk, start + len - c);
      if (full) {
        for (int64_t i = 0; i < m; ++i)
          bucket[i] = bucket_of(clamp1(static_cast<float>(x[i]) * r), bk.bounds);
      } else {
        for (int64_t i = 0; i < m; ++i)
          bucket[i] = bucket_of(clamp1(static_cast<float>(x[i]) / safe), bk.bounds);
      }
      uint8_t* p = packed + c / 2;
      for (int64_t i = 0; i + 1 < m; i += 2)
        p[i / 2] = pack_codes(bk.code[bucket[i]], bk.code[bucket[i + 1]]);
      if (m & 1) p[m / 2] = pack_codes(bk.code[bucket[m - 1]], zero_code);  // only at the very end
    }
  }
}

// AVX-512 decode of 16 codes per step: one vpermps against the table, one fp32 multiply (the same
// single rounding as the scalar path), then a round-to-nearest-even store in T. Returns how many
// elements it wrote (a multiple of 16); the caller finishes the rest.
template <typename T>
__attribute__((target("avx512f"))) int64_t dequantize_block_avx512(const uint8_t* p, int64_t len,
                                                                   float scale, const float* table,
                                                                   T* o) {
  const __m512 lut = _mm512_loadu_ps(table), vscale = _mm512_set1_ps(scale);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2));
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low4),
                                            _mm_and_si128(raw, low4));
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut), vscale);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(o + i, v);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // bf16, round to nearest even (values are finite: table × finite absmax)
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_srli_epi32(
          _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm512_cvtepi32_epi16(r));
    }
  }
  return i;
}

template <typename T>
void dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                     const float* absmax2, const float* code8, float offset, int quant_type,
                     int64_t blocksize, int64_t n, T* out) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const bool simd = has_avx512();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const float scale = absmax_q ? decode_absmax(absmax_q, absmax2, code8, offset, b) : absmax[b];
    const int64_t len = std::min(blocksize, n - b * blocksize);
    const uint8_t* p = packed + b * blocksize / 2;
    T* o = out + b * blocksize;
    const int64_t done = simd ? dequantize_block_avx512<T>(p, len, scale, table, o) : 0;
    for (int64_t j = done / 2; j < len / 2; ++j) {
      const uint8_t byte = p[j];
      o[2 * j] = static_cast<T>(table[high_code(byte)] * scale);
      o[2 * j + 1] = static_cast<T>(table[low_code(byte)] * scale);
    }
    if (len & 1) o[len - 1] = static_cast<T>(table[high_code(p[len / 2])] * scale);
  }
}

#define PEFTKERN_INSTANTIATE(T)                                                                \
  template void quantize_4bit<T>(const T*, int64_t, int, int64_t, uint8_t*, float*);           \
  template void dequantize_4bit<T>(const uint8_t*, const float*, const uint8_t*, const float*, \
                                   const float*, float, int, int64_t, int64_t, T*);
PEFTKERN_INSTANTIATE(float)
PEFTKERN_INSTANTIATE(c10::Half)
PEFTKERN_INSTANTIATE(c10::BFloat16)

}  // namespace peftkern::cpu
