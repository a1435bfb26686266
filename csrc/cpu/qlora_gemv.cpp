// CPU fused QLoRA GEMV for small batches (decode, M <= 16):
//   y[m, n] = sum_k x[m, k] * table[code(n, k)] * absmax(n, k) + bias[n] + s * sum_r xa[m, r] * B[n, r]
// Below kTiledMinRows rows of x, each packed byte is read once and decoded by table lookups in
// registers (vpshufb on AVX2, vpermps on AVX-512); every decoded vector is used for a tile of rows
// of x, and the block scale (plain or double-quantized absmax) is applied once per block to the
// partial sums. From kTiledMinRows on, the decoded weights go through L1 to a register-blocked
// micro-kernel instead: fp32 FMAs (Avx2::run_tiled; Avx512::run_tiled on Intel). When the
// caller computes in bf16 and the CPU has AVX512-BF16, bf16 dot products (vdpbf16ps, Avx512Bf16)
// at every M: on groups decoded in registers below kBf16TiledMinRows, tiled from it on. With
// AMX-BF16 and bf16 compute, every M runs on the tile unit instead (Amx). OpenMP across output
// features. `choose` picks the path at run time; the scalar loop is the fallback.
// Requires in_features % blocksize == 0 (blocks never span rows).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "peftkern/codes.h"
#include "qlora_gemv.h"

namespace peftkern::cpu {
namespace {

// AVX2: from this M on, decode into L1 + micro-kernel (measured on a 2-core EPYC, 4096x4096: at
// M = 4 the two paths tie, at M = 16 the tiled one takes 0.6x the time).
constexpr int64_t kTiledMinRows = 5;
// AMX (bf16 compute): from this M on, i.e. whenever there is a row (M = 0 would configure
// empty tiles). Measured on a 2-core Intel Xeon with AMX,
// 4096x4096 NF4 + double quant, two threads: M=1 0.46 ms against the AVX-512 row path's 0.82;
// M=2 0.45, M=4 0.49, M=8 0.53, M=16 0.64 ms (vdpbf16ps at M=16: ~3 ms).
constexpr int64_t kAmxMinRows = 1;
// AVX512-BF16 (bf16 compute, no AMX): below this M, vdpbf16ps on groups decoded in registers
// (Avx512Bf16::run_few); from it on, the tiled path. Measured on a 2-core Zen 4 EPYC VM, 4096x4096
// NF4, the kernel alone, two threads, 8 weights in turn, back to back: run_few M=1 0.52-0.54,
// M=2 0.55-0.58, M=3 0.65-0.66, M=4 0.73-0.75 ms; tiled M=1..4 1.12-1.36, M=5 1.39-1.46 (the fp32
// AVX-512 rows, bf16 M=1 before: 1.17-1.25). run_few beyond 4 rows (GCC no longer unrolls it)
// showed no clear gain.
constexpr int64_t kBf16TiledMinRows = 5;

struct Scales {
  const float* absmax; const uint8_t* absmax_q; const float* absmax2; const float* code8;
  float offset;
  int shift;  // log2(blocksize): a shift, not a 64-bit division per 32 codes (that took a third of the
              // AMX path's time: 1.14 -> 0.76 ms, M=1, 4096x4096, warm)
  float operator()(int64_t block) const {
    return absmax_q ? decode_absmax(absmax_q, absmax2, code8, offset, block) : absmax[block];
  }
  int64_t block_of(int64_t flat) const { return flat >> shift; }  // flat: index into W's codes
  float at(int64_t flat) const { return (*this)(block_of(flat)); }
};

// The epilogue shared by both paths: bias and the low-rank term (unless the path added that to
// its accumulators: `lora` false).
inline float epilogue(const GemvArgs& a, int64_t m, int64_t n, float acc, bool lora = true) {
  if (a.bias) acc += a.bias[n];
  if (a.xa && lora) {
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
        acc += part * scale.at(n * K + k0);
      }
      a.y[m * a.N + n] = epilogue(a, m, n, acc);
    }
  }
}

// x stored chunk by chunk: chunk [k0, k0 + len) holds x[m, k0 + i] at k0 * M + m * len + i (with
// chunk >= K that is plain row-major [M, K]), and within each 8 values in the order `order8`
// (nullptr: as they are; K % 8 == 0 otherwise). The tiled paths read a chunk of all M rows
// contiguously from L1 instead of M lines 4 KB apart in the same cache sets. 64-byte aligned:
// with malloc's 16 bytes every zmm load of x split across two cache lines (1.6x slower at M=16).
struct XChunked {
  std::vector<float> buf;
  float* data;
  XChunked(const GemvArgs& a, int64_t chunk, const int* order8) : buf(a.M * a.K + 16) {
    data = buf.data() + (16 - (reinterpret_cast<uintptr_t>(buf.data()) / 4) % 16) % 16;
    for (int64_t k0 = 0; k0 < a.K; k0 += chunk) {
      const int64_t len = std::min(chunk, a.K - k0);
      for (int64_t m = 0; m < a.M; ++m) {
        const float* src = a.x + m * a.K + k0;
        float* dst = data + k0 * a.M + m * len;
        if (!order8) {
          std::copy(src, src + len, dst);
          continue;
        }
        for (int64_t i = 0; i < len; i += 8)
          for (int j = 0; j < 8; ++j) dst[i + j] = src[i + order8[j]];
      }
    }
  }
};

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The row paths prefetch the streamed codes kPrefetchBytes ahead, one 64-byte line per 128 codes:
// on a 2-core Intel Xeon VM (M=1, 4096x4096, weights read from memory, not cache) the hardware
// prefetcher alone reached ~4 GB/s, half the warm-cache speed; 2 KB ahead matched warm (1 KB:
// 1.0 ms, 512 B: 1.26 ms, 2-4 KB: 0.93 ms, against 0.88 ms warm and 1.98 ms without).
constexpr int64_t kPrefetchBytes = 2048;

// The row paths' independent FMA chains per row of x within a block: a single row of x would
// otherwise wait on the FMA latency every step (M=1, 4096x4096 fp32, two threads of a Zen 4
// EPYC VM, kernel alone: AVX-512 0.71 -> 0.58 ms; AVX2 0.71 -> 0.67-0.72, within noise).
template <int M>
constexpr int kChains = M == 1 ? 2 : 1;  // 4 on AVX2: slower (16 ymm registers)

// The SIMD paths: OpenMP threads split the output features and stream W row by row (walking K
// in chunks across all rows instead measured 2-3x slower here: 128-byte reads at a 2 KB stride defeat
// the prefetcher). Rows of x go in tiles of M (a template parameter) so that the accumulators stay
// in registers; each decoded weight vector serves the whole tile, and block scales fold in with
// one FMA per block. The two ISA structs repeat the loop skeleton because each needs its own
// target attribute: GCC will not inline AVX intrinsics into a shared un-attributed template.

// AVX2 decodes 32 codes (16 bytes) with 4 vpshufb table lookups, one per byte of the fp32 table
// values, and 8 unpacks that reassemble the floats. The floats come out in the lane order
// [0,2,4,6,1,3,5,7] within each 8 codes, so x is permuted to match once per call (kLaneOrder).
struct Avx2 {
  static constexpr int kTile = 4;  // 16 ymm registers: 2M accumulators + decoded weights
  static constexpr int kLaneOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // decode32's, within 8 codes
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
      __m256 part[M][kChains<M>];
      for (auto& p : part)
        for (auto& v : p) v = _mm256_setzero_ps();
      for (int64_t k = kb; k < kb + bs; k += 32) {
        __m256 w[4];
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2) + kPrefetchBytes, _MM_HINT_T0);
        decode32(row + k / 2, w);
        for (int m = 0; m < M; ++m) {
          const float* xm = a.x + (m0 + m) * K + k;
          for (int j = 0; j < 4; ++j) {
            __m256& p = part[m][j % kChains<M>];
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8 * j), w[j], p);
          }
        }
      }
      const __m256 s = _mm256_set1_ps(scale.at(n * K + kb));
      for (int m = 0; m < M; ++m) {
        __m256 sum = part[m][0];
        for (int c = 1; c < kChains<M>; ++c) sum = _mm256_add_ps(sum, part[m][c]);
        acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) a.y[(m0 + m) * a.N + n] = hsum(acc[m]);
  }

  // ---- larger batches (kTiledMinRows <= M <= 16): decode once into L1, then a GEMM micro-kernel.
  // Decoding in registers for every tile of 4 rows of x costs 4 decodes per weight at M = 16, and
  // the x rows stream from L2. Instead, kWRows rows of W are decoded (and scaled) kChunk codes at a
  // time into a 4 KB buffer, and a register-blocked kernel multiplies kXRows rows of x by them:
  // 12 accumulators, 7 loads per 12 FMAs. x is stored chunk-major (XChunked).
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
        const __m256 s = _mm256_set1_ps(scale.at(flat + i));
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

  // y[:, n .. n + rows) for all M rows of x (x in XChunked(a, kChunk, kLaneOrder) layout).
  __attribute__((target("avx2,fma"))) void run_tiled(const GemvArgs& a, const float* x,
                                                     const Scales& scale, int64_t n,
                                                     int64_t rows) const {
    alignas(32) float w[kWRows * kChunk];
    std::fill(w + rows * kChunk, w + kWRows * kChunk, 0.0f);  // rows past N: never written
    __m256 acc[kMaxGemvRows * kWRows];
    for (auto& v : acc) v = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
      const int64_t len = std::min(kChunk, a.K - k0);
      decode_rows(a, scale, n, rows, k0, len, w);
      const float* xc = x + k0 * a.M;
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
      __m512 part[M][kChains<M>];
      for (auto& p : part)
        for (auto& v : p) v = _mm512_setzero_ps();
      for (int64_t k = kb; k < kb + bs; k += 32) {  // blocks of >= 32 codes
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2) + kPrefetchBytes, _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes16(row + k / 2 + 8 * h)), lut);
          for (int m = 0; m < M; ++m) {
            __m512& p = part[m][h % kChains<M>];
            p = _mm512_fmadd_ps(_mm512_loadu_ps(a.x + (m0 + m) * K + k + 16 * h), w, p);
          }
        }
      }
      const __m512 s = _mm512_set1_ps(scale.at(n * K + kb));
      for (int m = 0; m < M; ++m) {
        __m512 sum = part[m][0];
        for (int c = 1; c < kChains<M>; ++c) sum = _mm512_add_ps(sum, part[m][c]);
        acc[m] = _mm512_fmadd_ps(sum, s, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) a.y[(m0 + m) * a.N + n] = _mm512_reduce_add_ps(acc[m]);
  }

  // ---- larger batches, fp32 (Intel: two 512-bit FMA ports): Avx2's tiled scheme in zmm. kWRows
  // rows of W decode (and scale) kChunk codes at a time into L1 in element order, and a 6 x 4
  // register block of x rows by W rows takes 10 loads per 24 FMAs.
  static constexpr int kWRows = 4, kXRows = 6;
  static constexpr int64_t kChunk = 256;

  __attribute__((target("avx512f"))) void decode_rows(const GemvArgs& a, const Scales& scale,
                                                      int64_t n, int64_t rows, int64_t k0,
                                                      int64_t len, float* w) const {
    const __m512 lut = _mm512_loadu_ps(table);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t flat = (n + r) * a.K + k0;  // 32-code groups never span an absmax block
      for (int64_t i = 0; i < len; i += 32) {
        const __m512 s = _mm512_set1_ps(scale.at(flat + i));
        const uint8_t* p = a.packed + (flat + i) / 2;
        if ((i & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes16(p + 8 * h)), lut);
          _mm512_store_ps(w + r * kChunk + i + 16 * h, _mm512_mul_ps(v, s));
        }
      }
    }
  }

  template <int MX>
  __attribute__((target("avx512f"))) static void micro(const float* x, int64_t len, const float* w,
                                                       __m512* acc) {
    __m512 c[MX][kWRows];
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) c[i][j] = acc[i * kWRows + j];
    for (int64_t k = 0; k < len; k += 16) {
      __m512 wv[kWRows];
      for (int j = 0; j < kWRows; ++j) wv[j] = _mm512_load_ps(w + j * kChunk + k);
      for (int i = 0; i < MX; ++i) {
        const __m512 xv = _mm512_load_ps(x + i * len + k);
        for (int j = 0; j < kWRows; ++j) c[i][j] = _mm512_fmadd_ps(xv, wv[j], c[i][j]);
      }
    }
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) acc[i * kWRows + j] = c[i][j];
  }

  // y[:, n .. n + rows) for all M rows of x (x in XChunked(a, kChunk, nullptr) layout).
  void run_tiled(const GemvArgs& a, const float* x, const Scales& scale, int64_t n,
                 int64_t rows) const;
};

// The fp32 AVX-512 tiled loop: per kChunk codes, kWRows rows of W decoded into L1, then micro
// over kXRows-row tiles of x (the last tile, 1 to kXRows - 1 rows, by its own instance), sums
// reduced at the end.
template <int MX>
__attribute__((target("avx512f"))) void avx512_micro_rest(const float* xc, int64_t M, int64_t m0,
                                                          int64_t len, const float* w, __m512* acc) {
  if constexpr (MX > 0) {
    if (M - m0 == MX) return Avx512::micro<MX>(xc + m0 * len, len, w, acc + m0 * Avx512::kWRows);
    avx512_micro_rest<MX - 1>(xc, M, m0, len, w, acc);
  }
}

__attribute__((target("avx512f"))) void Avx512::run_tiled(const GemvArgs& a, const float* x,
                                                          const Scales& scale, int64_t n,
                                                          int64_t rows) const {
  alignas(64) float w[kWRows * kChunk];
  std::fill(w + rows * kChunk, w + kWRows * kChunk, 0.0f);  // rows past N: never written
  __m512 acc[kMaxGemvRows * kWRows];
  for (auto& v : acc) v = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
    const int64_t len = std::min(kChunk, a.K - k0);
    decode_rows(a, scale, n, rows, k0, len, w);
    const float* xc = x + k0 * a.M;
    int64_t m0 = 0;
    for (; m0 + kXRows <= a.M; m0 += kXRows) micro<kXRows>(xc + m0 * len, len, w, acc + m0 * kWRows);
    avx512_micro_rest<kXRows - 1>(xc, a.M, m0, len, w, acc);
  }
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[m * kWRows + r]);
}

// The scales of one row's blocks [first, first + count), 0 < count <= 16, in a vector (lanes past
// count: 0). Double-quantized: code8[q] * absmax2[block / 256] + offset, rounded twice, as bnb.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 scales16(const Scales& scale,
                                                                            int64_t first,
                                                                            int64_t count) {
  const __mmask16 live = __mmask16((1u << count) - 1);
  if (!scale.absmax_q) return _mm512_maskz_loadu_ps(live, scale.absmax + first);
  const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, scale.absmax_q + first));
  const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, q, scale.code8, 4);
  // 16 blocks span at most two nested blocks of 256: absmax2 of the first and last
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 upper = _mm512_cmpneq_epi32_mask(
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(int(first & 255)), iota), 8),
      _mm512_setzero_si512());
  const __m512 a2 = _mm512_mask_blend_ps(upper, _mm512_set1_ps(scale.absmax2[first >> 8]),
                                         _mm512_set1_ps(scale.absmax2[(first + count - 1) >> 8]));
  return _mm512_maskz_add_ps(live, _mm512_mul_ps(c, a2), _mm512_set1_ps(scale.offset));
}

// ---- AVX512-BF16, bf16 compute: vdpbf16ps (32 bf16 pairs per instruction, twice the fp32 FMA
// rate). Few rows of x: run_few. From kBf16TiledMinRows on: a 6 x 4 register block of x rows by
// W rows, 10 loads per 24 dot products. kWRows rows of W decode to bf16 kChunk codes at a time
// into L1, and the next chunk's decode runs inside this chunk's micro-kernel, one 64-code group
// per step, so the shuffles overlap the dot products (decoding a chunk, then multiplying it, ran the two in series: 2.5 ->
// 1.8 ms, M=16, 4096x4096, two threads of a Zen 4 EPYC). A group's 32 packed bytes are
// zero-extended to words; the high nibbles (even codes) come by a shift, and one vpermw each
// looks them up in the group's table: the 16 code values times the block's absmax, rounded to
// bf16 once (the bits of bnb's bf16 dequantize). So a group holds its even codes, then its odd
// ones, and x is stored in that order too. x goes chunk-major in bf16 (exact: it came from bf16).
struct Avx512Bf16 {
  static constexpr int kWRows = 4, kXRows = 6;
  static constexpr int64_t kChunk = 512, kGroups = kChunk / 64;
  float table[16];

  explicit Avx512Bf16(int quant_type) {
    for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  }

  // x chunk by chunk as XChunked, in bf16 (round to nearest even), 64-byte aligned; within each
  // 64 codes (32 at a K % 64 tail) the even ones, then the odd ones.
  struct X {
    std::vector<uint16_t> buf;
    const uint16_t* data;
    __attribute__((target("avx512f,avx512bf16,avx512bw"))) explicit X(const GemvArgs& a)
        : buf(a.M * a.K + 32) {
      uint16_t* d = buf.data() + (32 - (reinterpret_cast<uintptr_t>(buf.data()) / 2) % 32) % 32;
      data = d;
      const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, a.K - k0);
        for (int64_t m = 0; m < a.M; ++m)
          for (int64_t i = 0; i < len; i += 64) {
            const float* src = a.x + m * a.K + k0 + i;
            uint16_t* dst = d + k0 * a.M + m * len + i;
            const __m512 f0 = _mm512_loadu_ps(src), f1 = _mm512_loadu_ps(src + 16);
            const __m512 e0 = _mm512_permutex2var_ps(f0, even, f1), o0 = _mm512_permutex2var_ps(f0, odd, f1);
            if (len - i < 64) {  // 32 codes
              _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(o0, e0));
              continue;
            }
            const __m512 f2 = _mm512_loadu_ps(src + 32), f3 = _mm512_loadu_ps(src + 48);
            const __m512 e1 = _mm512_permutex2var_ps(f2, even, f3), o1 = _mm512_permutex2var_ps(f2, odd, f3);
            _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            _mm512_store_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
          }
      }
    }
  };

  // A row's codes [i, i + 64) at p (avail < 64: a 32-code tail) as bf16 in X's order, into v:
  // returns 2 vectors, or 1 for a tail ([even 16 | odd 16]). The table is the 16 code values
  // times the block's scale s[0], rounded to bf16 once, in both halves (vpermw reads 5 index
  // bits; a low nibble's word keeps its high nibble's low bit in bit 4); at blocksize 32
  // (shift 5), the group's two blocks s[0], s[1], one per half, with index bit 4 set for the
  // second.
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) static int decode64(
      const uint8_t* p, int64_t avail, __m512 lut, const float* s, int shift, __m512i v[2]) {
    if (shift == 5 && avail >= 64) {
      const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(lut, _mm512_set1_ps(s[1])),
                                                     _mm512_mul_ps(lut, _mm512_set1_ps(s[0])));
      const __m512i half = _mm512_set_epi64(0x0010001000100010ll, 0x0010001000100010ll,
                                            0x0010001000100010ll, 0x0010001000100010ll, 0, 0, 0, 0);
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      v[0] = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(b, 4), half), t);
      v[1] = _mm512_permutexvar_epi16(  // 0xEA: (b & 15) | half
          _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(15), half, 0xEA), t);
      return 2;
    }
    const __m512 scaled = _mm512_mul_ps(lut, _mm512_set1_ps(s[0]));
    const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled);
    if (avail >= 64) {
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      v[0] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t);
      v[1] = _mm512_permutexvar_epi16(b, t);
      return 2;
    }
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v[0] = _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(b, 4)), b, 1), t);
    return 1;
  }

  // The next chunk of kWRows rows of W, decoded step by step: first each row's block scales
  // (kWRows steps), then one 64-code group per step (decode64), row by row. Rows past N decode
  // row n's codes with zero scales. The codes of the next block of rows, which OpenMP's static
  // schedule gives the same thread, are prefetched one line per 128 codes. Everything here is
  // inlined into the micro-kernel's loop (a call there clobbers every zmm register).
  struct Next {
    const uint8_t* codes;  // row n's codes of the chunk; row r at codes + r * row_bytes
    int64_t row_bytes, len;
    int64_t step_no;  // -kWRows .. -1: a row's scales; 0 .. kSteps - 1: a group
    uint16_t* w;
    const float* table;
    const Scales* scale;
    int64_t rows, first_block;
    alignas(64) float sc[kWRows][16];  // the rows' block scales over the chunk (<= 16 blocks)

    static constexpr int64_t kSteps = kWRows * kGroups;

    __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) void scales(int r) {
      const int64_t count = ((len - 1) >> scale->shift) + 1, per_row = row_bytes * 2 >> scale->shift;
      _mm512_store_ps(sc[r], r < rows ? scales16(*scale, first_block + r * per_row, count)
                                      : _mm512_setzero_ps());
    }

    // group g of row r: codes [64 g, 64 g + 64) (a tail: 32) into w in the order of X
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) void group(
        int64_t r, int64_t g) {
      const int64_t i = 64 * g;
      if (i >= len) return;
      const uint8_t* p = codes + (r < rows ? r : 0) * row_bytes + i / 2;
      if (!(g & 1)) _mm_prefetch(reinterpret_cast<const char*>(p + kWRows * row_bytes), _MM_HINT_T0);
      __m512i v[2];
      uint16_t* dst = w + r * kChunk + i;
      const int got = decode64(p, len - i, _mm512_loadu_ps(table), sc[r] + (i >> scale->shift),
                               scale->shift, v);
      _mm512_store_si512(dst, v[0]);
      if (got == 2) _mm512_store_si512(dst + 32, v[1]);
    }

    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) void step() {
      if (step_no >= kSteps) return;
      if (step_no < 0) scales(int(step_no + kWRows));
      else group(uint64_t(step_no) / kGroups, uint64_t(step_no) % kGroups);
      ++step_no;
    }
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void finish() {
      while (step_no < kSteps) step();
    }
  };

  // Start decoding codes [k0, k0 + kChunk) of rows n .. n + rows into w (past K: nothing).
  __attribute__((target("avx512f"))) void next(const GemvArgs& a, const Scales& scale, int64_t n,
                                               int64_t rows, int64_t k0, uint16_t* w, Next& nx) const {
    nx.table = table, nx.scale = &scale, nx.rows = rows, nx.w = w;
    nx.len = std::max<int64_t>(0, std::min(kChunk, a.K - k0));
    nx.codes = a.packed + (n * a.K + k0) / 2, nx.row_bytes = a.K / 2;
    nx.first_block = scale.block_of(n * a.K + k0);
    nx.step_no = nx.len ? -kWRows : Next::kSteps;
  }

  // acc[i * kWRows + j] += x[i, :len] · w[j, :len] (16 lanes each) for MX rows of x, one step of
  // the next chunk's decode per 32 codes.
  template <int MX>
  __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) static void micro(
      const uint16_t* x, int64_t len, const uint16_t* w, __m512* acc, Next& nx) {
    __m512 c[MX][kWRows];
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) c[i][j] = acc[i * kWRows + j];
    for (int64_t k = 0; k < len; k += 32) {
      __m512bh wv[kWRows];
      for (int j = 0; j < kWRows; ++j) wv[j] = (__m512bh)_mm512_load_si512(w + j * kChunk + k);
      for (int i = 0; i < MX; ++i) {
        const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * len + k);
        for (int j = 0; j < kWRows; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], xv, wv[j]);
      }
      nx.step();
    }
    for (int i = 0; i < MX; ++i)
      for (int j = 0; j < kWRows; ++j) acc[i * kWRows + j] = c[i][j];
  }

  // the last tile of x rows (1 to kXRows - 1 rows) by its own instance
  template <int MX>
  __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) static void micro_rest(
      const uint16_t* xc, int64_t M, int64_t m0, int64_t len, const uint16_t* w, __m512* acc,
      Next& nx) {
    if constexpr (MX > 0) {
      if (M - m0 == MX) return micro<MX>(xc + m0 * len, len, w, acc + m0 * kWRows, nx);
      micro_rest<MX - 1>(xc, M, m0, len, w, acc, nx);
    }
  }

  // What a thread carries from one block of kWRows rows to the next: the L1 buffers and the
  // decode in flight, so the next block's first chunk decodes inside this block's last
  // micro-kernel instead of before the next block's first (3% of the kernel at M=16, 4096x4096).
  struct Carry {
    alignas(64) uint16_t w[2][kWRows * kChunk];
    Next nx;
    int64_t n = -1;  // the block whose first chunk nx decodes into w[first]; -1: none
    int first = 0;
  };

  // The low-rank term into the accumulators before their sum over lanes: acc(m, r) += xa[m, j]
  // ·s·B[n + r, j] with rank j in the lanes, 16 ranks a vector (R/16 FMAs per accumulator; an
  // addmm after the kernel took 41 us of 2.2 ms, M=16, 4096x4096, r=16).
  template <class Acc>
  __attribute__((target("avx512f"), always_inline)) static void add_lora(
      const GemvArgs& a, int64_t n, int64_t rows, int64_t M, Acc&& acc) {
    if (!a.xa) return;
    const __m512 s = _mm512_set1_ps(a.scaling);
    for (int64_t j = 0; j < a.R; j += 16) {
      const __mmask16 k = a.R - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.R - j)) - 1);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 sb = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, a.lora_B + (n + r) * a.R + j));
        for (int64_t m = 0; m < M; ++m)
          acc(m, r) = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a.xa + m * a.R + j), sb, acc(m, r));
      }
    }
  }

  // y[:, n .. n + rows) for all M rows of x (`x`: this struct's X of a.x), the low-rank term
  // included; below kBf16TiledMinRows, run_few.
  void run_tiled(const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n,
                 int64_t rows, Carry& carry) const;
  template <int MX>
  void run_few(const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n,
               int64_t rows) const;
  template <int MX>  // run_few<a.M>, for a.M <= MX
  void few_rest(const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n,
                int64_t rows) const {
    if constexpr (MX > 0) {
      if (a.M == MX) return run_few<MX>(a, x, scale, n, rows);
      few_rest<MX - 1>(a, x, scale, n, rows);
    }
  }
};

// Few rows of x (M < kBf16TiledMinRows): the groups go from registers straight into the dot
// products (no L1 buffer, no chunk steps): kWRows rows of W at a time, 64 codes a step, an
// accumulator per row of W and of x; scales 16 blocks at a time (a step never crosses a chunk of
// x's layout: chunks of 512 codes, spans of >= 16 blocks of 32). Against the tiled path at these
// M it saves the stores and loads of the L1 buffer and the chunk steps' bookkeeping.
template <int MX>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void Avx512Bf16::run_few(
    const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n, int64_t rows) const {
  const __m512 lut = _mm512_loadu_ps(table);
  const int64_t row_bytes = a.K / 2, span = int64_t(16) << scale.shift;
  const uint8_t* codes[kWRows];
  for (int r = 0; r < kWRows; ++r) codes[r] = a.packed + (n + (r < rows ? r : 0)) * row_bytes;
  __m512 acc[kWRows][MX];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  alignas(64) float sc[kWRows][16];
  for (int64_t k0 = 0; k0 < a.K; k0 += span) {
    const int64_t len = std::min(span, a.K - k0), count = ((len - 1) >> scale.shift) + 1;
    for (int r = 0; r < kWRows; ++r)  // rows past N: zero scales
      _mm512_store_ps(sc[r], r < rows ? scales16(scale, scale.block_of((n + r) * a.K + k0), count)
                                      : _mm512_setzero_ps());
    for (int64_t i = 0; i < len; i += 64) {
      const int64_t k = k0 + i, c0 = k & ~(kChunk - 1), clen = std::min(kChunk, a.K - c0);
      const uint16_t* xs = x + c0 * a.M + (k - c0);  // row m at xs + m * clen
      const bool full = len - i >= 64;
      __m512bh xe[MX], xo[MX];
      for (int m = 0; m < MX; ++m) {
        xe[m] = (__m512bh)_mm512_load_si512(xs + m * clen);
        xo[m] = full ? (__m512bh)_mm512_load_si512(xs + m * clen + 32) : xe[m];
      }
      for (int r = 0; r < kWRows; ++r) {
        const uint8_t* p = codes[r] + k / 2;
        if (!(i & 64)) _mm_prefetch(reinterpret_cast<const char*>(p + kWRows * row_bytes), _MM_HINT_T0);
        __m512i v[2];
        decode64(p, len - i, lut, sc[r] + (i >> scale.shift), scale.shift, v);
        for (int m = 0; m < MX; ++m) {
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xe[m], (__m512bh)v[0]);
          if (full) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xo[m], (__m512bh)v[1]);
        }
      }
    }
  }
  add_lora(a, n, rows, MX, [&](int64_t m, int64_t r) -> __m512& { return acc[r][m]; });
  for (int m = 0; m < MX; ++m)
    for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void Avx512Bf16::run_tiled(
    const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n, int64_t rows,
    Carry& carry) const {
  if (a.M < kBf16TiledMinRows) return few_rest<kBf16TiledMinRows - 1>(a, x, scale, n, rows);
  __m512 acc[kMaxGemvRows * kWRows];
  for (auto& v : acc) v = _mm512_setzero_ps();
  Next& nx = carry.nx;
  if (carry.n != n) carry.first = 0, next(a, scale, n, rows, 0, carry.w[0], nx);
  nx.finish();
  const int64_t after = n + kWRows;  // the next block, whose first chunk follows this one's last
  int b = carry.first;  // w[b]: this chunk; w[b ^ 1]: the next one
  for (int64_t k0 = 0; k0 < a.K; k0 += kChunk, b ^= 1) {
    const int64_t len = std::min(kChunk, a.K - k0);
    if (k0 + kChunk < a.K || after >= a.N)  // past K: decodes nothing
      next(a, scale, n, rows, k0 + kChunk, carry.w[b ^ 1], nx);
    else
      next(a, scale, after, std::min<int64_t>(kWRows, a.N - after), 0, carry.w[b ^ 1], nx);
    const uint16_t* xc = x + k0 * a.M;
    int64_t m0 = 0;
    for (; m0 + kXRows <= a.M; m0 += kXRows) micro<kXRows>(xc + m0 * len, len, carry.w[b], acc + m0 * kWRows, nx);
    micro_rest<kXRows - 1>(xc, a.M, m0, len, carry.w[b], acc, nx);
    if (k0 + kChunk < a.K) nx.finish();  // the last chunk's decode ends on the next block's call
  }
  carry.n = after, carry.first = b;  // nx's decode of block `after` finishes on its call
  add_lora(a, n, rows, a.M, [&](int64_t m, int64_t r) -> __m512& { return acc[m * kWRows + r]; });
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t r = 0; r < rows; ++r) a.y[m * a.N + n + r] = _mm512_reduce_add_ps(acc[m * kWRows + r]);
}

// ---- AMX (AMX-BF16), bf16 compute: the tile unit multiplies, so only the decode costs. With yᵀ =
// W·xᵀ, 16 rows of W decoded to bf16 are the A tile (16 rows x 32 codes), and x goes in the B
// tile's pair-interleaved (VNNI) layout: row p of the B tile for codes [k, k + 32) holds
// (x[m, k + 2p], x[m, k + 2p + 1]) for m < M. C is yᵀ for 16 output features: 16 rows of M fp32
// columns. The decode walks the 16 rows together, 32 codes of each, and multiplies that A tile
// at once, so the tile unit works while the next one decodes (decoding 16 x 512 codes before
// multiplying them serialized the two: 1.8 ms against 1.3 decoding + 0.4 multiplying, M=16,
// 4096x4096, one thread). Each row's block table (the 16 code values times the block's absmax,
// rounded to bf16 once: the bits of rounding each decoded weight) stays in L1 for vpermw. Four
// accumulators and four A buffers take the tiles in turn. The tile unit flushes denormals (DAZ, FTZ).
struct Amx {
  static constexpr int kWRows = 16;
  float table[16];

  explicit Amx(int quant_type) {
    for (int i = 0; i < 16; ++i) table[i] = code_value(quant_type, i);
  }

  // x as B tiles: codes [k, k + 32) at data + k * M, rows of M pairs (M * 4 bytes), 64-byte
  // aligned, rounded to bf16 as Avx512Bf16::X rounds it. K % 32 == 0 (K % blocksize == 0).
  struct X {
    std::vector<uint16_t> buf;
    const uint16_t* data;
    __attribute__((target("avx512f,avx512bf16,avx512bw"))) explicit X(const GemvArgs& a)
        : buf(a.M * a.K + 32) {
      uint16_t* d = buf.data() + (32 - (reinterpret_cast<uintptr_t>(buf.data()) / 2) % 32) % 32;
      data = d;
      const __m512i pairs = _mm512_mullo_epi32(  // pair p of a row goes to dword p * M
          _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
          _mm512_set1_epi32(int(a.M)));
      for (int64_t k = 0; k < a.K; k += 32)
        for (int64_t m = 0; m < a.M; ++m) {
          const float* src = a.x + m * a.K + k;
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
          _mm512_i32scatter_epi32(reinterpret_cast<int*>(d + k * a.M) + m, pairs, (__m512i)v, 4);
        }
    }
  };

  // tile 0-3: C (16 x M fp32); 4, 5: A (16 x 32 bf16); 6, 7: B (16 x M bf16 pairs)
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
    explicit Config(int64_t M) {
      for (int t = 0; t < 8; ++t) {
        rows[t] = 16;
        colsb[t] = t == 4 || t == 5 ? 64 : uint16_t(4 * M);
      }
    }
  };

  // Block scales are decoded kSpan blocks of each row at a time, 16 per vector (one at a time,
  // per row and block, they took 0.65 of 1.57 ms, M=16, 4096x4096, one thread).
  static constexpr int kSpan = 32;
  // Groups decoded ahead of the tile unit (1-6 measured within 5% of each other; 2 was best)
  static constexpr int kAhead = 2, kBuffers = 4;

  // One block of 16 output features: where its rows' codes are, their block scales and tables, x.
  struct Block {
    const uint8_t* row[kWRows];
    alignas(64) float sc[kWRows][kSpan];      // scales of the rows' blocks [kb, kb + kSpan)
    alignas(64) uint16_t scaled[kWRows][32];  // each row's block table, twice (vpermw's 5 bits)
    alignas(64) uint16_t w[kBuffers][kWRows * 32];  // A tiles decoded, not yet multiplied
    const uint16_t* x;
    int64_t M, xstride, ahead;
  };

  // b.sc[r][j] = the scale of row r's block kb + j, j < kSpan (past the row's end or past N: 0).
  __attribute__((target("avx512f,avx512bw,avx512vl"))) static void scales(
      const GemvArgs& a, const Scales& scale, int64_t n, int64_t rows, int64_t kb, Block& b) {
    const int64_t per_row = a.K >> scale.shift, count = std::min<int64_t>(kSpan, per_row - kb);
    for (int r = 0; r < kWRows; ++r)
      for (int64_t j = 0; j < kSpan; j += 16) {
        const int64_t left = r < rows ? std::clamp<int64_t>(count - j, 0, 16) : 0;
        _mm512_store_ps(&b.sc[r][j], left ? scales16(scale, (n + r) * per_row + kb + j, left)
                                          : _mm512_setzero_ps());
      }
  }

  // Block tables of the 16 rows for their blocks' scales b.sc[.][j] (rows past N: scale 0, so
  // they decode to 0).
  __attribute__((target("avx512f,avx512bf16"))) void tables(int64_t j, Block& b) const {
    const __m512 lut = _mm512_loadu_ps(table);
    for (int r = 0; r < kWRows; ++r) {
      const __m512 v = _mm512_mul_ps(lut, _mm512_set1_ps(b.sc[r][j]));
      _mm512_store_si512(b.scaled[r], (__m512i)_mm512_cvtne2ps_pbh(v, v));
    }
  }

  // Codes [k, k + 32) of the 16 rows decoded into the A buffer for them (a new block: its
  // tables first).
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi"))) void decode(
      const GemvArgs& a, const Scales& scale, int64_t n, int64_t rows, int64_t k, Block& b) const {
    if ((k & ((int64_t(1) << scale.shift) - 1)) == 0) {  // a new block in every row
      const int64_t block = k >> scale.shift;
      if (block % kSpan == 0) scales(a, scale, n, rows, block, b);
      tables(block % kSpan, b);
    }
    // vpermb spreads packed byte j to both words of dword j; vpsrlvw then shifts the even word
    // right by 4: word 2j = the high nibble, word 2j + 1 = the byte, whose low nibble vpermw reads
    // (it reads an index's low 5 bits: the table sits in words 0..15 and again 16..31)
    const __m512i spread = _mm512_set_epi8(
        15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12, 11, 11, 11, 11, 10, 10, 10,
        10, 9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2,
        2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i shifts = _mm512_set1_epi32(4);  // word 2j by 4, word 2j + 1 by 0
    uint16_t* w = b.w[(k / 32) % kBuffers];
#pragma GCC unroll 16
    for (int r = 0; r < kWRows; ++r) {
      const uint8_t* p = b.row[r] + k / 2;
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + b.ahead), _MM_HINT_T0);
      const __m512i bytes = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i idx = _mm512_srlv_epi16(
          _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, spread, bytes), shifts);
      _mm512_store_si512(w + r * 32, _mm512_permutexvar_epi16(idx, _mm512_load_si512(b.scaled[r])));
    }
  }

  // The A buffer of codes [k, k + 32) into A tile 4 + G % 2, times x's B tile 6 + G % 2, into
  // accumulator G (tile numbers are literals in the intrinsics' asm: an instance per G).
  template <int G>
  __attribute__((target("amx-tile,amx-bf16"))) static void multiply(int64_t k, const Block& b) {
    const uint16_t* xk = b.x + k * b.M;
    const uint16_t* w = b.w[(k / 32) % kBuffers];
    if constexpr (G % 2 == 0) {
      _tile_loadd(4, w, 64);
      _tile_loadd(6, xk, b.xstride);
    } else {
      _tile_loadd(5, w, 64);
      _tile_loadd(7, xk, b.xstride);
    }
    if constexpr (G == 0) _tile_dpbf16ps(0, 4, 6);
    if constexpr (G == 1) _tile_dpbf16ps(1, 5, 7);
    if constexpr (G == 2) _tile_dpbf16ps(2, 4, 6);
    if constexpr (G == 3) _tile_dpbf16ps(3, 5, 7);
  }

  // y[:, n .. n + rows) for all M rows of x (`x`: this struct's X of a.x). Group g (codes
  // [32g, 32g + 32)) decodes two groups before it is multiplied: a tile load waits for the
  // stores it reads to retire, which waits for the older tile ops to finish, so decoding right
  // before multiplying put the decode and the tile unit in series (1.27 ms against 0.45 decoding
  // and 0.40 multiplying, M=16, 4096x4096, one thread).
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi,amx-tile,amx-bf16"))) void run_tiled(
      const GemvArgs& a, const uint16_t* x, const Scales& scale, int64_t n, int64_t rows) const {
    Block b;
    for (int r = 0; r < kWRows; ++r)  // rows past N read row n's codes (with a zero table)
      b.row[r] = a.packed + (n + (r < rows ? r : 0)) * a.K / 2;
    b.x = x, b.M = a.M, b.xstride = 4 * a.M, b.ahead = kWRows * a.K / 2;  // prefetch: next block
    const Config config(a.M);
    _tile_loadconfig(&config);  // per thread: the tile configuration is thread state
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t groups = a.K / 32;
    for (int64_t g = 0; g < std::min<int64_t>(kAhead, groups); ++g) decode(a, scale, n, rows, 32 * g, b);
    for (int64_t g = 0; g < groups; g += 4) {
      if (g + kAhead < groups) decode(a, scale, n, rows, 32 * (g + kAhead), b);
      multiply<0>(32 * g, b);
      if (g + 1 + kAhead < groups) decode(a, scale, n, rows, 32 * (g + 1 + kAhead), b);
      if (g + 1 < groups) multiply<1>(32 * (g + 1), b);
      if (g + 2 + kAhead < groups) decode(a, scale, n, rows, 32 * (g + 2 + kAhead), b);
      if (g + 2 < groups) multiply<2>(32 * (g + 2), b);
      if (g + 3 + kAhead < groups) decode(a, scale, n, rows, 32 * (g + 3 + kAhead), b);
      if (g + 3 < groups) multiply<3>(32 * (g + 3), b);
    }
    alignas(64) float c[4][16 * 16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    _tile_release();
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t r = 0; r < rows; ++r)
        a.y[m * a.N + n + r] = (c[0][r * 16 + m] + c[1][r * 16 + m]) + (c[2][r * 16 + m] + c[3][r * 16 + m]);
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

// How a tiled path differs in the driver: what a thread carries between its blocks, and whether
// the path adds the low-rank term in its accumulators (Avx512Bf16 does both; the others neither).
struct NoCarry {};
template <class Isa> struct Tiled {
  using Carry = NoCarry;
  static constexpr bool kLoraInAcc = false;
};
template <> struct Tiled<Avx512Bf16> {
  using Carry = Avx512Bf16::Carry;
  static constexpr bool kLoraInAcc = true;
};

// The tiled paths, OpenMP over blocks of kWRows output features; `x`: the ISA's layout of x. The
// static schedule gives each thread consecutive blocks (which a carry relies on for speed only).
template <class Isa, class X>
void run_tiled(const GemvArgs& a, const X* x, const Scales& scale) {
  const Isa isa(a.quant_type);
  const int64_t blocks = (a.N + Isa::kWRows - 1) / Isa::kWRows;
#pragma omp parallel if (a.M * a.N * a.K >= kParallelMinWork)
  {
    typename Tiled<Isa>::Carry carry;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = b * Isa::kWRows, rows = std::min<int64_t>(Isa::kWRows, a.N - n);
      if constexpr (std::is_same_v<typename Tiled<Isa>::Carry, NoCarry>)
        isa.run_tiled(a, x, scale, n, rows);
      else
        isa.run_tiled(a, x, scale, n, rows, carry);
      for (int64_t m = 0; m < a.M; ++m)
        for (int64_t r = n; r < n + rows; ++r)
          a.y[m * a.N + r] = epilogue(a, m, r, a.y[m * a.N + r], !Tiled<Isa>::kLoraInAcc);
    }
  }
}

enum class Path { kScalar, kAvx2, kAvx2Tiled, kAvx512, kAvx512Bf16Tiled, kAmxTiled, kAvx512Tiled,
                  kAvx512Bf16 };

// Measured per host class. AMD (2-core EPYC, Zen 4: 512-bit FMAs are double-pumped, so fp32
// AVX-512 has no FMA-rate advantage): fp32 AVX-512 rows for M < kTiledMinRows, else AVX2's tiled
// path (an fp32 AVX-512 tiled one took 1.2-1.6x its time); vdpbf16ps at every M where bf16
// products are asked for. Intel (2-core Xeon with AMX, 4096x4096 fp32, rotated
// weights, two threads): the AVX2 rows beat the AVX-512 ones (M=1 0.80-0.84 against 0.91-1.0 ms,
// M=4 1.57-1.86 against 2.0-2.1; 512-bit shuffles issue on one port, 256-bit ones on two), and
// the AVX-512 tiled path beats AVX2's (two 512-bit FMA ports: M=5 1.37-1.39 against 1.81-1.84 ms,
// M=16 2.91-2.92 against 3.53-3.54), so level 3 takes those there. Level 2 runs the AVX-512
// paths on any host (tests force each path).
inline bool avx512_rows_win() { return __builtin_cpu_is("amd"); }

Path choose(int64_t M, bool bf16_products, int simd_level) {
  const bool tiled = M >= kTiledMinRows;
  if (simd_level >= 3 && M >= kAmxMinRows && bf16_products && has_amx_bf16()) return Path::kAmxTiled;
  if (simd_level >= 2 && bf16_products && has_avx512_bf16())
    return M >= kBf16TiledMinRows ? Path::kAvx512Bf16Tiled : Path::kAvx512Bf16;
  if (simd_level >= 2 && !tiled && has_avx512() && (simd_level == 2 || avx512_rows_win() || !has_avx2()))
    return Path::kAvx512;
  if (simd_level >= 2 && tiled && has_avx512() && (simd_level == 2 || !avx512_rows_win() || !has_avx2()))
    return Path::kAvx512Tiled;
  if (simd_level >= 1 && has_avx2()) return tiled ? Path::kAvx2Tiled : Path::kAvx2;
  return Path::kScalar;
}

}  // namespace

void qlora_gemv(const GemvArgs& a, int simd_level) {
  const Scales scale{a.absmax, a.absmax_q, a.absmax2, a.code8, a.offset,
                     __builtin_ctzll(uint64_t(a.blocksize))};  // a power of two (bindings)
  switch (choose(a.M, a.bf16_products, simd_level)) {
    case Path::kAvx512Bf16:  // Avx512Bf16::run_few, by M
    case Path::kAvx512Bf16Tiled: {
      const Avx512Bf16::X x(a);
      return run_tiled<Avx512Bf16>(a, x.data, scale);
    }
    case Path::kAmxTiled: {
      const Amx::X x(a);
      return run_tiled<Amx>(a, x.data, scale);
    }
    case Path::kAvx512:
      return run_rows<Avx512>(a, scale);
    case Path::kAvx512Tiled: {  // x chunked, in element order
      const XChunked xp(a, Avx512::kChunk, nullptr);
      return run_tiled<Avx512>(a, xp.data, scale);
    }
    case Path::kAvx2Tiled: {  // x chunked, in decode32's lane order
      const XChunked xp(a, Avx2::kChunk, Avx2::kLaneOrder);
      return run_tiled<Avx2>(a, xp.data, scale);
    }
    case Path::kAvx2: {  // x in decode32's lane order
      const XChunked xp(a, a.K, Avx2::kLaneOrder);
      GemvArgs arranged = a;
      arranged.x = xp.data;
      return run_rows<Avx2>(arranged, scale);
    }
    case Path::kScalar:
      return gemv_scalar(a, scale);
  }
}

bool gemv_lora_in_kernel(int64_t M, bool bf16_products, int simd_level) {
  const Path p = choose(M, bf16_products, simd_level);  // the paths run by Avx512Bf16
  return p == Path::kAvx512Bf16 || p == Path::kAvx512Bf16Tiled;
}

const char* gemv_path(int64_t M, bool bf16_products, int simd_level) {
  static const char* names[] = {"scalar",          "avx2",      "avx2-tiled",   "avx512",
                                "avx512bf16-tiled", "amx-tiled", "avx512-tiled", "avx512bf16"};
  return names[static_cast<int>(choose(M, bf16_products, simd_level))];
}

}  // namespace peftkern::cpu
