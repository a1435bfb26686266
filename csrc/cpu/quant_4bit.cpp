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
#pragma omp parallel for schedule(static) if (n >= kParallelMinWork)
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

// Round fp32 to bf16, nearest even, as c10::BFloat16 does (NaN -> 0x7FC0).
__attribute__((target("avx512f"))) inline __m256i bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The same on AVX2, each result in the low half of its 32-bit lane.
__attribute__((target("avx2"))) inline __m256i bf16_avx2_32(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                            _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// SIMD decode of one quantization block: table lookup by register permutes, one fp32 multiply
// (the same single rounding as the scalar path), then a round-to-nearest-even store in T.
// Each returns how many elements it wrote (a multiple of 16); the caller finishes the rest.

// AVX-512: 16 codes per step, one vpermps against the 16-entry table.
template <typename T>
__attribute__((target("avx512f"))) int64_t dequantize_block_avx512(const uint8_t* p, int64_t len,
                                                                   float scale, const float* table,
                                                                   T* o) {
  const __m512 lut = _mm512_loadu_ps(table), vscale = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m128i codes = codes16(p + i / 2);
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut), vscale);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(o + i, v);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), bf16_avx512(v));
    }
  }
  return i;
}

// AVX2: 8 codes per lookup; vpermps indexes 8 entries, so two lookups (table halves) and a blend
// on bit 3 of the code. The low 8 bytes of codes8 -> 8 scaled floats.
__attribute__((target("avx2"))) inline __m256 lookup8_avx2(__m128i codes8, __m256 lo_table,
                                                            __m256 hi_table, __m256 scale) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes8);
  const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_table, idx),
                                    _mm256_permutevar8x32_ps(hi_table, idx),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  return _mm256_mul_ps(v, scale);
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) int64_t dequantize_block_avx2(const uint8_t* p,
                                                                        int64_t len, float scale,
                                                                        const float* table, T* o) {
  const __m256 lo_table = _mm256_loadu_ps(table), hi_table = _mm256_loadu_ps(table + 8);
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m128i codes = codes16(p + i / 2);
    const __m256 a = lookup8_avx2(codes, lo_table, hi_table, vscale);
    const __m256 b = lookup8_avx2(_mm_srli_si128(codes, 8), lo_table, hi_table, vscale);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(o + i, a);
      _mm256_storeu_ps(o + i + 8, b);
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          _mm256_set_m128i(_mm256_cvtps_ph(b, mode), _mm256_cvtps_ph(a, mode)));
    } else {  // pack 2 x 8 bf16 (packus works per 128-bit lane, so restore the order after)
      const __m256i packed = _mm256_packus_epi32(bf16_avx2_32(a), bf16_avx2_32(b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          _mm256_permute4x64_epi64(packed, 0xD8));
    }
  }
  return i;
}

template <typename T>
void dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                     const float* absmax2, const float* code8, float offset, int quant_type,
                     int64_t blocksize, int64_t n, T* out, int simd_level) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int isa = simd_level >= 2 && has_avx512() ? 2 : simd_level >= 1 && has_avx2() ? 1 : 0;
#pragma omp parallel for schedule(static) if (n >= kParallelMinWork)
  for (int64_t b = 0; b < nblocks; ++b) {
    const float scale = absmax_q ? decode_absmax(absmax_q, absmax2, code8, offset, b) : absmax[b];
    const int64_t len = std::min(blocksize, n - b * blocksize);
    const uint8_t* p = packed + b * blocksize / 2;
    T* o = out + b * blocksize;
    const int64_t done = isa == 2   ? dequantize_block_avx512<T>(p, len, scale, table, o)
                         : isa == 1 ? dequantize_block_avx2<T>(p, len, scale, table, o)
                                    : 0;
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
                                   const float*, float, int, int64_t, int64_t, T*, int);
PEFTKERN_INSTANTIATE(float)
PEFTKERN_INSTANTIATE(c10::Half)
PEFTKERN_INSTANTIATE(c10::BFloat16)

}  // namespace peftkern::cpu
