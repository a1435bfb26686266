// torch.library registration of the C++/CUDA ops (namespace peftkern_C). Importing peftkern._C
// loads this library, which registers them: torch.ops.peftkern_C.{quantize_4bit, dequantize_4bit,
// code_table}. The Python layer (peftkern/ops) validates user input; the TORCH_CHECKs here are a
// safety net for direct callers.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/qlora_gemv.h"
#include "cpu/quant_4bit.h"
#include "peftkern/codes.h"
#ifdef PEFTKERN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/launchers.h"
#endif

// Dispatch over exactly the three supported floating types.
#define PEFTKERN_DISPATCH_FLOAT(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_args(int64_t quant_type, int64_t blocksize) {
  TORCH_CHECK(quant_type == peftkern::kNF4 || quant_type == peftkern::kFP4,
              "peftkern_C: quant_type must be 0 (nf4) or 1 (fp4), got ", quant_type);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "peftkern_C: blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                  const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, "peftkern_C: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, "peftkern_C: ", name, " is on ", t.device(), ", expected ",
              device);
  TORCH_CHECK(t.is_contiguous(), "peftkern_C: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, "peftkern_C: ", name, " has ", t.numel(),
              " elements, expected ", numel);
}

// A kernel output. With PEFTKERN_NAN_FILL=1 (the test suite sets it) it starts as NaN (0xAB for
// bytes), so that an element a kernel fails to write cannot pass a test by chance.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool fill = [] {
    const char* v = std::getenv("PEFTKERN_NAN_FILL");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (!fill) return at::empty(sizes, options);
  const at::Scalar fill_value = options.dtype() == at::kByte ? at::Scalar(0xAB) : at::Scalar(NAN);
  return at::full(sizes, fill_value, options);
}

int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t quant_type,
                                                     int64_t blocksize) {
  check_args(quant_type, blocksize);
  TORCH_CHECK(is_float_type(A.scalar_type()),
              "peftkern_C: A must be float32, float16 or bfloat16, got ", A.scalar_type());
  TORCH_CHECK(A.device().is_cpu(), "peftkern_C: quantize_4bit runs on CPU tensors, A is on ",
              A.device());
  TORCH_CHECK(A.is_contiguous(), "peftkern_C: A must be contiguous");
  const int64_t n = A.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({num_blocks(n, blocksize)}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  PEFTKERN_DISPATCH_FLOAT(A.scalar_type(), "peftkern_C::quantize_4bit", [&] {
    peftkern::cpu::quantize_4bit<scalar_t>(A.const_data_ptr<scalar_t>(), n, (int)quant_type,
                                           blocksize, packed.mutable_data_ptr<uint8_t>(),
                                           absmax.mutable_data_ptr<float>());
  });
  return {packed, absmax};
}

// Checks the dequantize arguments (all on packed's device); returns whether absmax is nested.
bool check_dequant_args(const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& absmax2,
                        const std::optional<at::Tensor>& code8,
                        const std::optional<at::Tensor>& offset, int64_t quant_type,
                        int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  check_args(quant_type, blocksize);
  TORCH_CHECK(numel >= 0, "peftkern_C: numel must be >= 0, got ", numel);
  TORCH_CHECK(is_float_type(dtype), "peftkern_C: dtype must be float32, float16 or bfloat16, got ",
              dtype);
  const at::Device dev = packed.device();
  const int64_t nblocks = num_blocks(numel, blocksize);
  check_tensor(packed, "packed", at::kByte, (numel + 1) / 2, dev);
  const bool nested = absmax.scalar_type() == at::kByte;
  check_tensor(absmax, "absmax", nested ? at::kByte : at::kFloat, nblocks, dev);
  if (nested) {
    TORCH_CHECK(absmax2.has_value() && code8.has_value() && offset.has_value(),
                "peftkern_C: uint8 absmax (double quant) needs absmax2, code8 and offset");
    check_tensor(*absmax2, "absmax2", at::kFloat,
                 num_blocks(nblocks, peftkern::kNestedBlocksize), dev);
    check_tensor(*code8, "code8", at::kFloat, 256, dev);
    check_tensor(*offset, "offset", at::kFloat, 1, dev);
  }
  return nested;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2,
                               const std::optional<at::Tensor>& code8,
                               const std::optional<at::Tensor>& offset, int64_t quant_type,
                               int64_t blocksize, int64_t numel, at::ScalarType dtype,
                               int64_t simd_level) {
  TORCH_CHECK(packed.device().is_cpu(), "peftkern_C: packed must be a CPU tensor here");
  const bool nested = check_dequant_args(packed, absmax, absmax2, code8, offset, quant_type,
                                         blocksize, numel, dtype);
  at::Tensor out = new_output({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  PEFTKERN_DISPATCH_FLOAT(dtype, "peftkern_C::dequantize_4bit", [&] {
    peftkern::cpu::dequantize_4bit<scalar_t>(
        packed.const_data_ptr<uint8_t>(), nested ? nullptr : absmax.const_data_ptr<float>(),
        nested ? absmax.const_data_ptr<uint8_t>() : nullptr,
        nested ? absmax2->const_data_ptr<float>() : nullptr,
        nested ? code8->const_data_ptr<float>() : nullptr,
        nested ? *offset->const_data_ptr<float>() : 0.0f, (int)quant_type, blocksize, numel,
        out.mutable_data_ptr<scalar_t>(), (int)simd_level);
  });
  return out;
}

#ifdef PEFTKERN_WITH_CUDA
int cuda_dtype(at::ScalarType t) {
  return t == at::kFloat ? peftkern::cuda::kFloat32
         : t == at::kHalf ? peftkern::cuda::kFloat16
                          : peftkern::cuda::kBFloat16;
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& absmax2,
                                const std::optional<at::Tensor>& code8,
                                const std::optional<at::Tensor>& offset, int64_t quant_type,
                                int64_t blocksize, int64_t numel, at::ScalarType dtype,
                                int64_t /*simd_level*/, bool /*bf16_products: CPU only*/) {
  TORCH_CHECK(packed.device().is_cuda(), "peftkern_C: packed must be a CUDA tensor here");
  const bool nested = check_dequant_args(packed, absmax, absmax2, code8, offset, quant_type,
                                         blocksize, numel, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = new_output({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const cudaError_t err = peftkern::cuda::dequantize_4bit(
      packed.const_data_ptr<uint8_t>(), nested ? nullptr : absmax.const_data_ptr<float>(),
      nested ? absmax.const_data_ptr<uint8_t>() : nullptr,
      nested ? absmax2->const_data_ptr<float>() : nullptr,
      nested ? code8->const_data_ptr<float>() : nullptr,
      nested ? offset->const_data_ptr<float>() : nullptr, (int)quant_type, blocksize, numel,
      cuda_dtype(dtype), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "peftkern_C: dequantize_4bit launch failed: ",
              cudaGetErrorString(err));
  return out;
}
#endif

// The GEMV arguments (CPU and CUDA): x [M <= 16, K] contiguous, blocks within rows, bias/xa/lora_B
// in x's dtype on x's device. Returns {nested absmax, R}.
std::pair<bool, int64_t> check_gemv_args(const at::Tensor& x, const at::Tensor& packed,
                                         const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& absmax2,
                                         const std::optional<at::Tensor>& code8,
                                         const std::optional<at::Tensor>& offset,
                                         int64_t quant_type, int64_t blocksize, int64_t N,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& xa,
                                         const std::optional<at::Tensor>& lora_B) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "peftkern_C: x must be a contiguous matrix");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= peftkern::kMaxGemvRows, "peftkern_C: qlora_gemv takes at most ",
              peftkern::kMaxGemvRows, " rows, got ", M);
  check_args(quant_type, blocksize);
  TORCH_CHECK(K % blocksize == 0, "peftkern_C: in_features (", K,
              ") must be a multiple of blocksize (", blocksize, ")");
  TORCH_CHECK(packed.device() == x.device(), "peftkern_C: packed is on ", packed.device(),
              ", expected ", x.device());
  const bool nested = check_dequant_args(packed, absmax, absmax2, code8, offset, quant_type,
                                         blocksize, N * K, x.scalar_type());
  const at::ScalarType dt = x.scalar_type();
  if (bias) check_tensor(*bias, "bias", dt, N, x.device());
  TORCH_CHECK(xa.has_value() == lora_B.has_value(), "peftkern_C: xa and lora_B come together");
  const int64_t R = xa ? (xa->dim() == 2 ? xa->size(1) : -1) : 0;
  if (xa) {
    TORCH_CHECK(R >= 1, "peftkern_C: xa must be [M, R] with R >= 1");
    check_tensor(*xa, "xa", dt, M * R, x.device());
    check_tensor(*lora_B, "lora_B", dt, N * R, x.device());
  }
  return {nested, R};
}

// The CPU GEMV's path for M rows (csrc/cpu/qlora_gemv.cpp `choose`), for plan(...) to report.
std::string gemv_path(int64_t M, bool bf16_products, int64_t simd_level) {
  return peftkern::cpu::gemv_path(M, bf16_products, (int)simd_level);
}

bool gemv_lora_in_kernel(int64_t M, bool bf16_products, int64_t simd_level) {
  return peftkern::cpu::gemv_lora_in_kernel(M, bf16_products, (int)simd_level);
}

// y [M, N] = x·deq(W)ᵀ + bias + s·xa·Bᵀ for fp32 x [M <= 16, K] (CPU; see csrc/cpu/qlora_gemv.cpp).
// bf16_products: x and the weights rounded to bf16 before multiplying (bf16 compute), where the
// CPU has a faster path for it.
at::Tensor qlora_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& absmax2,
                          const std::optional<at::Tensor>& code8,
                          const std::optional<at::Tensor>& offset, int64_t quant_type,
                          int64_t blocksize, int64_t out_features,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& xa,
                          const std::optional<at::Tensor>& lora_B, double scaling,
                          int64_t simd_level, bool bf16_products) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "peftkern_C: x must be an fp32 CPU tensor here");
  const auto [nested, R] = check_gemv_args(x, packed, absmax, absmax2, code8, offset, quant_type,
                                           blocksize, out_features, bias, xa, lora_B);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  at::Tensor y = new_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  peftkern::cpu::GemvArgs a{x.const_data_ptr<float>(), M, K, N, packed.const_data_ptr<uint8_t>(),
                            nested ? nullptr : absmax.const_data_ptr<float>(),
                            nested ? absmax.const_data_ptr<uint8_t>() : nullptr,
                            nested ? absmax2->const_data_ptr<float>() : nullptr,
                            nested ? code8->const_data_ptr<float>() : nullptr,
                            nested ? *offset->const_data_ptr<float>() : 0.0f, (int)quant_type,
                            blocksize, bias ? bias->const_data_ptr<float>() : nullptr,
                            xa ? xa->const_data_ptr<float>() : nullptr,
                            lora_B ? lora_B->const_data_ptr<float>() : nullptr, R, (float)scaling,
                            y.mutable_data_ptr<float>(), bf16_products};
  peftkern::cpu::qlora_gemv(a, (int)simd_level);
  return y;
}

#ifdef PEFTKERN_WITH_CUDA
// The same op on CUDA (csrc/cuda/qlora_gemv.cu): x, bias, xa, lora_B and y in fp32/fp16/bf16.
at::Tensor qlora_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax2,
                           const std::optional<at::Tensor>& code8,
                           const std::optional<at::Tensor>& offset, int64_t quant_type,
                           int64_t blocksize, int64_t out_features,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& xa,
                           const std::optional<at::Tensor>& lora_B, double scaling,
                           int64_t /*simd_level*/, bool /*bf16_products: CPU only*/) {
  TORCH_CHECK(x.device().is_cuda() && is_float_type(x.scalar_type()),
              "peftkern_C: x must be a float32/float16/bfloat16 CUDA tensor here");
  const auto [nested, R] = check_gemv_args(x, packed, absmax, absmax2, code8, offset, quant_type,
                                           blocksize, out_features, bias, xa, lora_B);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  at::Tensor y = new_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const peftkern::cuda::QloraGemvArgs a{
      x.const_data_ptr(), M, K, N, packed.const_data_ptr<uint8_t>(),
      nested ? nullptr : absmax.const_data_ptr<float>(),
      nested ? absmax.const_data_ptr<uint8_t>() : nullptr,
      nested ? absmax2->const_data_ptr<float>() : nullptr,
      nested ? code8->const_data_ptr<float>() : nullptr,
      nested ? offset->const_data_ptr<float>() : nullptr, (int)quant_type, blocksize,
      bias ? bias->const_data_ptr() : nullptr, xa ? xa->const_data_ptr() : nullptr,
      lora_B ? lora_B->const_data_ptr() : nullptr, R, (float)scaling, y.mutable_data_ptr(),
      cuda_dtype(x.scalar_type())};
  const cudaError_t err = peftkern::cuda::qlora_gemv(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "peftkern_C: qlora_gemv launch failed: ",
              cudaGetErrorString(err));
  return y;
}
#endif

at::Tensor code_table(int64_t quant_type) {
  TORCH_CHECK(quant_type == peftkern::kNF4 || quant_type == peftkern::kFP4,
              "peftkern_C: quant_type must be 0 (nf4) or 1 (fp4), got ", quant_type);
  at::Tensor t = at::empty({16}, at::dtype(at::kFloat));
  std::memcpy(t.mutable_data_ptr<float>(), peftkern::code_table((int)quant_type),
              16 * sizeof(float));
  return t;
}

}  // namespace

TORCH_LIBRARY(peftkern_C, m) {
  m.def("quantize_4bit(Tensor A, int quant_type, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_4bit(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, "
        "Tensor? offset, int quant_type, int blocksize, int numel, ScalarType dtype, "
        "int simd_level=3) -> Tensor");
  m.def("code_table(int quant_type) -> Tensor");
  m.def("qlora_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code8, "
        "Tensor? offset, int quant_type, int blocksize, int out_features, Tensor? bias, Tensor? xa, "
        "Tensor? lora_B, float scaling, int simd_level=3, bool bf16_products=False) -> Tensor");
  m.def("gemv_path(int M, bool bf16_products, int simd_level=3) -> str");
  m.def("gemv_lora_in_kernel(int M, bool bf16_products, int simd_level=3) -> bool");
}

TORCH_LIBRARY_IMPL(peftkern_C, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("qlora_gemv", &qlora_gemv_cpu);
}

// code_table takes no tensor, so no backend key can be computed from its arguments: register it
// for every backend.
TORCH_LIBRARY_IMPL(peftkern_C, CompositeExplicitAutograd, m) {
  m.impl("code_table", &code_table);
  m.impl("gemv_path", &gemv_path);
  m.impl("gemv_lora_in_kernel", &gemv_lora_in_kernel);
}

#ifdef PEFTKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(peftkern_C, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("qlora_gemv", &qlora_gemv_cuda);
}
#endif

// A Python module, so that `import peftkern._C` loads this library (which registers the ops).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern C++/CUDA kernels; the ops are torch.ops.peftkern_C.*";
}
