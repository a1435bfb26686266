// CUDA 4-bit dequantize, bit-identical to bitsandbytes: 16-byte loads of packed codes, absmax
// (plain or double-quantized) decoded in-kernel, grid-stride loop.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "peftkern/codes.h"

namespace peftkern::cuda {
namespace {

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Scales {
  const float* absmax; const uint8_t* absmax_q; const float* absmax2; const float* code8;
  const float* offset;
  __device__ __forceinline__ float operator()(int64_t block) const {
    return absmax_q ? decode_absmax(absmax_q, absmax2, code8, *offset, block) : absmax[block];
  }
};

template <typename T>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, Scales scale_of,
                                       int quant_type, int64_t blocksize, int64_t n, bool aligned,
                                       T* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code_value(quant_type, threadIdx.x);
  __syncthreads();
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  // Full 16-byte vectors: 32 elements, always inside one quantization block (blocksize >= 32).
  const int64_t nvec = aligned ? n / 32 : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    const uint4 raw = reinterpret_cast<const uint4*>(packed)[v];
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    const float scale = scale_of(v * 32 / blocksize);
    T* o = out + v * 32;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      o[2 * k] = from_float<T>(table[bytes[k] >> 4] * scale);
      o[2 * k + 1] = from_float<T>(table[bytes[k] & 0xF] * scale);
    }
  }
  for (int64_t i = nvec * 32 + tid; i < n; i += stride)  // tail, one element per thread
    out[i] = from_float<T>(table[unpack_code(packed[i / 2], i & 1)] * scale_of(i / blocksize));
}

template <typename T>
cudaError_t launch(const uint8_t* packed, Scales s, int qt, int64_t bs, int64_t n, T* out,
                   cudaStream_t stream) {
  const int threads = 256;
  const int64_t work = n / 32 + 32;  // vectors, plus room for the scalar tail
  const int blocks = (int)std::min<int64_t>((work + threads - 1) / threads, 8192);  // grid-stride
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % 16 == 0;
  dequantize_4bit_kernel<T><<<blocks, threads, 0, stream>>>(packed, s, qt, bs, n, aligned, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                            const float* absmax2, const float* code8, const float* offset,
                            int quant_type, int64_t blocksize, int64_t n, int out_dtype, void* out,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const Scales s{absmax, absmax_q, absmax2, code8, offset};
  switch (out_dtype) {
    case kFloat32: return launch(packed, s, quant_type, blocksize, n, (float*)out, stream);
    case kFloat16: return launch(packed, s, quant_type, blocksize, n, (__half*)out, stream);
    case kBFloat16: return launch(packed, s, quant_type, blocksize, n, (__nv_bfloat16*)out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace peftkern::cuda
