// CUDA fused QLoRA GEMV for decode-size batches (1 <= M <= 16), torch-free like dequant_4bit.cu:
//   y[m, n] = sum_k x[m, k] * table[code(n, k)] * absmax(n, k) + bias[n] + s * sum_r xa[m, r] * B[n, r]
// Same math as csrc/cpu/qlora_gemv.cpp; requires K % blocksize == 0 (blocks never span rows).
//
// Work split: a CTA of 8 warps; each output row n belongs to a group of S warps (S = 1, 2, 4 or 8,
//   picked by the launcher from N, K and the SM count), so a CTA owns 8 / S consecutive rows.
//   Lane l of warp w in the group takes the 16-byte chunks (32 codes) c = 32w + l, + 32S, + 64S, ...
//   of row n: each warp-wide load reads 512 contiguous bytes and every packed byte is read once.
// Loads: the weight stream uses 16-byte ld.global.nc.L1::no_allocate (read once; L1 stays for x).
//   Each lane keeps kDepth chunk loads (and their block scales) in flight in a register ring:
//   computing chunk c refills its slot with chunk c + kDepth * S * 32 (a predicated load past the
//   row's end). x is read with 16-byte __ldg (L1/L2 hits: every row of W reads all of x). A
//   misaligned `packed` or `x` base selects the byte/element-load instantiation (slow, correct).
// Math: codes are decoded from the 16 fp32 table values in shared memory (conflict-free: 16 words,
//   16 banks). Per step of 8 codes (4 for fp32 x at large M) and per m, a lane sums x * table[code]
//   in fp32 and folds the block scale into its accumulator once: acc[m] += part * absmax. A chunk
//   never spans two blocks (blocksize >= 32, chunks are 32-aligned). Double-quantized absmax is
//   decoded in-kernel with peftkern::decode_absmax (code8 staged in shared memory).
// Reduction and determinism: no atomics. Each warp reduces its M accumulators with a fixed
//   xor-shuffle reduce-scatter (one lane per m ends with the warp total); with S > 1 the S warp
//   totals of a row go through shared memory and the group's first warp adds them in warp order
//   (deterministic split-K). The LoRA dot products (lanes of the group split r) are reduced the same
//   way. Same input, shape and device (the SM count picks S) -> bit-identical output.
// Epilogue: once per (m, n), in fp32: (acc + bias[n]) + s * lora (one FMA), rounded to T once (RN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "peftkern/codes.h"

namespace peftkern::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = kMaxGemvRows;  // M (codes.h)
constexpr int kMinBlocksize = 32, kMaxBlocksize = 4096;
constexpr int kChunkCodes = 32;  // codes per 16-byte chunk
constexpr int64_t kMaxK = int64_t(1) << 27;  // keeps chunk indices and m * K + k in 32 bits
static_assert(kThreads == 256, "s_code8 is staged with one entry per thread");
static_assert(kMinBlocksize % kChunkCodes == 0, "a chunk never spans two quantization blocks");

// Per-(M, T) tuning, from ptxas' register use (no spills allowed):
//   kDepth: chunk loads in flight per lane (the byte-load fallback keeps one);
//   kWordUnroll: 4 unrolls a chunk's 4 words; 1 loops over them, so that ptxas cannot hoist all
//     4 * M x loads of a chunk at once (it would, and then spill);
//   kHalfWords: steps of 4 codes instead of 8 (fp32 x at large M: 2 * M float4 per word is too many);
//   kMinBlocks: CTAs/SM for __launch_bounds__ (4: <= 64 registers, 3: <= 80, 2: <= 128; fp32 x
//     with M >= 14 needs ~150 and gets 1 CTA/SM: a rare case, kept correct rather than fast).
// Small M is memory-bound and wants bytes in flight and occupancy; large M is FMA/issue-bound.
template <int M, typename T, bool kAligned> struct Tune {
  static constexpr bool kHalfWords = sizeof(T) == 4 && M >= 9;
  static constexpr int kXRegs = kHalfWords ? M : M * (int)sizeof(T) / 2;  // 16-byte x loads per step
  static constexpr int kDepth = !kAligned ? 1 : M == 1 ? 4 : kXRegs <= 12 ? 2 : 1;
  static constexpr int kWordUnroll = M == 1 ? 4 : 1;
  static constexpr int kMinBlocks = M == 1 ? 4 : kXRegs <= 4 ? 3 : kHalfWords && M >= 14 ? 1 : 2;
};

// T <-> fp32 for scalars: load1 (read-only path) and store (round to nearest even).
template <typename T> struct Elem;
template <> struct Elem<float> {
  __device__ __forceinline__ static float load1(const float* p) { return __ldg(p); }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <> struct Elem<__half> {
  __device__ __forceinline__ static float bits(uint32_t u) {  // low 16 bits
    return __half2float(__ushort_as_half((unsigned short)u));
  }
  __device__ __forceinline__ static float2 pair(uint32_t w) {  // .x = the element at the lower address
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
  __device__ __forceinline__ static float load1(const __half* p) {
    return bits(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float bits(uint32_t u) { return __uint_as_float(u << 16); }
  __device__ __forceinline__ static float2 pair(uint32_t w) {  // exact: bf16 is fp32's top half
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  }
  __device__ __forceinline__ static float load1(const __nv_bfloat16* p) {
    return bits(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// v[0..N) = x[p .. p + N) as fp32 (N = 4 or 8). kVec: p is aligned to the vector (16 bytes for
// 16 bytes of x, 8 bytes for four 16-bit values), so it is read with one or two vector loads.
template <int N, bool kVec>
__device__ __forceinline__ void load_x(const float* p, float (&v)[N]) {
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p) + i);
      v[4 * i] = a.x; v[4 * i + 1] = a.y; v[4 * i + 2] = a.z; v[4 * i + 3] = a.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = __ldg(p + e);
  }
}
template <int N, bool kVec, typename T>  // T = __half or __nv_bfloat16
__device__ __forceinline__ void load_x(const T* p, float (&v)[N]) {
  if constexpr (kVec) {
    uint32_t w[N / 2];
    if constexpr (N == 8) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
    } else {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = q.x; w[1] = q.y;
    }
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float2 f = Elem<T>::pair(w[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
    const unsigned short* u = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = Elem<T>::bits(__ldg(u + e));
  }
}

// r = the 16-byte chunk of packed codes at p, when `pred` (else r is left as it is). Aligned: one
// streaming load, predicated in PTX (no branch), that does not allocate in L1: each weight byte is
// used once, and L1 stays for x. Not volatile: it has no side effects.
template <bool kAligned>
__device__ __forceinline__ void load_chunk_if(const uint8_t* p, const bool pred, uint4& r) {
  if constexpr (kAligned) {
    asm("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %4, 0;\n\t"
        "@q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%5];\n\t}"
        : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
        : "r"((int)pred), "l"(p));
  } else if (pred) {  // byte loads, assembled little-endian (byte 4i + b -> bits 8b of word i)
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) w[i] |= (uint32_t)__ldg(p + 4 * i + b) << (8 * b);
    }
    r = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

struct Params {
  const void* x;           // [M, K] T
  const uint8_t* packed;   // [N * K / 2]
  const float* absmax;     // [nblocks] (plain), or
  const uint8_t* absmax_q; // [nblocks] uint8 (nested; selects the nested path when non-null)
  const float* absmax2;    // [ceil(nblocks / 256)]
  const float* code8;      // [256]
  const float* offset;     // [1]
  const void* bias;        // [N] T or nullptr
  const void* xa;          // [M, R] T or nullptr
  const void* lora_B;      // [N, R] T
  void* y;                 // [M, N] T
  int64_t K, N, R;
  float scaling;
  int quant_type, log2_blocksize, log2_split;
};

// fp32 load from shared memory at a 32-bit shared-window address. volatile keeps it after the
// __syncthreads() that publishes the table (it has no memory clobber, so it does not pin the
// global loads around it).
__device__ __forceinline__ float ld_shared(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// acc[m] += absmax * sum_{i < 32} x[m, k0 + i] * table[code(k0 + i)], for the chunk `raw` whose
// first code is at column k0 (xc = x + k0). Word j of the chunk holds bytes 4j..4j+3 (byte 4j in
// bits 0..7); byte b holds code 2b in its high nibble and code 2b + 1 in its low nibble
// (peftkern::high_code / low_code). table: shared address of the 16 fp32 values, 256-byte aligned,
// so that base | 4 * code (one PRMT) is the address of table[code]. The scale is applied to the
// partial sum of each step of kStep codes (1 FMA per kStep, and no part[M] registers live across
// steps). Steps are words (8 codes), or half-words when Tune says so (fp32 x at large M, where
// ptxas would otherwise hoist 2 * M float4 loads of x at once).
template <int M, typename T, bool kAligned>
__device__ __forceinline__ void chunk_dot(const uint4 raw, const float scale, const T* xc,
                                          const unsigned K, const uint32_t table, float (&acc)[M]) {
  using Cfg = Tune<M, T, kAligned>;
  constexpr int kStep = Cfg::kHalfWords ? 4 : 8;  // codes per step
  uint4 q = raw;
#pragma unroll(Cfg::kWordUnroll)
  for (int j = 0; j < 4; ++j) {
    const uint32_t word = q.x;  // word j; rotating (not indexing) keeps q in registers
    q.x = q.y;
    q.y = q.z;
    q.z = q.w;
    // Byte b of hi4 / lo4 = 4 * high_code / low_code of byte b of the word.
    const uint32_t hi4 = (word >> 2) & 0x3C3C3C3Cu;
    const uint32_t lo4 = (word << 2) & 0x3C3C3C3Cu;
#pragma unroll 1
    for (int h = 0; h < 8 / kStep; ++h) {  // one pass (words) or two (half-words)
      float w[kStep];
#pragma unroll
      for (int b = 0; b < kStep / 2; ++b) {  // byte of hi4 / lo4 into the low byte of `table`
        const uint32_t sel = 0x7650u + h * (kStep / 2) + b;
        w[2 * b] = ld_shared(__byte_perm(hi4, table, sel));
        w[2 * b + 1] = ld_shared(__byte_perm(lo4, table, sel));
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[kStep];
        load_x<kStep, kAligned>(xc + m * K + 8 * j + kStep * h, xv);
        float part = xv[0] * w[0];
#pragma unroll
        for (int e = 1; e < kStep; ++e) part = fmaf(xv[e], w[e], part);
        acc[m] = fmaf(part, scale, acc[m]);
      }
    }
  }
}

__host__ __device__ constexpr int ceil_log2(int v) { return v <= 1 ? 0 : 1 + ceil_log2((v + 1) / 2); }

// One halving step of warp_reduce_scatter on v[0, 2 * kHalf), then the next one (templates rather
// than loops, so that every index is a compile-time constant and v stays in registers).
template <int kHalf, int kOff, int kP>
__device__ __forceinline__ void halve(float (&v)[kP], const int lane) {
  const bool upper = (lane & kOff) != 0;  // upper lanes keep the upper half
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf];
    const float keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, kOff);
  }
  if constexpr (kHalf > 1) halve<kHalf / 2, kOff / 2>(v, lane);
}

// Reduce-scatter of in[0..M) over the 32 lanes of a warp, in a fixed order. With P = 2^p >= M
// (values >= M padded with 0): p halving steps (xor 16, 8, ...) in which each lane keeps half of
// its values and adds its partner's copy of that half, then a plain xor butterfly over the lanes
// left. Lane l returns the warp total of value (l >> (5 - p)) & (P - 1), the same in every lane
// that holds it (a + b == b + a). M = 16 takes 16 shuffles instead of 5 * 16.
template <int M>
__device__ __forceinline__ float warp_reduce_scatter(const float (&in)[M], const int lane) {
  constexpr int kLogP = ceil_log2(M), kP = 1 << kLogP;
  float v[kP];
#pragma unroll
  for (int i = 0; i < kP; ++i) v[i] = i < M ? in[i] : 0.0f;
  if constexpr (kP > 1) halve<kP / 2, 16>(v, lane);
#pragma unroll
  for (int off = 16 >> kLogP; off >= 1; off >>= 1) v[0] += __shfl_xor_sync(0xFFFFFFFFu, v[0], off);
  return v[0];
}

template <int M, typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads, Tune<M, T, kAligned>::kMinBlocks)
qlora_gemv_kernel(const Params p) {
  constexpr int kDepth = Tune<M, T, kAligned>::kDepth;
  constexpr int kLogP = ceil_log2(M);
  __shared__ __align__(256) float s_table[16];  // 256-aligned: see chunk_dot
  __shared__ float s_code8[256];
  __shared__ float s_red[2][kWarps][M];  // split-K: per-warp totals of acc and lora

  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const bool nested = p.absmax_q != nullptr;
  if (t < 16) s_table[t] = code_value(p.quant_type, t);
  if (nested) s_code8[t] = __ldg(p.code8 + t);
  __syncthreads();
  const float offset = nested ? __ldg(p.offset) : 0.0f;
  const uint32_t s_table_addr = (uint32_t)__cvta_generic_to_shared(s_table);

  const int split = 1 << p.log2_split;
  const int part = warp & (split - 1);  // this warp's slice of the row's chunks
  const int64_t n = (int64_t)blockIdx.x * (kWarps >> p.log2_split) + (warp >> p.log2_split);
  const bool active = n < p.N;  // the last CTA may own rows past N (it still joins the barrier)
  const unsigned group = 32u << p.log2_split;  // lanes per row
  const unsigned lane_g = part * 32 + lane;     // this lane's first chunk of the row
  const T* x = static_cast<const T*>(p.x);

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  if (active && p.K > 0) {
    // 32-bit chunk indices and x offsets (m * K + k < 2^31): the launcher checks K < 2^27.
    // Unsigned, so that they widen to 64-bit addresses without sign extension.
    const unsigned K = (unsigned)p.K, chunks = K / kChunkCodes;
    const uint8_t* row = p.packed + n * (p.K / 2);
    // Chunk c of row n starts at flat code n*K + 32c. Blocks are 2^(log2_blocksize - 5) chunks
    // and K is a whole number of blocks, so its block is n*(K/bs) + (c >> (log2_blocksize - 5)).
    const int64_t row_block = n * (p.K >> p.log2_blocksize);
    const unsigned chunk_shift = p.log2_blocksize - 5;
    const float* absmax_row = nested ? nullptr : p.absmax + row_block;
    const uint8_t* absmax_q_row = nested ? p.absmax_q + row_block : nullptr;
    // Scale of chunk min(c, chunks - 1): past the row's end it reads (and then ignores) the last
    // block's scale rather than branch.
    auto scale_of = [&](unsigned c) -> float {
      const unsigned off = min(c, chunks - 1) >> chunk_shift;
      if (nested) {
        const uint64_t block = (uint64_t)row_block + off;
        return decode_absmax(__ldg(absmax_q_row + off), __ldg(p.absmax2 + block / kNestedBlocksize),
                             s_code8, offset);
      }
      return __ldg(absmax_row + off);
    };
    // Pipeline: raw[u] / scale[u] hold a chunk whose load is in flight. Step u of an iteration
    // computes chunk c = c0 + u * group from raw[u], then refills raw[u] with chunk
    // c + kDepth * group: kDepth - 1 loads stay in flight during each chunk's math, with no
    // register copies (u is a compile-time index).
    uint4 raw[kDepth];
    float scale[kDepth];
#pragma unroll
    for (int u = 0; u < kDepth; ++u) {
      const unsigned c = lane_g + u * group;
      raw[u] = make_uint4(0, 0, 0, 0);
      load_chunk_if<kAligned>(row + 16 * c, c < chunks, raw[u]);
      scale[u] = scale_of(c);
    }
#pragma unroll 1
    for (unsigned c0 = lane_g; c0 < chunks; c0 += kDepth * group) {
#pragma unroll
      for (int u = 0; u < kDepth; ++u) {
        const unsigned c = c0 + u * group;
        if (c >= chunks) break;  // this lane's last chunk (the tail of the row)
        chunk_dot<M, T, kAligned>(raw[u], scale[u], x + kChunkCodes * c, K, s_table_addr, acc);
        const unsigned ahead = c + kDepth * group;
        load_chunk_if<kAligned>(row + 16 * ahead, ahead < chunks, raw[u]);
        scale[u] = scale_of(ahead);
      }
    }
  }

  // Lane l holds row m = (l >> (5 - kLogP)) & (P - 1) after the reduce-scatter; one lane per m writes.
  const int my_m = (lane >> (5 - kLogP)) & ((1 << kLogP) - 1);
  const bool writer = (lane & ((1 << (5 - kLogP)) - 1)) == 0 && my_m < M;
  float total = warp_reduce_scatter<M>(acc, lane);

  // LoRA partials after acc is reduced (keeps them out of the main loop's registers).
  const bool has_lora = p.xa != nullptr;
  float lora_total = 0.0f;
  if (has_lora) {
    float lora[M];
#pragma unroll
    for (int m = 0; m < M; ++m) lora[m] = 0.0f;
    if (active) {
      const T* xa = static_cast<const T*>(p.xa);
      const T* brow = static_cast<const T*>(p.lora_B) + n * p.R;
      for (int64_t r = lane_g; r < p.R; r += group) {
        const float b = Elem<T>::load1(brow + r);
#pragma unroll
        for (int m = 0; m < M; ++m) lora[m] = fmaf(Elem<T>::load1(xa + m * p.R + r), b, lora[m]);
      }
    }
    lora_total = warp_reduce_scatter<M>(lora, lane);
  }

  if (split > 1) {  // uniform over the grid: every thread reaches the barrier
    if (writer) {
      s_red[0][warp][my_m] = total;
      s_red[1][warp][my_m] = lora_total;
    }
    __syncthreads();
    if (part == 0 && writer) {  // fixed order: warp 0 of the group, then 1, 2, ...
      total = s_red[0][warp][my_m];
      lora_total = s_red[1][warp][my_m];
      for (int w = 1; w < split; ++w) {
        total += s_red[0][warp + w][my_m];
        lora_total += s_red[1][warp + w][my_m];
      }
    }
  }

  if (active && part == 0 && writer) {
    float v = total;
    if (p.bias) v += Elem<T>::load1(static_cast<const T*>(p.bias) + n);
    if (has_lora) v = fmaf(p.scaling, lora_total, v);
    static_cast<T*>(p.y)[my_m * p.N + n] = Elem<T>::store(v);
  }
}

// Runtime M -> template M.
template <typename T, bool kAligned, int M = 1>
void launch_m(int64_t rows, const Params& p, unsigned grid, cudaStream_t stream) {
  if constexpr (M < kMaxRows) {
    if (rows != M) return launch_m<T, kAligned, M + 1>(rows, p, grid, stream);
  }
  qlora_gemv_kernel<M, T, kAligned><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_t(int64_t rows, const Params& p, bool aligned, unsigned grid, cudaStream_t stream) {
  if (aligned) launch_m<T, true>(rows, p, grid, stream);
  else launch_m<T, false>(rows, p, grid, stream);
}

}  // namespace

cudaError_t qlora_gemv(const QloraGemvArgs& a, cudaStream_t stream) {
  const int64_t bs = a.blocksize;
  if (a.M < 0 || a.M > kMaxRows || a.N < 0 || a.K < 0 || a.K >= kMaxK ||
      (a.quant_type != kNF4 && a.quant_type != kFP4) || bs < kMinBlocksize ||
      bs > kMaxBlocksize || (bs & (bs - 1)) != 0 || a.K % bs != 0 ||
      (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16))
    return cudaErrorInvalidValue;
  if ((a.xa == nullptr) != (a.lora_B == nullptr) || (a.xa && a.R < 1)) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (!a.y) return cudaErrorInvalidValue;
  if (a.K > 0 && (!a.x || !a.packed || (a.absmax_q ? !(a.absmax2 && a.code8 && a.offset) : !a.absmax)))
    return cudaErrorInvalidValue;

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (sms < 1) sms = 1;

  // Split-K: the fewest warps per row (1, 2, 4, 8) that give the GPU at least 16 warps per SM,
  // as long as every lane of the group still gets a chunk (32 * split <= K / 32).
  constexpr int64_t kWarpsPerSm = 16;
  const int64_t chunks = a.K / kChunkCodes;
  int log2_split = 0;
  while ((1 << log2_split) < kWarps && a.N * (1 << log2_split) < kWarpsPerSm * sms &&
         chunks >= 64 * (int64_t(1) << log2_split))
    ++log2_split;
  const int64_t rows_per_cta = kWarps >> log2_split;
  const int64_t grid = (a.N + rows_per_cta - 1) / rows_per_cta;
  if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;

  int log2_blocksize = 0;
  while ((int64_t(1) << log2_blocksize) < bs) ++log2_blocksize;
  Params p;
  p.x = a.x;
  p.packed = a.packed;
  p.absmax = a.absmax_q ? nullptr : a.absmax;
  p.absmax_q = a.absmax_q;
  p.absmax2 = a.absmax2;
  p.code8 = a.code8;
  p.offset = a.offset;
  p.bias = a.bias;
  p.xa = a.xa;
  p.lora_B = a.lora_B;
  p.y = a.y;
  p.K = a.K;
  p.N = a.N;
  p.R = a.xa ? a.R : 0;
  p.scaling = a.scaling;
  p.quant_type = a.quant_type;
  p.log2_blocksize = log2_blocksize;
  p.log2_split = log2_split;
  // Packed rows start at n*K/2 bytes and x rows at m*K elements; K % 32 == 0 makes both multiples
  // of 16 bytes, so 16-byte loads are legal everywhere iff both base pointers are 16-byte aligned.
  const bool aligned = reinterpret_cast<uintptr_t>(a.packed) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  const unsigned g = (unsigned)grid;
  switch (a.dtype) {
    case kFloat32: launch_t<float>(a.M, p, aligned, g, stream); break;
    case kFloat16: launch_t<__half>(a.M, p, aligned, g, stream); break;
    default: launch_t<__nv_bfloat16>(a.M, p, aligned, g, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace peftkern::cuda
