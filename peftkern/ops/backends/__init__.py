"""One module per backend, each implementing the same op signatures with no dispatch logic:
`reference` (plain torch), `triton`, `cpp` (C++ CPU extension), `cuda` (CUDA extension).
`dispatch.plan` decides which one runs; `common` holds the LoRA-branch arithmetic they share
and `ext` the loaded extension."""
from . import cpp, cuda, reference, triton

MODULES = {"triton": triton, "cpp": cpp, "cuda": cuda, "reference": reference}
