// CPU fused QLoRA GEMV for small batches (decode, M <= 16):
//   y[m, n] = sum_k x[m, k] * table[code(n, k)] * absmax(n, k) + bias[n] + s * sum_r xa[m, r] * B[n, r]
// Each packed byte is read once and decoded by table lookups in registers (vpshufb on AVX2, vpermps
// on AVX-512); every decoded vector is used for a tile of rows of x. The block scale (plain or
// double-quantized absmax) is applied once per block to the partial sums. On AVX2 from
// kTiledMinRows rows of x on, the decoded weights go through L1 to a register-blocked
// micro-kernel instead (Avx2::run_tiled). OpenMP across output features. AVX-512 or AVX2/FMA is
// chosen at run time; the scalar loop is the fallback.
// Requires in_features % blocksize == 0 (blocks never span rows).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "peftkern/codes.h"
#include "qlora_gemv.h"

namespace peftkern::cpu {
namespace {

// AVX2: from this M on, decode into L1 + micro-kernel (measured on a 2-core EPYC, 4096x4096: at
// M = 4 the two paths tie, at M = 16 the tiled one takes 0.6x the time).
constexpr int64_t kTiledMinRows = 5;

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
#pragma omp parallel for schedule(static) if (a.M * a.N * a.K >= kParallelMinWork)
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

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The SIMD paths: OpenMP threads split the output features and stream W row by row (walking K
// in chunks across all rows instead measured 2-3x slower here: 128-byte reads at a 2 KB stride defeat
// the prefetcher). Rows of x go in tiles of M (a template parameter) so that the accumulators stay
// in registers; each decoded weight vector serves the whole tile, and block scales fold in with
// one FMA per block. The two ISA structs repeat the loop skeleton because each needs its own
// target attribute: GCC will not inline AVX intrinsics into a shared un-attributed template.

// AVX2 decodes 32 codes (16 bytes) with 4 vpshufb table lookups, one per byte of the fp32 table
// values, and 8 unpacks that reassemble the floats. The floats come out in the lane order
// [0,2,4,6,1,3,5,7] within each 8 codes, so x is permuted to match once per call (x_lane_order).
struct Avx2 {
  static constexpr int kTile = 4;  // 16 ymm registers: 2M accumulators + decoded weights
  __m256i tb[4];                   // byte j of each of the 16 fp32 table values, in both lanes

  __attribute__((target("avx2"))) explicit Avx2(int quant_type) {
    alignas(32) uint8_t bytes[4][32];
    for (int i = 0; i < 16; ++i) {
      const float v = code_value(quant_type, i);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int j = 0; j < 4; ++j) bytes[j][i] = bytes[j][i + 16] = uint8_t(bits >> (8 * j));
    }
    for (int j = 0; j < 4; ++j) tb[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  }

  // 16 bytes -> 32 floats. Lane 0 of the index vector holds the high nibbles (even codes), lane 1
  // the low nibbles (odd codes); w[j] then holds codes 8j..8j+7 as [0,2,4,6 | 1,3,5,7].
  __attribute__((target("avx2"))) inline void decode32(const uint8_t* p, __m256 w[4]) const {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i idx = _mm256_set_m128i(_mm_and_si128(raw, low4),
                                         _mm_and_si128(_mm_srli_epi16(raw, 4), low4));
    const __m256i b0 = _mm256_shuffle_epi8(tb[0], idx), b1 = _mm256_shuffle_epi8(tb[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(tb[2], idx), b3 = _mm256_shuffle_epi8(tb[3], idx);
    const __m256i lo_a = _mm256_unpacklo_epi8(b0, b1), lo_b = _mm256_unpackhi_epi8(b0, b1);
    const __m256i hi_a = _mm256_unpacklo_epi8(b2, b3), hi_b = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo_a, hi_a));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo_a, hi_a));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo_b, hi_b));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo_b, hi_b));
  }

  // y[m0..m0+M, n] = x[m0..m0+M, :] . W[n, :]
  template <int M>
  __attribute__((target("avx2,fma"))) void run(const GemvArgs& a, const Scales& scale, int64_t m0,
                                               int64_t n) const {
    const int64_t K = a.K, bs = a.blocksize;
    const uint8_t* row = a.packed + n * K / 2;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t kb = 0; kb < K; kb += bs) {
      __m256 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t k = kb; k < kb + bs; k += 32) {
        __m256 w[4];
        decode32(row + k / 2, w);
        for (int m = 0; m < M; ++m) {
          const float* xm = a.x + (m0 + m) * K + k;
          for (int j = 0; j < 4; ++j)
            part[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8 * j), w[j], part[m]);
        }
      }
      const __m256 s = _mm256_set1_ps(scale((n * K + kb) / bs));
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(part[m], s, acc[m]);
    }
    for (int m = 0; m < M; ++m) a.y[(m0 + m) * a.N + n] = hsum(acc[m]);
  }

  // x in decode32's lane order: within each 8 values, [0,2,4,6,1,3,5,7] (K % 32 == 0 here), and
  // stored chunk by chunk: chunk [k0, k0 + len) holds x[m, k0 + i] at k0 * M + m * len + i. With
  // chunk >= K that is plain row-major [M, K].
  static std::vector<float> x_lane_order(const GemvArgs& a, int64_t chunk) {
    static constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    std::vector<float> xp(a.M * a.K);
    for (int64_t k0 = 0; k0 < a.K; k0 += chunk) {
      const int64_t len = std::min(chunk, a.K - k0);
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t i = 0; i < len; i += 8)
          for (int j = 0; j < 8; ++j)
            xp[k0 * a.M + m * len + i + j] = a.x[m * a.K + k0 + i + kOrder[j]];
    }
    return xp;
  }

  // ---- larger batches (kTiledMinRows <= M <= 16): decode once into L1, then a GEMM micro-kernel.
  // Decoding in registers for every tile of 4 rows of x costs 4 decodes per weight at M = 16, and
  // the x rows stream from L2. Instead, kWRows rows of W are decoded (and scaled) kChunk codes at a
  // time into a 4 KB buffer, and a register-blocked kernel multiplies kXRows rows of x by them:
  // 12 accumulators, 7 loads per 12 FMAs. x is stored chunk-major (x_lane_order) so that a chunk
  // of all M rows is contiguous in L1 instead of M lines 4 KB apart in the same cache sets.
  static constexpr int kWRows = 4, kXRows = 3;
  static constexpr int64_t kChunk = 256;

  // w[r * kChunk + i] = deq(W)[n + r, k0 + i] in lane order, for r < rows (others stay zero).
  __attribute__((target("avx2,fma"))) void decode_rows(const GemvArgs& a, const Scales& scale,
                                                       int64_t n, int64_t rows, int64_t k0,
                                                       int64_t len, float* w) const {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t flat = (n + r) * a.K + k0;  // 32-code groups never span an absmax block
      for (int64_t i = 0; i < len; i += 32) {
        __m256 v[4];
        decode32(a.packed + (flat + i) / 2, v);
        const __m256 s = _mm256_set1_ps(scale((flat + i) / a.blocksize));
        for (int j = 0; j < 4; ++j)
          _mm256_store_ps(w + r * kChunk + i + 8 * j, _mm256_mul_ps(v[j], s));
      }
    }
  }

  // acc[i * kWRows + j] += x[i, :len] * w[j, :len] (8 lanes each), for MX rows of x.
  template <int MX>
  __attribute__((target("avx2,fma"))) static void micro(const float* x, int64_t len, const float* w,
                                                        __m256* acc) {
    __m256 c[MX][kWRows];
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) c[i][j] = acc[i * kWRows + j];
    for (int64_t k = 0; k < len; k += 8) {
      __m256 xv[MX];
      for (int i = 0; i < MX; ++i) xv[i] = _mm256_loadu_ps(x + i * len + k);
      for (int j = 0; j < kWRows; ++j) {
        const __m256 wv = _mm256_load_ps(w + j * kChunk + k);
        for (int i = 0; i < MX; ++i) c[i][j] = _mm256_fmadd_ps(xv[i], wv, c[i][j]);
      }
    }
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) acc[i * kWRows + j] = c[i][j];
  }

  // y[:, n .. n + rows) for all M rows of x (x in x_lane_order(a, kChunk) layout).
  __attribute__((target("avx2,fma"))) void run_tiled(const GemvArgs& a, const Scales& scale,
                                                     int64_t n, int64_t rows) const {
    alignas(32) float w[kWRows * kChunk];
    std::fill(w + rows * kChunk, w + kWRows * kChunk, 0.0f);  // rows past N: never written
    __m256 acc[kMaxGemvRows * kWRows];
    for (auto& v : acc) v = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
      const int64_t len = std::min(kChunk, a.K - k0);
      decode_rows(a, scale, n, rows, k0, len, w);
      const float* xc = a.x + k0 * a.M;
      int64_t m0 = 0;
      for (; m0 + kXRows <= a.M; m0 += kXRows)
        micro<kXRows>(xc + m0 * len, len, w, acc + m0 * kWRows);
      if (a.M - m0 == 2) micro<2>(xc + m0 * len, len, w, acc + m0 * kWRows);
      if (a.M - m0 == 1) micro<1>(xc + m0 * len, len, w, acc + m0 * kWRows);
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n + r] = hsum(acc[m * kWRows + r]);
  }
};

// AVX-512: one vpermps decodes 16 codes from the table held in a single register.
struct Avx512 {
  static constexpr int kTile = 8;
  float table[16];

  explicit Avx512(int quant_type) {
    for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  }

  template <int M>
  __attribute__((target("avx512f"))) void run(const GemvArgs& a, const Scales& scale, int64_t m0,
                                              int64_t n) const {
    const __m512 lut = _mm512_loadu_ps(table);
    const int64_t K = a.K, bs = a.blocksize;
    const uint8_t* row = a.packed + n * K / 2;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < K; kb += bs) {
      __m512 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t k = kb; k < kb + bs; k += 16) {
        const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes16(row + k / 2)), lut);
        for (int m = 0; m < M; ++m)
          part[m] = _mm512_fmadd_ps(_mm512_loadu_ps(a.x + (m0 + m) * K + k), w, part[m]);
      }
      const __m512 s = _mm512_set1_ps(scale((n * K + kb) / bs));
      for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
    }
    for (int m = 0; m < M; ++m) a.y[(m0 + m) * a.N + n] = _mm512_reduce_add_ps(acc[m]);
  }
};

template <class Isa, int M>
void run_tile(const Isa& isa, const GemvArgs& a, const Scales& scale, int64_t m0, int64_t rows,
              int64_t n) {
  if constexpr (M > 1) {
    if (rows < M) return run_tile<Isa, M - 1>(isa, a, scale, m0, rows, n);  // runtime height
  }
  isa.template run<M>(a, scale, m0, n);
}

template <class Isa>
void run_rows(const GemvArgs& a, const Scales& scale) {
  const Isa isa(a.quant_type);  // read-only tables, shared by the threads
#pragma omp parallel for schedule(static) if (a.M * a.N * a.K >= kParallelMinWork)
  for (int64_t n = 0; n < a.N; ++n) {
    for (int64_t m0 = 0; m0 < a.M; m0 += Isa::kTile)
      run_tile<Isa, Isa::kTile>(isa, a, scale, m0, std::min<int64_t>(Isa::kTile, a.M - m0), n);
    for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] = epilogue(a, m, n, a.y[m * a.N + n]);
  }
}

void run_tiled_avx2(const GemvArgs& a, const Scales& scale) {
  const Avx2 isa(a.quant_type);
  const int64_t blocks = (a.N + Avx2::kWRows - 1) / Avx2::kWRows;
#pragma omp parallel for schedule(static) if (a.M * a.N * a.K >= kParallelMinWork)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = b * Avx2::kWRows, rows = std::min<int64_t>(Avx2::kWRows, a.N - n);
    isa.run_tiled(a, scale, n, rows);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t r = n; r < n + rows; ++r) a.y[m * a.N + r] = epilogue(a, m, r, a.y[m * a.N + r]);
  }
}

}  // namespace

void qlora_gemv(const GemvArgs& a, int simd_level) {
  const Scales scale{a.absmax, a.absmax_q, a.absmax2, a.code8, a.offset};
  if (simd_level >= 2 && has_avx512()) {
    run_rows<Avx512>(a, scale);
  } else if (simd_level >= 1 && has_avx2()) {
    const bool tiled = a.M >= kTiledMinRows;
    const std::vector<float> xp = Avx2::x_lane_order(a, tiled ? Avx2::kChunk : a.K);
    GemvArgs permuted = a;
    permuted.x = xp.data();
    if (tiled) run_tiled_avx2(permuted, scale);
    else run_rows<Avx2>(permuted, scale);
  } else {
    gemv_scalar(a, scale);
  }
}

}  // namespace peftkern::cpu
