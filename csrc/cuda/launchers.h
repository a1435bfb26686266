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

}  // namespace peftkern::cuda
