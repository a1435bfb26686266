// torch.library registration of the C++/CUDA ops (namespace peftkern_C). The Python layer
// (peftkern/ops) validates user input; the checks here are a safety net for direct callers.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/quant_4bit.h"
#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include "cuda/launchers.h"
#endif
#include "peftkern/codes.h"

// Dispatch over exactly the three supported floating types.
#define PK_DISPATCH_FLOAT(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                    \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace {

void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_args(int64_t quant_type, int64_t blocksize) {
  TORCH_CHECK(quant_type == peftkern::kNF4 || quant_type == peftkern::kFP4,
              "quant_type must be 0 (nf4) or 1 (fp4), got ", quant_type);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t quant_type,
                                                     int64_t blocksize) {
  check_float_input(A, "A");
  check_args(quant_type, blocksize);
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  at::Tensor packed = at::empty({(n + 1) / 2}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, a.options().dtype(at::kFloat));
  PK_DISPATCH_FLOAT(a.scalar_type(), "quantize_4bit", [&] {
    peftkern::cpu::quantize_4bit<scalar_t>(a.data_ptr<scalar_t>(), n, (int)quant_type, blocksize,
                                           packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

// Shared checks of the dequantize arguments; returns whether absmax is double-quantized.
bool check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax,
                        const c10::optional<at::Tensor>& absmax2,
                        const c10::optional<at::Tensor>& code8,
                        const c10::optional<at::Tensor>& offset, int64_t quant_type,
                        int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  check_args(quant_type, blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "packed has ", packed.numel(),
              " bytes, expected ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks && absmax.is_contiguous(), "absmax must hold ", nblocks,
              " contiguous values");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dtype must be float32, float16 or bfloat16");
  const bool nested = absmax.scalar_type() == at::kByte;
  TORCH_CHECK(nested || absmax.scalar_type() == at::kFloat, "absmax must be float32 or uint8");
  if (nested) {
    TORCH_CHECK(absmax2 && code8 && offset, "uint8 absmax needs absmax2, code8 and offset");
    TORCH_CHECK(absmax2->scalar_type() == at::kFloat && absmax2->is_contiguous() &&
                    absmax2->numel() == (nblocks + 255) / 256,
                "absmax2 must be contiguous float32 with ceil(nblocks/256) values");
    TORCH_CHECK(code8->scalar_type() == at::kFloat && code8->is_contiguous() &&
                    code8->numel() == 256, "code8 must be 256 contiguous float32 values");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1,
                "offset must be one float32 value");
  }
  return nested;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& absmax2,
                               const c10::optional<at::Tensor>& code8,
                               const c10::optional<at::Tensor>& offset, int64_t quant_type,
                               int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const bool nested = check_dequant_args(packed, absmax, absmax2, code8, offset, quant_type,
                                         blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  PK_DISPATCH_FLOAT(dtype, "dequantize_4bit", [&] {
    peftkern::cpu::dequantize_4bit<scalar_t>(
        packed.data_ptr<uint8_t>(), nested ? nullptr : absmax.data_ptr<float>(),
        nested ? absmax.data_ptr<uint8_t>() : nullptr,
        nested ? absmax2->data_ptr<float>() : nullptr, nested ? code8->data_ptr<float>() : nullptr,
        nested ? offset->item<float>() : 0.0f, (int)quant_type, blocksize, numel,
        out.data_ptr<scalar_t>());
  });
  return out;
}

#ifdef PEFTKERN_WITH_CUDA
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const c10::optional<at::Tensor>& absmax2,
                                const c10::optional<at::Tensor>& code8,
                                const c10::optional<at::Tensor>& offset, int64_t quant_type,
                                int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const bool nested = check_dequant_args(packed, absmax, absmax2, code8, offset, quant_type,
                                         blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const int out_dtype = dtype == at::kFloat ? peftkern::cuda::kFloat32
                        : dtype == at::kHalf ? peftkern::cuda::kFloat16
                                             : peftkern::cuda::kBFloat16;
  const cudaError_t err = peftkern::cuda::dequantize_4bit(
      packed.data_ptr<uint8_t>(), nested ? nullptr : absmax.data_ptr<float>(),
      nested ? absmax.data_ptr<uint8_t>() : nullptr, nested ? absmax2->data_ptr<float>() : nullptr,
      nested ? code8->data_ptr<float>() : nullptr, nested ? offset->data_ptr<float>() : nullptr,
      (int)quant_type, blocksize, numel, out_dtype, out.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "peftkern dequantize_4bit launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

at::Tensor code_table(int64_t quant_type) {
  check_args(quant_type, 64);
  at::Tensor t = at::empty({16}, at::dtype(at::kFloat));
  for (int i = 0; i < 16; ++i) t[i] = peftkern::code_value((int)quant_type, i);
  return t;
}

}  // namespace

TORCH_LIBRARY(peftkern_C, m) {
  m.def("quantize_4bit(Tensor A, int quant_type, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, "
        "Tensor? offset, int quant_type, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def("code_table(int quant_type) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftkern_C, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

TORCH_LIBRARY_IMPL(peftkern_C, CompositeExplicitAutograd, m) { m.impl("code_table", &code_table); }

#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern_C, CUDA, m) { m.impl("dequantize_4bit", &dequantize_4bit_cuda); }
#endif

// Importing peftkern._C loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
