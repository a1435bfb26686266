// CUDA 4-bit dequantize, bit-identical to bitsandbytes. Torch-free: plain pointers and a stream
// (the torch binding is csrc/bindings.cpp), so .ci/nvcc_check compiles it without torch.
//
// Each CTA of 256 threads walks tiles of 4096 packed bytes (8192 elements) in a grid-stride loop:
//   1. every thread loads 16 packed bytes with one 16-byte load (byte loads for a tail tile or a
//      misaligned `packed`) into shared memory; the threads also decode the absmax of each
//      quantization block the tile touches (plain fp32, or double-quantized: code8 * absmax2 +
//      offset, two separate roundings) into shared memory;
//   2. every thread then decodes 16 bytes of output per step (4 fp32 or 8 fp16/bf16 elements)
//      and writes them with one 16-byte store, consecutive threads writing consecutive 16 bytes
//      (fully coalesced). Tail tiles and misaligned outputs store element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "peftkern/codes.h"

namespace peftkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileBytes = kThreads * 16;     // one 16-byte load per thread
constexpr int kTileElems = kTileBytes * 2;    // 8192
constexpr int kMinBlocksize = 32, kMaxBlocksize = 4096;
constexpr int kMaxTileQBlocks = kTileElems / kMinBlocksize;  // 256 == kThreads
static_assert(kMaxTileQBlocks <= kThreads, "one absmax per thread per tile");
static_assert(kTileElems % kMaxBlocksize == 0, "tiles start on a quantization block");

struct Absmax {
  const float* absmax;      // fp32 absmax, or nullptr when double-quantized
  const uint8_t* absmax_q;  // uint8 absmax (double quant)
  const float* absmax2;     // fp32 [ceil(nblocks / 256)]
  const float* code8;       // fp32 [256]
  const float* offset;      // fp32 [1]
};

template <typename T> struct Out;
template <> struct Out<float> {
  static constexpr int kVec = 4;  // elements per 16-byte store
  __device__ __forceinline__ static float convert(float v) { return v; }
  __device__ __forceinline__ static uint32_t bits(float v) { return __float_as_uint(v); }
};
template <> struct Out<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static __half convert(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static uint32_t bits(__half v) { return __half_as_ushort(v); }
};
template <> struct Out<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static __nv_bfloat16 convert(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2048 / kThreads)
dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const Absmax am, const int quant_type,
                       const int log2_blocksize, const int64_t n, const bool packed_aligned,
                       const bool out_aligned, T* __restrict__ out) {
  constexpr int kVec = Out<T>::kVec;
  constexpr int kBytes = kVec / 2;                             // packed bytes per store
  constexpr int kSteps = kTileElems / (kVec * kThreads);       // 8 (fp32) or 4 (16-bit)
  __shared__ __align__(16) uint8_t s_bytes[kTileBytes];
  __shared__ float s_table[16];
  __shared__ float s_scale[kMaxTileQBlocks];

  const int t = threadIdx.x;
  if (t < 16) s_table[t] = code_value(quant_type, t);
  const bool nested = am.absmax_q != nullptr;
  const float offset = nested ? *am.offset : 0.0f;
  const int64_t nbytes = (n + 1) / 2;
  const int64_t nqblocks = ((n - 1) >> log2_blocksize) + 1;
  const int64_t ntiles = (nbytes + kTileBytes - 1) / kTileBytes;
  const int tile_qblocks = kTileElems >> log2_blocksize;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t byte0 = tile * kTileBytes, elem0 = 2 * byte0;
    const bool full = elem0 + kTileElems <= n;
    // 1. packed bytes and the tile's scales into shared memory.
    if (full && packed_aligned) {
      reinterpret_cast<uint4*>(s_bytes)[t] = reinterpret_cast<const uint4*>(packed + byte0)[t];
    } else {
#pragma unroll 4
      for (int j = t; j < kTileBytes; j += kThreads)
        s_bytes[j] = byte0 + j < nbytes ? packed[byte0 + j] : 0;
    }
    if (t < tile_qblocks) {
      const int64_t qb = (elem0 >> log2_blocksize) + t;
      float scale = 0.0f;
      if (qb < nqblocks)
        scale = nested ? decode_absmax(am.absmax_q, am.absmax2, am.code8, offset, qb) : am.absmax[qb];
      s_scale[t] = scale;
    }
    __syncthreads();
    // 2. decode and store 16 bytes of output per thread and step.
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int e = (step * kThreads + t) * kVec;  // first element, relative to the tile
      const float scale = s_scale[e >> log2_blocksize];  // kVec <= 32 <= blocksize: one block
      uint32_t word;
      if constexpr (kBytes == 4) word = *reinterpret_cast<const uint32_t*>(s_bytes + e / 2);
      else word = *reinterpret_cast<const uint16_t*>(s_bytes + e / 2);
      T v[kVec];
#pragma unroll
      for (int k = 0; k < kBytes; ++k) {
        const uint8_t byte = (uint8_t)(word >> (8 * k));
        v[2 * k] = Out<T>::convert(s_table[high_code(byte)] * scale);
        v[2 * k + 1] = Out<T>::convert(s_table[low_code(byte)] * scale);
      }
      T* o = out + elem0 + e;
      if (full && out_aligned) {
        uint4 w;
        uint32_t* wp = reinterpret_cast<uint32_t*>(&w);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if constexpr (kVec == 4) wp[k] = Out<T>::bits(v[k]);
          else wp[k] = Out<T>::bits(v[2 * k]) | (Out<T>::bits(v[2 * k + 1]) << 16);
        }
        *reinterpret_cast<uint4*>(o) = w;
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          if (elem0 + e + k < n) o[k] = v[k];
      }
    }
    __syncthreads();  // s_bytes / s_scale are rewritten by the next tile
  }
}

template <typename T>
cudaError_t launch(const uint8_t* packed, const Absmax& am, int quant_type, int log2_blocksize,
                   int64_t n, T* out, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t ntiles = ((n + 1) / 2 + kTileBytes - 1) / kTileBytes;
  const int64_t max_ctas = (int64_t)(sms > 0 ? sms : 1) * (2048 / kThreads);  // one full wave
  const int grid = (int)(ntiles < max_ctas ? ntiles : max_ctas);
  const bool packed_aligned = reinterpret_cast<uintptr_t>(packed) % 16 == 0;
  const bool out_aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  dequantize_4bit_kernel<T><<<grid, kThreads, 0, stream>>>(packed, am, quant_type, log2_blocksize,
                                                           n, packed_aligned, out_aligned, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                            const float* absmax2, const float* code8, const float* offset,
                            int quant_type, int64_t blocksize, int64_t n, int out_dtype, void* out,
                            cudaStream_t stream) {
  if (n < 0 || (quant_type != kNF4 && quant_type != kFP4) || blocksize < kMinBlocksize ||
      blocksize > kMaxBlocksize || (blocksize & (blocksize - 1)) != 0)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!packed || !out || (absmax_q ? !(absmax2 && code8 && offset) : !absmax))
    return cudaErrorInvalidValue;
  int log2_blocksize = 0;
  while ((int64_t(1) << log2_blocksize) < blocksize) ++log2_blocksize;
  const Absmax am{absmax_q ? nullptr : absmax, absmax_q, absmax2, code8, offset};
  switch (out_dtype) {
    case kFloat32:
      return launch(packed, am, quant_type, log2_blocksize, n, static_cast<float*>(out), stream);
    case kFloat16:
      return launch(packed, am, quant_type, log2_blocksize, n, static_cast<__half*>(out), stream);
    case kBFloat16:
      return launch(packed, am, quant_type, log2_blocksize, n, static_cast<__nv_bfloat16*>(out),
                    stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace peftkern::cuda
