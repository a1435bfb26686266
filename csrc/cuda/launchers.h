// C launchers of the CUDA kernels: torch-free (plain pointers + stream), so nvcc compiles them on
// machines whose torch has no CUDA. Bound to torch ops in csrc/bindings.cpp.
#pragma once
#include <stdint.h>
#include <cuda_runtime.h>

namespace peftkern::cuda {

enum OutDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// absmax_q != nullptr selects double-quantized absmax (code8/absmax2/offset then required).
cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                            const float* absmax2, const float* code8, const float* offset,
                            int quant_type, int64_t blocksize, int64_t n, int out_dtype, void* out,
                            cudaStream_t stream);

// Fused QLoRA GEMV for decode-size batches (csrc/cuda/qlora_gemv.cu):
//   y[m, n] = sum_k x[m, k] * deq(W)[n, k] + bias[n] + scaling * sum_r xa[m, r] * lora_B[n, r]
// W [N, K] is bnb 4-bit (`packed`, two codes per byte, even flat index in the high nibble) with
// plain fp32 `absmax`, or double-quantized absmax (absmax_q != nullptr: absmax2, code8 and offset,
// a device pointer to one fp32, are then required). x [M, K], bias [N] (or nullptr), xa [M, R],
// lora_B [N, R] (both nullptr for no LoRA term) and y [M, N] are contiguous and share `dtype`
// (an OutDtype). Requires 1 <= M <= 16, K % blocksize == 0, blocksize a power of two in
// [32, 4096]. fp32 accumulation, one rounding to dtype; deterministic (no atomics).
struct QloraGemvArgs {
  const void* x;
  int64_t M, K, N;
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* absmax_q;
  const float* absmax2;
  const float* code8;
  const float* offset;  // device pointer to 1 float (nested only)
  int quant_type;
  int64_t blocksize;
  const void* bias;
  const void* xa;
  const void* lora_B;
  int64_t R;
  float scaling;
  void* y;
  int dtype;  // OutDtype of x, bias, xa, lora_B, y
};

// cudaErrorInvalidValue on bad arguments; cudaSuccess without a launch when M == 0 or N == 0.
cudaError_t qlora_gemv(const QloraGemvArgs& args, cudaStream_t stream);

}  // namespace peftkern::cuda
