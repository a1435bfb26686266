// CPU fused QLoRA GEMV for small batches (decode, M <= 16):
//   y[m, n] = sum_k x[m, k] * table[code(n, k)] * absmax(n, k) + bias[n] + s * sum_r xa[m, r] * B[n, r]
// Each packed byte is read once; 16 codes at a time are decoded by a 16-entry table lookup in
// AVX2 registers (permutevar8x32 on the two halves of the table), and every decoded vector is
// used for all M rows of x. The block scale (plain or double-quantized absmax) is applied once per
// block to the partial sums. OpenMP across output features. AVX-512 or AVX2/FMA is chosen at run
// time; the scalar loop is the fallback. Requires in_features % blocksize == 0 (blocks never span rows).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu_features.h"
#include "peftkern/codes.h"
#include "qlora_gemv.h"

namespace peftkern::cpu {
namespace {

struct Scales {
  const float* absmax; const uint8_t* absmax_q; const float* absmax2; const float* code8;
  float offset;
  float operator()(int64_t block) const {
    return absmax_q ? decode_absmax(absmax_q, absmax2, code8, offset, block) : absmax[block];
  }
};

// The epilogue shared by both paths: bias and the low-rank term.
inline float epilogue(const GemvArgs& a, int64_t m, int64_t n, float acc) {
  if (a.bias) acc += a.bias[n];
  if (a.xa) {
    float lora = 0.0f;
    for (int64_t r = 0; r < a.R; ++r) lora += a.xa[m * a.R + r] * a.lora_B[n * a.R + r];
    acc += a.scaling * lora;
  }
  return acc;
}

void gemv_scalar(const GemvArgs& a, const Scales& scale) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(a.quant_type, i);
  const int64_t K = a.K, bs = a.blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += bs) {
        float lanes[16] = {0.0f};  // 16 partial sums, like the SIMD paths: error ~ bs/16, not bs
        for (int64_t k = k0; k < k0 + bs; ++k) {
          const int64_t i = n * K + k;
          lanes[k & 15] += a.x[m * K + k] * table[unpack_code(a.packed[i / 2], i & 1)];
        }
        float part = 0.0f;
        for (float l : lanes) part += l;
        acc += part * scale((n * K + k0) / bs);
      }
      a.y[m * a.N + n] = epilogue(a, m, n, acc);
    }
  }
}

__attribute__((target("avx2,fma"))) inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma"))) void gemv_avx2(const GemvArgs& a, const Scales& scale) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(a.quant_type, i);
  const __m256 lut_lo = _mm256_loadu_ps(table), lut_hi = _mm256_loadu_ps(table + 8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t K = a.K, M = a.M, bs = a.blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    const uint8_t* row = a.packed + n * K / 2;
    float acc[kMaxGemvRows] = {0.0f};
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
      __m256 part[kMaxGemvRows];
      for (int64_t m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k0 + bs; k += 16) {
        // 8 bytes -> 16 codes in flat order (high nibble first)
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low4),
                                                _mm_and_si128(raw, low4));
        const __m256 w0 = lut16(_mm256_cvtepu8_epi32(codes), lut_lo, lut_hi);
        const __m256 w1 = lut16(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), lut_lo, lut_hi);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = a.x + m * K + k;
          part[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w0, part[m]);
          part[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w1, part[m]);
        }
      }
      const float s = scale((n * K + k0) / bs);
      for (int64_t m = 0; m < M; ++m) acc[m] += hsum(part[m]) * s;
    }
    for (int64_t m = 0; m < M; ++m) a.y[m * a.N + n] = epilogue(a, m, n, acc[m]);
  }
}

// AVX-512: one vpermps decodes 16 codes from the table held in a single register. Rows of x go in
// tiles of M <= 8 (a template parameter), so that 2·M accumulators stay in registers; block scales
// fold in with one FMA.
constexpr int kRowTile = 8;

template <int M>
__attribute__((target("avx512f"))) void gemv_avx512(const GemvArgs& a, const Scales& scale,
                                                     int64_t m0) {
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = code_value(a.quant_type, i);
  const __m512 lut = _mm512_loadu_ps(table);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t K = a.K, bs = a.blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    const uint8_t* row = a.packed + n * K / 2;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k0 + bs; k += 16) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low4),
                                                _mm_and_si128(raw, low4));
        const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut);
        for (int m = 0; m < M; ++m)
          part[m] = _mm512_fmadd_ps(_mm512_loadu_ps(a.x + (m0 + m) * K + k), w, part[m]);
      }
      const __m512 s = _mm512_set1_ps(scale((n * K + k0) / bs));
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
    }
    for (int m = 0; m < M; ++m)
      a.y[(m0 + m) * a.N + n] = epilogue(a, m0 + m, n, _mm512_reduce_add_ps(acc[m]));
  }
}

template <int M>
void gemv_avx512_tile(const GemvArgs& a, const Scales& scale, int64_t m0, int64_t rows) {
  if constexpr (M > 1) {
    if (rows < M) return gemv_avx512_tile<M - 1>(a, scale, m0, rows);  // the runtime tile height
  }
  gemv_avx512<M>(a, scale, m0);
}

void gemv_avx512_all(const GemvArgs& a, const Scales& scale) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kRowTile)
    gemv_avx512_tile<kRowTile>(a, scale, m0, std::min<int64_t>(kRowTile, a.M - m0));
}

}  // namespace

void qlora_gemv(const GemvArgs& a, int simd_level) {
  const Scales scale{a.absmax, a.absmax_q, a.absmax2, a.code8, a.offset};
  if (simd_level >= 2 && has_avx512()) {
    gemv_avx512_all(a, scale);
  } else if (simd_level >= 1 && has_avx2()) {
    gemv_avx2(a, scale);
  } else {
    gemv_scalar(a, scale);
  }
}

}  // namespace peftkern::cpu
