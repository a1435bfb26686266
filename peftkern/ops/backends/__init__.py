"""One module per backend, each implementing the same op signatures with no dispatch logic:
`reference` (plain torch), `triton`, `cpp` (C++ CPU extension), `cuda` (CUDA extension),
`cublas` (dequantize + cuBLAS on CUDA).
`dispatch.plan` decides which one runs; `common` holds the LoRA-branch arithmetic they share
and `ext` the loaded extension."""
from . import cpp, cublas, cuda, reference, triton

MODULES = {"triton": triton, "cpp": cpp, "cuda": cuda, "cublas": cublas, "reference": reference}
