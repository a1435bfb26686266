"""Gluon kernels (Hopper, sm_90a): the 4-bit forward and input gradient with the decoded weight
as wgmma's register operand, laid out so that no decoded value moves between threads or through
shared memory on its way to the tensor core. Forward: one kernel for small M (x rows as wgmma's
N = 16), one for large M (N = 128); dX: one kernel for large M.

The forwards compute what `lora_linear._block_scaled_mma` does (the swapped forward: the codes'
table values in the activation dtype times xᵀ, each quantization block's fp32 partial sum times
its scale), for 16-bit x:
- M <= 16 (`_qlora_wgmma_kernel`, blocks of 64..512 columns): split-K into an fp32 workspace
  `ws[split, m, n]` that `lora_linear._split_k_epilogue_kernel` adds up with the LoRA term, as
  for every split-K tile config; x's K slice is staged once per program, the scales per tile;
- M >= 128 (`_qlora_wgmma_large_kernel`, blocks of any multiple of 64): [128 n x 128 m] tiles
  over all of K; x streams through two shared buffers (each sub-step's x is loaded while the
  one before multiplies), and each sub-step's block scales, decoded once per call by
  `quant_4bit.block_scales_t` (bnb decodes nested absmax first too), are loaded with its bytes;
  table indices as in dX (one PRMT per byte, the 64-word-stride table). Its epilogue is in the
  kernel (`large_linear`: + s·(xA)·Bᵀ + bias, one rounding, no workspace) except for DoRA's
  output scale and pre-scale z, which take the workspace path (`forward_partials`).

dX (`_qlora_wgmma_dx_kernel`, M >= 128, bf16 dY): dX = dY·W + s·(L·R2) [⊙ mask] with its own
epilogue (`_lora_epilogue`, shared with the large forward), no workspace. Tiles of 64 k (wgmma's
M: the decoded Wᵀ from registers, swap AB) x 128 m rows, persistent (two programs per SM), each
summing all of N in sub-steps of 64 rows of W.
The reduction runs along W's rows, so a block's scale varies along it: the kernel multiplies dY's
columns by the tile's block scales (a 64-k tile lies in one block; dY · scale in bf16, one
HMUL2 per two values) and the codes' table values stay unscaled. The A fragment pairs two
reduction values (rows n, n + 1 of W) in a register while a packed byte pairs two k: each
sub-step's bytes are transposed through a small swizzled shared buffer (a 4x4 byte transpose in
8 PRMT, conflict-free both ways), one PRMT per byte makes its table address (the 64-word-stride
copy), and a k pair's two nibbles land in accumulator rows g and g + 8 (row r = 16 w + 8 h + g
is k = 16 w + 2 g + h: `_paired`; the large forward orders its weight rows the same way), adjacent
again in the output store. Rounding: each weight value is its code rounded to bf16, each dY
value times its block scale (rounded to bf16) rounded once: as exact as dequantize-then-matmul,
not bit-identical (tests/test_qlora_wgmma.py checks the error rule). fp16 dY is refused (a scaled fp16 gradient would lose small values to subnormals).

Gluon kernels do not run under TRITON_INTERPRET: the interpreter runs the Triton kernel with the
same math instead (`lora_linear.lora_matmul`), these are checked by the static report (`python
-m peftkern.bench.static`), by torch mirrors of their tensor programs (tests/test_qlora_wgmma.py)
and, on a GPU, by tests/test_gpu.py.

Forward layout (small M: a CTA of 4 warps = one warpgroup, 128 weight rows, one K sub-step = 64 codes =
32 bytes per row; each thread loads 8 contiguous packed bytes of 4 rows, two 32-bit words; large
M: 8 warps, two warpgroups of 64 rows, 2 rows per thread). Per row, wgmma's register
A fragment (k_width 2) gives a thread byte pairs of K columns 2s, 2s + 1 for s = c, c + 4, ...,
c + 28 (c = lane % 4); so the kernel multiplies in "slot order": slot s = 4 i + c holds the
packed byte 8 c + i (both nibbles), and x's columns are permuted alike when x is staged in shared
memory (slot column 8 i + 2 c + h <- x column 16 c + 2 i + h). A sum over K does not depend on
its order. `convert_layout(..., assert_trivial=True)` makes the compiler prove that no decoded
value crosses threads or shared memory on its way to the fragment (a renaming of a thread's own
registers passes it too); the values themselves are what the torch mirrors check.
Lookups: one per byte, in a 32-way lane-interleaved copy of the 256-entry pair table (entry e of
lane l's copy at word 32 e + l; dX: 64 e + l), so the 32 lanes of a warp always hit 32
different banks.
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon ships with Triton >= 3.5; without it this path is never taken
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
    from .quant_4bit import block_scale  # a Triton function: Gluon calls it as is
    from .quant_4bit import block_scales_t
    AVAILABLE = True
except ImportError:  # pragma: no cover - older Triton
    AVAILABLE = False

ROWS_PER_CTA = 128   # weight rows (output features) per CTA: two wgmma m64 tiles
SUB_K = 64           # codes per sub-step (32 packed bytes per row); one quantization block or less
STEPS = 2            # sub-steps per K-loop iteration: two register buffers of bytes in flight
KSPAN = 512          # K per CTA (the split-K slice): 8 sub-steps, x and scales staged for it
MAX_M = 16           # activation rows (wgmma's N)
RESIDENT = 4         # programs per SM (128 registers x 128 threads, 53 KB of shared memory)
LARGE_M = 128        # the large-M kernel's x rows per tile (wgmma's N), M > MAX_M
LARGE_WARPS = 8      # two warpgroups: 64 weight rows each
LARGE_RESIDENT = 1   # programs per SM (the large kernel's registers: see the static report)
DX_ROWS = 64         # the dX kernel's K rows per tile (wgmma's M: one warpgroup; one block)
DX_SUB = 64          # its reduction (N) per sub-step
DX_RESIDENT = 2      # its programs per SM


def supported(M: int, K: int, blocksize: int, dtype: torch.dtype) -> bool:
    """Shapes these kernels take: 16-bit x, K a multiple of a loop iteration, whole blocks: of
    64..KSPAN columns that tile the slices (M <= MAX_M: the small kernel), or of any multiple of
    a sub-step (M >= LARGE_M: the large one)."""
    return (AVAILABLE and M > 0 and dtype in (torch.float16, torch.bfloat16)
            and blocksize % SUB_K == 0 and K % blocksize == 0 and K % (SUB_K * STEPS) == 0
            and (M <= MAX_M and blocksize <= KSPAN or LARGE_M <= M))


def splits(K: int, M: int = 1) -> int:
    """K slices (workspace planes): the small kernel splits K, the large one sums all of it."""
    return -(-K // KSPAN) if M <= MAX_M else 1


if AVAILABLE:
    ROWS = gl.constexpr(ROWS_PER_CTA)
    SUB = gl.constexpr(SUB_K)
    BM = gl.constexpr(MAX_M)
    DXR = gl.constexpr(DX_ROWS)
    DXS = gl.constexpr(DX_SUB)

    @gluon.constexpr_function
    def _word_layout(warps):
        """A thread's 2 contiguous words of [ROWS, 8] (lanes 0-1 along K, lanes 2-4 and the warps
        down the rows, then registers): 4 rows per thread with 4 warps, 2 with 8."""
        warp_bases = [[16 << i, 0] for i in range(warps.bit_length() - 1)]
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [8, 0]] + [[16 * warps << i, 0] for i in range(3 - len(warp_bases))],
            lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
            warp_bases=warp_bases, block_bases=[], shape=[ROWS_PER_CTA, SUB_K // 8])

    @gluon.constexpr_function
    def _mma_layout(warps, n):
        """wgmma's accumulator: the warpgroups down the weight rows, n x rows (wgmma's N)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                         instr_shape=[16, n, 16])

    @gluon.constexpr_function
    def _blocked(vec, warps):
        """`vec` contiguous elements per thread, 8 threads along a row, the rest down rows."""
        return gl.BlockedLayout([1, vec], [4, 8], [warps, 1], [1, 0])

    @gluon.jit
    def _words(w_rows, j, nsub, WL: gl.constexpr, SKIP: gl.constexpr = True):
        """Sub-step j's packed words [ROWS, 8] (j past the slice: the last sub-step's address,
        never used: with SKIP not read at all, zeros)."""
        c = gl.arange(0, SUB // 8, layout=gl.SliceLayout(0, WL))
        at = w_rows + (gl.minimum(j, nsub - 1) * (SUB // 8) + c)[None, :]
        if SKIP:
            live = (c < (nsub - j) * (SUB // 8))[None, :]  # all true for j < nsub, else all false
            return gl.load(at, mask=live, other=0)
        return gl.load(at)

    @gluon.jit
    def _step(acc, cur, lane, table, xb, scales, j, MMA: gl.constexpr, A_L: gl.constexpr,
              DT: gl.constexpr):
        """acc += scale ⊙ (codes of words `cur` · xᵀ in shared buffer `xb`), sub-step j's scales."""
        return _scaled_mma(acc, _codes(cur, lane, table, A_L, DT), xb, _scale(scales, j, MMA))

    @gluon.jit
    def _scaled_mma(acc, a, xb, s):
        """acc + s ⊙ (a · xbᵀ): the block's fp32 partial sum times its per-row scale."""
        return gl.fma(warpgroup_mma(a, xb.permute((1, 0)), acc, use_acc=False), s[:, None], acc)

    @gluon.jit
    def _scale(scales, j, MMA: gl.constexpr):
        """Sub-step j's staged scale of each of the tile's rows, in the accumulator's rows."""
        return scales.gather(j * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA)), 0)

    @gluon.jit
    def _codes(cur, lane, table, A_L: gl.constexpr, DT: gl.constexpr, WIDE: gl.constexpr = False):
        """The table values of words `cur` [ROWS, 8] as wgmma's register A operand, slot order;
        WIDE: `table` at a 64-word stride (`_table64`, `lane` as 4 lane: one PRMT per index)."""
        # byte b of each word -> its table index (byte << 5) | lane; [ROWS, 8, 4] physical order
        if WIDE:
            i0 = _prmt_index(cur, lane, "0x5504")
            i1 = _prmt_index(cur, lane, "0x5514")
            i2 = _prmt_index(cur, lane, "0x5524")
            i3 = _prmt_index(cur, lane, "0x5534")
        else:
            i0 = ((cur << 5) & 0x1FE0) | lane
            i1 = ((cur >> 3) & 0x1FE0) | lane
            i2 = ((cur >> 11) & 0x1FE0) | lane
            i3 = ((cur >> 19) & 0x1FE0) | lane
        q4 = gl.join(gl.join(i0, i1), gl.join(i2, i3))  # [row, word, a, b] = byte a + 2 b
        idx = gl.reshape(gl.permute(q4, [0, 1, 3, 2]), [ROWS, 4, 8])  # [row, c, i]: byte 8 c + i
        idx = gl.reshape(gl.permute(idx, [0, 2, 1]), [ROWS * 32])     # slot order s = 4 i + c
        two = gl.reshape(table.gather(idx, 0), [ROWS, 32])
        hi = two.to(gl.int16).to(DT, bitcast=True)  # column 2 s: the high nibble (low half)
        lo = (two >> 16).to(gl.int16).to(DT, bitcast=True)
        return gl.convert_layout(gl.reshape(gl.join(hi, lo), [ROWS, SUB]), A_L, assert_trivial=True)

    @gluon.jit
    def _scales(smem, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, n0, k_lo, nsub, K, N,
                BS: gl.constexpr, NESTED: gl.constexpr, NSUB: gl.constexpr, SL: gl.constexpr):
        """Stage the tile's scale per (sub-step, row), [NSUB, ROWS] row-major, in fp32 with
        bnb's two roundings (the kernel is compiled without FMA contraction)."""
        sj = gl.arange(0, NSUB, layout=gl.SliceLayout(1, SL))
        sr = gl.minimum(gl.arange(0, ROWS, layout=gl.SliceLayout(0, SL)), N - 1 - n0)
        blk = sr[None, :] * (K // BS) + ((k_lo + gl.minimum(sj, nsub - 1) * SUB) // BS)[:, None]
        scale = block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                            n0.to(gl.int64) * (K // BS), blk, None, NESTED, False)
        gl.barrier()  # the previous tile's reads are done
        smem.store(gl.reshape(scale, [NSUB * ROWS]))
        gl.barrier()

    @gluon.jit
    def _table(pairs_ptr, TL: gl.constexpr):
        """The pair table in shared memory, 32 copies interleaved: [256, 32] row-major."""
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, TL))
        copies = gl.load(pairs_ptr + e)[:, None] + gl.zeros([256, 32], gl.int32, TL)
        return gl.allocate_shared_memory(gl.int32, [256 * 32], gl.SwizzledSharedLayout(1, 1, 1, [0]),
                                         gl.reshape(copies, [256 * 32]))

    @gluon.jit
    def _x_slot(x_rows, xm, k0, K, XL: gl.constexpr):
        """x[rows, k0:k0 + SUB] in slot order: x column 16 c + 2 i + h -> slot column
        8 i + 2 c + h; `x_rows` the row pointers [R, 1]; `xm` the rows' live mask (zeros past
        K), or None: every row live, k0 past K reads the last sub-step (a prefetch never used)."""
        kk = gl.arange(0, SUB, layout=gl.SliceLayout(0, XL))
        if xm is None:
            xt = gl.load(x_rows + (gl.minimum(k0, K - SUB) + kk)[None, :])
        else:
            xt = gl.load(x_rows + (k0 + kk)[None, :], mask=xm & ((k0 + kk) < K)[None, :],
                         other=0.0)
        R: gl.constexpr = xt.shape[0]
        return gl.reshape(gl.permute(gl.reshape(xt, [R, 4, 8, 2]), [0, 2, 1, 3]), [R, SUB])

    @gluon.jit
    def _lanes(WL: gl.constexpr):
        """Each word's lane (WL's lane bases: word bits 1-2, row bits 0-2): its table copy."""
        lr = gl.arange(0, ROWS, layout=gl.SliceLayout(1, WL))
        lc = gl.arange(0, SUB // 8, layout=gl.SliceLayout(0, WL))
        return ((lc[None, :] >> 1) & 3) | ((lr[:, None] & 7) << 2)

    @gluon.jit
    def _rows(w_ptr, tile, N, K, k_lo, WL: gl.constexpr, PAIRED: gl.constexpr = False):
        """Row pointers of n-tile `tile` (rows past N: row N - 1, never stored); PAIRED: tensor
        row r holds weight row `_paired(r)` (the large kernel: adjacent rows in a thread)."""
        n0 = tile * ROWS
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, WL))
        if PAIRED:
            r = _paired(r)
        r = gl.minimum(r, N - 1 - n0)
        return w_ptr + n0.to(gl.int64) * (K // 8) + (r * (K // 8) + k_lo // 8)[:, None]

    @gluon.jit
    def _qlora_wgmma_kernel(x_ptr, M, K, stride_xm, w_ptr, absmax_ptr, absmax2_ptr, code8_ptr,
                            offset_ptr, pairs_ptr, N, ws_ptr, splits, BS: gl.constexpr,
                            NESTED: gl.constexpr, KSPAN: gl.constexpr):
        """Persistent: program c sums K slice c % splits of the n-tiles c // splits, + G /
        splits, ... (G programs), so the table and its x slice are staged once."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        WL: gl.constexpr = _word_layout(4)
        MMA: gl.constexpr = _mma_layout(4, BM)
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        XL: gl.constexpr = _blocked(8, 4)
        SL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])
        TL: gl.constexpr = _blocked(4, 4)
        X_S: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, SUB], DT)
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        NSUB: gl.constexpr = KSPAN // SUB

        split = gl.program_id(0) % splits
        first = gl.program_id(0) // splits
        stride = gl.num_programs(0) // splits
        n_tiles = gl.cdiv(N, ROWS)
        k_lo = split * KSPAN
        nsub = gl.minimum(KSPAN, K - k_lo) // SUB  # the last slice may be shorter (x is 0 past K)
        table = _table(pairs_ptr, TL)
        # x[:, k_lo:k_lo + KSPAN] in slot order, one [BM, SUB] buffer per sub-step
        xs = gl.allocate_shared_memory(DT, [NSUB, BM, SUB], X_S)
        xm = gl.arange(0, BM, layout=gl.SliceLayout(1, XL))[:, None]
        for js in gl.static_range(NSUB):
            xs.index(js).store(_x_slot(x_ptr + xm * stride_xm, xm < M, k_lo + js * SUB, K, XL))
        fence_async_shared()  # x is read by wgmma (the async proxy)
        scales = gl.allocate_shared_memory(gl.float32, [NSUB * ROWS], FLAT)

        lane = _lanes(WL)
        om = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
        for tile in range(first, n_tiles, stride):
            n0 = tile * ROWS
            w_rows = _rows(w_ptr, tile, N, K, k_lo, WL)
            w0 = _words(w_rows, 0, nsub, WL)  # in flight while the scales are staged
            w1 = _words(w_rows, 1, nsub, WL)
            _scales(scales, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, n0, k_lo, nsub, K, N,
                    BS, NESTED, NSUB, SL)
            acc = gl.zeros([ROWS, BM], gl.float32, MMA)
            for j in range(0, nsub, 2):  # nsub % 2 == 0: the two buffers rotate, no copies
                acc = _step(acc, w0, lane, table, xs.index(j), scales, j, MMA, A_L, DT)
                w0 = _words(w_rows, j + 2, nsub, WL)
                acc = _step(acc, w1, lane, table, xs.index(j + 1), scales, j + 1, MMA, A_L, DT)
                w1 = _words(w_rows, j + 3, nsub, WL)
            on = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))
            ws = ws_ptr + split.to(gl.int64) * M * N + om[None, :] * N + on[:, None]
            gl.store(ws, acc, mask=(om[None, :] < M) & (on[:, None] < N))


    @gluon.jit
    def _row_scales(st_ptr, n0, N, j, n_steps, BS: gl.constexpr, MMA: gl.constexpr):
        """Sub-step j's block scale of each of the tile's rows, in the accumulator's rows, from
        the transposed fp32 scales st[NB, N] (`quant_4bit.block_scales_t`; L2-resident); rows
        past N and sub-steps past the end read the last ones (never stored or used)."""
        r = gl.minimum(_paired(gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))), N - 1 - n0)
        kb = (gl.minimum(j, n_steps - 1) * SUB) // BS
        return gl.load(st_ptr + kb * N + n0 + r)

    @gluon.jit
    def _qlora_wgmma_large_kernel(x_ptr, M, K, stride_xm, w_ptr, st_ptr, pairs_ptr, N, ws_ptr,
                                  l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp, R,
                                  scaling, bias_ptr, BS: gl.constexpr, BMX: gl.constexpr,
                                  FUSED: gl.constexpr, BLOCK_R: gl.constexpr,
                                  HAS_BIAS: gl.constexpr):
        """M >= LARGE_M: persistent over [ROWS x BMX] output tiles (n fastest: the programs at
        work share x's m-tile and all of W in L2), each summing all of K; x streams through two
        shared [BMX, SUB] buffers (the next sub-step's x is loaded while this one multiplies);
        each sub-step's block scales (fp32, decoded before the launch) are loaded with its
        words, two sub-steps ahead. Accumulator row r is weight row n0 + `_paired(r)`. FUSED:
        the epilogue too, out = `ws_ptr` [M, N] (`_lora_epilogue`); else the fp32 sums into
        the workspace `ws_ptr` [N, M] for `lora_linear._split_k_epilogue_kernel`."""
        DT: gl.constexpr = x_ptr.dtype.element_ty
        WL: gl.constexpr = _word_layout(8)  # two warpgroups: a third warp bit down the rows
        MMA: gl.constexpr = _mma_layout(8, BMX)
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        XL: gl.constexpr = _blocked(8, 8)
        TL: gl.constexpr = _blocked(4, 8)
        X_S: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BMX, SUB], DT)

        n_tiles = gl.cdiv(N, ROWS)
        n_steps = K // SUB  # even (K % (SUB * STEPS) == 0)
        gl.assume(n_steps >= 2)  # a tile's K loop runs: one entry path, not a zero-trip one too
        table = _table64(pairs_ptr, TL)
        xs = gl.allocate_shared_memory(DT, [2, BMX, SUB], X_S)
        lane = 4 * _lanes(WL)
        xr = gl.arange(0, BMX, layout=gl.SliceLayout(1, XL))[:, None]
        om = gl.arange(0, BMX, layout=gl.SliceLayout(0, MMA))
        for tile in range(gl.program_id(0), n_tiles * gl.cdiv(M, BMX), gl.num_programs(0)):
            tile_n = tile % n_tiles
            n0 = tile_n * ROWS
            # the last m-tile ends at row M; rows of the one before are not stored again
            first = (tile // n_tiles) * BMX
            m0 = gl.minimum(first, M - BMX)
            x_rows = x_ptr + m0.to(gl.int64) * stride_xm + xr * stride_xm
            w_rows = _rows(w_ptr, tile_n, N, K, 0, WL, True)
            w0 = _words(w_rows, 0, n_steps, WL, False)
            w1 = _words(w_rows, 1, n_steps, WL, False)
            s0 = _row_scales(st_ptr, n0, N, 0, n_steps, BS, MMA)
            s1 = _row_scales(st_ptr, n0, N, 1, n_steps, BS, MMA)
            gl.barrier()  # the previous tile's reads of buffer 0 are done
            xs.index(0).store(_x_slot(x_rows, None, 0, K, XL))
            fence_async_shared()
            gl.barrier()
            acc = gl.zeros([ROWS, BMX], gl.float32, MMA)
            for g in range(0, n_steps, 2):  # buffers and words rotate in pairs: no copies
                nxt = _x_slot(x_rows, None, (g + 1) * SUB, K, XL)
                acc = _scaled_mma(acc, _codes(w0, lane, table, A_L, DT, True), xs.index(0), s0)
                w0 = _words(w_rows, g + 2, n_steps, WL, False)
                s0 = _row_scales(st_ptr, n0, N, g + 2, n_steps, BS, MMA)
                xs.index(1).store(nxt)  # buffer 1 was last read at step g - 1, before the barrier
                fence_async_shared()
                gl.barrier()
                nxt = _x_slot(x_rows, None, (g + 2) * SUB, K, XL)
                acc = _scaled_mma(acc, _codes(w1, lane, table, A_L, DT, True), xs.index(1), s1)
                w1 = _words(w_rows, g + 3, n_steps, WL, False)
                s1 = _row_scales(st_ptr, n0, N, g + 3, n_steps, BS, MMA)
                xs.index(0).store(nxt)
                fence_async_shared()
                gl.barrier()
            if FUSED:  # L's rows go to x's buffer 1, free after the K loop
                ls = xs.index(1).reinterpret(
                    DT, [BMX, BLOCK_R], gl.NVMMASharedLayout.get_default_for([BMX, BLOCK_R], DT))
                _lora_epilogue(acc, n0, N, m0, first, ls, l_ptr, stride_lm, stride_lr, r2_ptr,
                               stride_rr, stride_rp, R, scaling, ws_ptr, bias_ptr, ws_ptr, BMX,
                               BLOCK_R, False, HAS_BIAS, MMA, A_L)
            else:  # the workspace is [N, M] (M contiguous: a thread's accumulator pairs are adjacent)
                on = (n0 + _paired(gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))))[:, None]
                at = ws_ptr + m0 + on.to(gl.int64) * M + om[None, :]
                gl.store(at, acc, mask=(om[None, :] >= first - m0) & (on < N))



    @gluon.jit
    def _dx_words(w_ptr, woff, n_lo, K):
        """W's packed words of rows n_lo .. n_lo + DX_SUB (the tile's 32 bytes of each), as [4 s,
        2 q, 4 t, 2 e, 8 words]: row n_lo + 16 s + 8 q + 2 t + e (a thread's 4 words: one per
        (q, e), the rows whose bytes one staged word holds); `woff` from `_dx_word_offsets`."""
        return gl.reshape(gl.load(w_ptr + n_lo * (K // 8) + woff), [4, 2, 4, 2, 8])

    @gluon.jit
    def _dx_word_offsets(k0, K, WSL: gl.constexpr):
        """int32 offsets of a sub-step's words from its first row (N * K / 8 < 2**31 words)."""
        nn = gl.arange(0, DXS, layout=gl.SliceLayout(1, WSL))
        jw = gl.arange(0, 8, layout=gl.SliceLayout(0, WSL))
        return (nn * (K // 8))[:, None] + (k0 // 8 + jw)[None, :]

    @gluon.jit
    def _dx_stage(wb, words):
        """Transpose bytes: staged word (s, t, j) holds byte j of rows 16 s + 8 q + 2 t + e at
        its byte 2 q + e, at word 128 s + 32 t + (j ^ 9 t) of `wb`: the writes (lanes along t and
        j / 4) and the reads (lanes along t and j % 8) both hit 32 banks."""
        e0, e1 = gl.split(gl.permute(words, [0, 2, 4, 1, 3]))  # [s, t, jw, q] each
        a00, a10 = gl.split(e0)
        a01, a11 = gl.split(e1)
        b0, b1, b2, b3 = gl.inline_asm_elementwise(  # a 4x4 byte transpose in 8 PRMT
            asm="""{ .reg .b32 l01, h01, l23, h23;
            prmt.b32 l01, $4, $5, 0x5140; prmt.b32 h01, $4, $5, 0x7362;
            prmt.b32 l23, $6, $7, 0x5140; prmt.b32 h23, $6, $7, 0x7362;
            prmt.b32 $0, l01, l23, 0x5410; prmt.b32 $1, l01, l23, 0x7632;
            prmt.b32 $2, h01, h23, 0x5410; prmt.b32 $3, h01, h23, 0x7632; }""",
            constraints="=r,=r,=r,=r,r,r,r,r", args=[a00, a01, a10, a11],
            dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
        tw = gl.join(gl.join(b0, b1), gl.join(b2, b3))  # [s, t, jw, b % 2, b // 2]: j = 4 jw + b
        tw = gl.reshape(gl.permute(tw, [0, 1, 2, 4, 3]), [4, 4, 32])  # [s, t, j]
        L: gl.constexpr = tw.type.layout
        s = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
        j = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
        wb.scatter(gl.reshape(tw, [512]), gl.reshape(128 * s + 32 * t + (j ^ (9 * t)), [512]), 0)

    @gluon.jit
    def _prmt_index(wd, lane4, SEL: gl.constexpr):
        """Byte SEL of each word as the word index 64 e + lane of `_table64` (one
        PRMT: the byte address 256 e + 4 lane, whose low byte is lane4)."""
        return gl.inline_asm_elementwise(
            asm="prmt.b32 $0, $1, $2, " + SEL + ";", constraints="=r,r,r", args=[wd, lane4],
            dtype=gl.int32, is_pure=True, pack=1) >> 2

    @gluon.jit
    def _dx_codes(wb, lane4, table, DL: gl.constexpr, A_L: gl.constexpr, DT: gl.constexpr):
        """The staged sub-step as wgmma's register A operand [DX_ROWS, DXS]: row r = 16 w + 8 h + g
        is k = 16 w + 2 g + h (byte column j = 8 w + g, nibble h), column c is n."""
        j = gl.arange(0, 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, DL)))[:, None, None]
        s = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, DL)))[None, :, None]
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, DL)))[None, None, :]
        wd = gl.reshape(wb.gather(gl.reshape(128 * s + 32 * t + (j ^ (9 * t)), [512]), 0), [32, 4, 4])
        # byte p = 2 q + e of each word: [j, s, t, e, q] (e innermost: a register's two values)
        idx = gl.join(gl.join(_prmt_index(wd, lane4, "0x5504"), _prmt_index(wd, lane4, "0x5514")),
                      gl.join(_prmt_index(wd, lane4, "0x5524"), _prmt_index(wd, lane4, "0x5534")))
        two = gl.reshape(table.gather(gl.reshape(idx, [32 * 4 * 4 * 4]), 0), [32, 4, 4, 2, 2])
        hi = two.to(gl.int16).to(DT, bitcast=True)  # k = 2 j: the high nibble (low half)
        lo = (two >> 16).to(gl.int16).to(DT, bitcast=True)
        a = gl.reshape(gl.join(hi, lo), [4, 8, 4, 4, 2, 2, 2])  # [w, g, s, t, e, q, h]
        a = gl.reshape(gl.permute(a, [0, 6, 1, 2, 5, 3, 4]), [DXR, DXS])  # [w, h, g | s, q, t, e]
        return gl.convert_layout(a, A_L, assert_trivial=True)

    @gluon.jit
    def _table64(pairs_ptr, TL: gl.constexpr):
        """The pair table, 32 copies at a 64-word stride: entry e of copy l at word 64 e + l
        (a byte moved by one PRMT is the address); words 32..63 of each row (filled too) are
        never read."""
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, TL))
        copies = gl.load(pairs_ptr + e)[:, None] + gl.zeros([256, 64], gl.int32, TL)
        return gl.allocate_shared_memory(gl.int32, [256 * 64], gl.SwizzledSharedLayout(1, 1, 1, [0]),
                                         gl.reshape(copies, [256 * 64]))

    @gluon.jit
    def _dy_scaled(dy_t, offs, st_ptr, n_lo, kb, N: gl.constexpr, YL: gl.constexpr):
        """dY[tile rows, n_lo:n_lo + DXS] times each column's block scale (`st` [NB, N] in dY's
        dtype: the block is the tile's K block kb, row n's scale st[kb, n]); `offs` the rows'
        offsets (computed once: the loop keeps them in 64-bit registers, one add per row)."""
        nn = gl.arange(0, DXS, layout=gl.SliceLayout(0, YL))
        y = gl.load(dy_t + n_lo + offs)
        sc = gl.load(st_ptr + (kb * N + n_lo) + nn)
        return y * sc[None, :]

    @gluon.jit
    def _qlora_wgmma_dx_kernel(dy_ptr, M, w_ptr, st_ptr, pairs_ptr, l_ptr, stride_lm, stride_lr,
                               r2_ptr, stride_rr, stride_rp, R, scaling, mask_ptr, out_ptr,
                               N: gl.constexpr, K: gl.constexpr,
                               BS: gl.constexpr, BMX: gl.constexpr, BLOCK_R: gl.constexpr,
                               HAS_MASK: gl.constexpr):
        """dX tiles [DX_ROWS k x BMX m] (as dXᵀ), persistent (k fastest: the programs at work
        share dY's m-tile and all of W in L2), each summing all of N, then the LoRA term."""
        DT: gl.constexpr = dy_ptr.dtype.element_ty
        MMA: gl.constexpr = _mma_layout(4, BMX)
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        YL: gl.constexpr = _blocked(8, 4)
        TL: gl.constexpr = _blocked(8, 4)
        WSL: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[1, 0], [8, 0]], lane_bases=[[0, 1], [0, 2], [0, 4], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[DXS, 8])
        DL: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0]], lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[8, 0, 0], [16, 0, 0]], block_bases=[], shape=[32, 4, 4])
        Y_S: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BMX, DXS], DT)
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        k_tiles = K // DXR
        n_steps = N // DXS
        gl.assume(n_steps >= 2)
        table = _table64(pairs_ptr, TL)
        ys = gl.allocate_shared_memory(DT, [2, BMX, DXS], Y_S)
        wb0 = gl.allocate_shared_memory(gl.int32, [512], FLAT)
        wb1 = gl.allocate_shared_memory(gl.int32, [512], FLAT)
        jj = gl.arange(0, 32, layout=gl.SliceLayout(1, gl.SliceLayout(2, DL)))[:, None, None]
        tt = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, DL)))[None, None, :]
        lane4 = (((jj & 7) << 2) | tt) * 4
        offs = (gl.arange(0, BMX, layout=gl.SliceLayout(1, YL)) * N)[:, None] \
            + gl.arange(0, DXS, layout=gl.SliceLayout(0, YL))[None, :]
        # L's rows for the epilogue go to dY's buffer 1, free after the K loop (buffer 0 then
        # holds the next tile's first sub-step)
        ls = ys.index(1).reinterpret(DT, [BMX, BLOCK_R],
                                     gl.NVMMASharedLayout.get_default_for([BMX, BLOCK_R], DT))
        tiles = k_tiles * gl.cdiv(M, BMX)
        k0, first, m0 = _dx_tile(gl.program_id(0), k_tiles, M, BMX)
        _dx_stage(wb0, _dx_words(w_ptr, _dx_word_offsets(k0, K, WSL), 0, K))
        ys.index(0).store(_dy_scaled(dy_ptr + m0.to(gl.int64) * N, offs, st_ptr, 0, k0 // BS, N, YL))
        fence_async_shared()
        gl.barrier()
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            k0, first, m0 = _dx_tile(tile, k_tiles, M, BMX)
            dy_t = dy_ptr + m0.to(gl.int64) * N
            woff = _dx_word_offsets(k0, K, WSL)
            # the last iteration stages the next tile's first sub-step (past the last tile: this
            # tile's again, never used)
            nk0, _, nm0 = _dx_tile(gl.minimum(tile + gl.num_programs(0), tiles - 1), k_tiles, M, BMX)
            acc = gl.zeros([DXR, BMX], gl.float32, MMA)
            for g in range(0, n_steps - 2, 2):
                acc = _dx_steps(acc, wb0, wb1, ys, lane4, table, woff, offs, st_ptr, w_ptr,
                                dy_t, k0 // BS, (g + 1) * DXS, w_ptr, dy_t, k0 // BS,
                                (g + 2) * DXS, N, K, DL, A_L, YL)
            acc = _dx_steps(acc, wb0, wb1, ys, lane4, table, woff, offs, st_ptr, w_ptr, dy_t,
                            k0 // BS, (n_steps - 1) * DXS, w_ptr + (nk0 - k0) // 8,
                            dy_ptr + nm0.to(gl.int64) * N, nk0 // BS, 0, N, K, DL, A_L, YL)
            _lora_epilogue(acc, k0, K, m0, first, ls, l_ptr, stride_lm, stride_lr, r2_ptr,
                           stride_rr, stride_rp, R, scaling, mask_ptr, out_ptr, out_ptr, BMX,
                           BLOCK_R, HAS_MASK, False, MMA, A_L)
            gl.barrier()  # every warp's epilogue is done with buffer 1

    @gluon.jit
    def _dx_steps(acc, wb0, wb1, ys, lane4, table, woff, offs, st_ptr, w1, dy1, kb1, n1, w2, dy2,
                  kb2, n2, N: gl.constexpr, K: gl.constexpr, DL: gl.constexpr,
                  A_L: gl.constexpr, YL: gl.constexpr):
        """Two sub-steps: multiply buffers 0, stage sub-step n1 (of W at w1, dY at dy1, block
        kb1) into buffers 1, multiply them, stage n2 (w2, dy2, kb2) into buffers 0."""
        acc = _dx_step(acc, wb0, ys.index(0), wb1, ys.index(1), lane4, table, woff, offs, st_ptr,
                       w1, dy1, kb1, n1, N, K, DL, A_L, YL)
        return _dx_step(acc, wb1, ys.index(1), wb0, ys.index(0), lane4, table, woff, offs, st_ptr,
                        w2, dy2, kb2, n2, N, K, DL, A_L, YL)

    @gluon.jit
    def _dx_step(acc, wb, yb, wb_next, yb_next, lane4, table, woff, offs, st_ptr, w, dy, kb, n,
                 N: gl.constexpr, K: gl.constexpr, DL: gl.constexpr, A_L: gl.constexpr,
                 YL: gl.constexpr):
        """acc += the staged sub-step (wb, yb); the next one (W at w, dY at dy, rows n, block kb)
        is loaded while this one multiplies and staged into (wb_next, yb_next) after it (they
        were last read before the barrier that ended the step before)."""
        wn = _dx_words(w, woff, n, K)
        yn = _dy_scaled(dy, offs, st_ptr, n, kb, N, YL)
        acc = warpgroup_mma(_dx_codes(wb, lane4, table, DL, A_L, yb.dtype), yb.permute((1, 0)), acc)
        _dx_stage(wb_next, wn)
        yb_next.store(yn)
        fence_async_shared()
        gl.barrier()
        return acc

    @gluon.jit
    def _dx_tile(tile, k_tiles, M, BMX: gl.constexpr):
        """(k0, first m row, m0) of a tile: k fastest; the last m-tile shifted to end at row M
        (m0 < first: its rows before `first` belong to the tile before)."""
        first = (tile // k_tiles) * BMX
        return (tile % k_tiles) * DXR, first, gl.minimum(first, M - BMX)

    @gluon.jit
    def _paired(r):
        """The output row (dX: k, large forward: n) of accumulator row r = 16 w + 8 h + g:
        16 w + 2 g + h, so that a thread's rows g and g + 8 are adjacent outputs."""
        return (r & ~15) + 2 * (r & 7) + ((r >> 3) & 1)

    @gluon.jit
    def _lora_epilogue(acc, c0, P, m0, first, ls, l_ptr, stride_lm, stride_lr, r2_ptr,
                       stride_rr, stride_rp, R, scaling, mask_ptr, bias_ptr, out_ptr,
                       BMX: gl.constexpr, BLOCK_R: gl.constexpr, HAS_MASK: gl.constexpr,
                       HAS_BIAS: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr):
        """out[m, c] = acc + s·(L·R2) [⊙ mask] [+ bias] for accumulator rows r of output columns
        c = c0 + `_paired(r)` < P (dX: k, the large forward: n) and the tile's BMX rows m (out
        and mask contiguous [M, P]), as `lora_linear._epilogue` (one rounding); rows m of the tile
        before (the shifted last m-tile) are not stored again. The LoRA term is one more wgmma
        into a second accumulator (the K loop's registers are free here): R2ᵀ's tile from
        registers, L's rows staged in `ls` (an x / dY buffer, free after the K loop)."""
        ROWS_: gl.constexpr = acc.shape[0]
        ca = c0 + _paired(gl.arange(0, ROWS_, layout=gl.SliceLayout(1, A_L)))[:, None]
        rr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, A_L))[None, :]
        r2 = gl.load(r2_ptr + rr * stride_rr + ca * stride_rp, mask=(rr < R) & (ca < P), other=0.0)
        LL: gl.constexpr = _blocked(8, acc.type.layout.warps_per_cta[0])
        lm = gl.arange(0, BMX, layout=gl.SliceLayout(1, LL))[:, None]
        lr = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, LL))[None, :]
        ls.store(gl.load(l_ptr + (m0 + lm).to(gl.int64) * stride_lm + lr * stride_lr,
                         mask=lr < R, other=0.0))
        fence_async_shared()
        gl.barrier()
        lora = warpgroup_mma(r2, ls.permute((1, 0)), gl.zeros(acc.shape, gl.float32, MMA),
                             use_acc=False) * scaling
        # in column pairs: the pair (2 g, 2 g + 1) of a thread's rows g and g + 8 is adjacent in
        # out (and in the mask): one 2-element access
        PL: gl.constexpr = _pair_layout(BMX, acc.type.layout.warps_per_cta[0])
        acc = gl.convert_layout(_k_pairs(acc), PL, assert_trivial=True)
        lora = gl.convert_layout(_k_pairs(lora), PL, assert_trivial=True)
        p = gl.arange(0, ROWS_ // 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, PL)))[:, None, None]
        m = gl.arange(0, BMX, layout=gl.SliceLayout(0, gl.SliceLayout(2, PL)))[None, :, None]
        h = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, PL)))[None, None, :]
        c = 2 * p + h  # from c0
        keep = (m >= first - m0) & (c < P - c0)
        at = (m0.to(gl.int64) * P + c0) + (m * P + c)  # out's and the mask's offsets
        if HAS_MASK:
            lora *= gl.load(mask_ptr + at, mask=keep, other=0.0).to(gl.float32)
        out = acc + lora
        if HAS_BIAS:
            out += gl.load(bias_ptr + c0 + c, mask=c < P - c0, other=0.0).to(gl.float32)
        gl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=keep)

    @gluon.constexpr_function
    def _pair_layout(n, warps):
        """The accumulator (16 rows per warp, n columns) as [output pairs, n, 2] with a pair's
        two values in adjacent registers (the MMA layout holds them apart: its first register
        bit is the column's)."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 1, 0]] + [[0, 8 << i, 0] for i in range(n.bit_length() - 4)],
            lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[8 << i, 0, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
            shape=[8 * warps, n, 2])

    @gluon.jit
    def _k_pairs(t):
        """[rows, BMX] in accumulator rows -> [rows / 2, BMX, 2]: output pairs last."""
        R_: gl.constexpr = t.shape[0]
        BMX: gl.constexpr = t.shape[1]
        return gl.reshape(gl.permute(gl.reshape(t, [R_ // 16, 2, 8, BMX]), [0, 2, 3, 1]),
                          [R_ // 2, BMX, 2])


def forward_partials(x: torch.Tensor, packed: torch.Tensor, absmax, absmax2, code8, offset,
                     pairs: torch.Tensor, blocksize: int, N: int) -> torch.Tensor:
    """ws[split, m, n] = the split's fp32 sum over k of x[m, k] · W[n, k], W the 4-bit weight
    (`packed` [N * K / 2] uint8, rows of whole blocks), `pairs` the byte-pair table in x's dtype
    (`codes.byte_pair_table`). Call only where `supported(...)` and `aligned(packed)` hold, on
    sm_90+."""
    M, K = x.shape
    nested = absmax2 is not None
    if M <= MAX_M:
        if x.stride(1) != 1:
            x = x.contiguous()
        ws = torch.empty((splits(K), M, N), dtype=torch.float32, device=x.device)
        _qlora_wgmma_kernel[(programs(N, K, _sms(x.device)),)](
            x, M, K, x.stride(0), _words_view(packed), absmax, absmax2 if nested else absmax,
            code8 if nested else absmax, offset if nested else absmax, pairs, N, ws, splits(K),
            BS=blocksize, NESTED=nested, KSPAN=KSPAN, num_warps=4, enable_fp_fusion=False)
    else:  # one plane, stored [N, M]: returned as its [1, M, N] view
        ws = torch.empty((1, N, M), dtype=torch.float32, device=x.device).transpose(1, 2)
        _large(x, packed, absmax, absmax2, code8, offset, pairs, blocksize, N, ws)
    return ws


def large_linear(x: torch.Tensor, packed: torch.Tensor, absmax, absmax2, code8, offset,
                 pairs: torch.Tensor, blocksize: int, N: int, L: torch.Tensor, R2: torch.Tensor,
                 scaling: float, bias, out: torch.Tensor) -> torch.Tensor:
    """out[m, n] = Σ_k x[m, k] · W[n, k] + scaling · (L · R2)[m, n] [+ bias[n]] (M >= LARGE_M,
    `lora_linear.lora_matmul`'s forward with its epilogue) as `_qlora_wgmma_large_kernel`
    computes it, no workspace; `out` contiguous [M, N]. Call only where `supported(...)`,
    `aligned(packed)` and `lora_fits(L, R2, x.dtype)` hold, on sm_90+."""
    _large(x, packed, absmax, absmax2, code8, offset, pairs, blocksize, N, out,
           (L, R2, scaling, bias))
    return out


def _large(x, packed, absmax, absmax2, code8, offset, pairs, blocksize, N, dst, lora=None):
    """Launch the large forward into `dst`: the fp32 workspace, or with `lora` = (L, R2,
    scaling, bias) the output itself (FUSED)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    st = block_scales_t(absmax, absmax2, code8, offset, N, K // blocksize)
    L, R2, scaling, bias = lora or (x, x, 0.0, None)
    _qlora_wgmma_large_kernel[(large_programs(M, N, _sms(x.device)),)](
        x, M, K, x.stride(0), _words_view(packed), st, pairs, N, dst, L, L.stride(0), L.stride(1),
        R2, R2.stride(0), R2.stride(1), L.shape[1], float(scaling),
        bias if bias is not None else dst, BS=blocksize, BMX=LARGE_M, FUSED=lora is not None,
        BLOCK_R=_block_r(L.shape[1]) if lora else 16, HAS_BIAS=bias is not None,
        num_warps=LARGE_WARPS, enable_fp_fusion=False)


def dx_linear(dy: torch.Tensor, packed: torch.Tensor, absmax, absmax2, code8, offset,
              pairs: torch.Tensor, blocksize: int, K: int, L: torch.Tensor, R2: torch.Tensor,
              scaling: float, mask, out: torch.Tensor) -> torch.Tensor:
    """out[m, k] = Σ_n dY[m, n] · W[n, k] + scaling · (L · R2)[m, k] [⊙ mask] for bf16 dY [M, N]
    and the 4-bit W [N, K] (`lora_linear.lora_matmul`'s dX with its epilogue), as
    `_qlora_wgmma_dx_kernel` computes it; `out` contiguous [M, K]. Call only where
    `dx_supported(...)`, `aligned(packed)` and `lora_fits(L, R2, dy.dtype)` hold, on sm_90+."""
    M, N = dy.shape
    dy = dy.contiguous()  # the kernel's row stride is N
    st = block_scales_t(absmax, absmax2, code8, offset, N, K // blocksize).to(dy.dtype)
    m = mask.contiguous() if mask is not None else out  # the kernel reads it as out: [M, K]
    _qlora_wgmma_dx_kernel[(dx_programs(M, K, _sms(dy.device)),)](
        dy, M, _words_view(packed), st, pairs, L, L.stride(0), L.stride(1), R2, R2.stride(0),
        R2.stride(1), L.shape[1], float(scaling), m, out, N=N, K=K,
        BS=blocksize, BMX=LARGE_M, BLOCK_R=_block_r(L.shape[1]), HAS_MASK=mask is not None,
        num_warps=4, enable_fp_fusion=False)
    return out


def _block_r(R: int) -> int:
    return max(16, 1 << (R - 1).bit_length())


def lora_fits(L: torch.Tensor, R2: torch.Tensor, dtype: torch.dtype) -> bool:
    """The large kernels' own epilogue (`_lora_epilogue`) takes the LoRA factors in the
    activations' dtype (fp32 adapters: the Triton kernel's exact-fp32 epilogue) and ranks up to
    one sub-step (L's rows staged in one x / dY buffer)."""
    return L.dtype == R2.dtype == dtype and _block_r(L.shape[1]) <= min(SUB_K, DX_SUB)


def dx_supported(M: int, N: int, K: int, blocksize: int, dtype: torch.dtype) -> bool:
    """Shapes the dX kernel takes: bf16 dY (its block scales multiply dY, in dY's dtype: fp16
    would lose small gradients to subnormals), M >= LARGE_M, N a multiple of two sub-steps,
    blocks of whole 64-row tiles, W's word offsets within int32 (N and K are constexprs: one
    compile per layer shape)."""
    return (AVAILABLE and dtype == torch.bfloat16 and M >= LARGE_M and N % (2 * DX_SUB) == 0
            and blocksize % DX_ROWS == 0 and K % blocksize == 0 and N * K // 8 < 2 ** 31)


def programs(N: int, K: int, sms: int) -> int:
    """G, the persistent grid: a whole number of programs per K slice, at most RESIDENT per SM
    (and no more than there are tiles); program c takes every (G / splits)-th n-tile."""
    s, tiles = splits(K), -(-N // ROWS_PER_CTA)
    return s * max(1, min(tiles, sms * RESIDENT // s))


def large_programs(M: int, N: int, sms: int) -> int:
    """The large kernel's persistent grid: LARGE_RESIDENT programs per SM, at most one per tile."""
    return max(1, min(-(-M // LARGE_M) * -(-N // ROWS_PER_CTA), sms * LARGE_RESIDENT))


def large_tiles_per_sm(M: int, N: int, sms: int) -> tuple[int, int]:
    """(output tiles, programs) on the busiest SM: program c takes tiles c, c + G, ..."""
    G = large_programs(M, N, sms)
    tiles = -(-M // LARGE_M) * -(-N // ROWS_PER_CTA)
    return _busiest(G, sms, lambda c: len(range(c, tiles, G)))


def dx_programs(M: int, K: int, sms: int) -> int:
    """The dX kernel's persistent grid: DX_RESIDENT programs per SM, at most one per tile."""
    return max(1, min(-(-M // LARGE_M) * (K // DX_ROWS), sms * DX_RESIDENT))


def dx_tiles_per_sm(M: int, K: int, sms: int) -> tuple[int, int]:
    """(output tiles, programs) of the dX kernel on the busiest SM."""
    G = dx_programs(M, K, sms)
    tiles = -(-M // LARGE_M) * (K // DX_ROWS)
    return _busiest(G, sms, lambda c: len(range(c, tiles, G)))


def tiles_per_sm(N: int, K: int, sms: int) -> tuple[int, int]:
    """(n-tiles, programs) on the busiest SM when the G programs are placed round-robin."""
    G, s = programs(N, K, sms), splits(K)
    tiles = -(-N // ROWS_PER_CTA)
    return _busiest(G, sms, lambda c: len(range(c // s, tiles, G // s)))


def _busiest(G: int, sms: int, tiles_of) -> tuple[int, int]:
    """(tiles, programs) of the SM with the most work when program c runs on SM c % sms."""
    per, ctas = [0] * sms, [0] * sms
    for c in range(G):
        per[c % sms] += tiles_of(c)
        ctas[c % sms] += 1
    busiest = max(range(sms), key=lambda i: (per[i], ctas[i]))
    return per[busiest], ctas[busiest]


H100_SMS = 132  # no device (the static check records for an H100 SXM)


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _words_view(packed: torch.Tensor) -> torch.Tensor:
    """The packed bytes as int32 words (the caller checked `aligned`: no copy of the weight)."""
    return packed.reshape(-1).view(torch.int32)


def aligned(packed: torch.Tensor) -> bool:
    """Packed bytes the kernel reads as words in place: contiguous and 4-byte aligned (else the
    Triton kernel runs, rather than copying the weight on every call)."""
    return packed.is_contiguous() and packed.data_ptr() % 4 == 0 and packed.numel() % 4 == 0


@functools.lru_cache(maxsize=None)
def hopper(capability: tuple[int, int] | None) -> bool:
    """A GPU this kernel compiles for (sm_90+); None: no device (the static check records for
    sm_90a)."""
    return AVAILABLE and (capability is None or capability[0] >= 9)
