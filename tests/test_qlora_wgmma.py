"""kernels/qlora_wgmma.py, the Gluon (sm_90a) 4-bit forwards and dX kernel, without a GPU.

Gluon kernels do not run under TRITON_INTERPRET. What a CPU can check:
- the kernels' index algebra: `_mirror`, `_mirror_large` and `_mirror_dx` replay their logical
  tensor programs in torch, op for op (word loads, byte extraction or PRMT byte moves into table
  indices, the permutations of the bytes and of the activations, the lane-interleaved tables,
  the block scales, the tile schedules), and must follow the error rule against the exactly
  decoded weight. A wrong permutation, table index, scale block or tile fails it (Gluon's
  layouts change where values live, not what the tensor program computes; that no decoded value
  moves between threads on its way to wgmma is what the compiler's
  `convert_layout(assert_trivial=True)` proves, tests/test_static.py);
- where the GLUON configs apply, that lora_matmul routes to them, and that the interpreter runs
  the Triton kernel instead.
The kernels themselves run in tests/test_gpu.py on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import peftkern
from peftkern import codes, formulas, ops
from peftkern.kernels import lora_linear as L
from peftkern.kernels import qlora_wgmma as G

from helpers import CPU_BACKENDS, assert_error_rule

GLUON_CFG = next(c for c in L.CANDIDATES["small"] if c.get("GLUON"))
GLUON_LARGE_CFG = next(c for c in L.CANDIDATES["large"] if c.get("GLUON"))


def _quantized(gen, N, K, quant_type, blocksize, dq):
    """A random weight's 4-bit state and its exact decoding (the fast CPU reference path)."""
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    with ops.use_backend("reference"):
        q = peftkern.quantize_4bit(W, quant_type, blocksize, double_quant=dq)
        return q, peftkern.dequantize_4bit(q, torch.float32)


def _scales(q, n0, k_lo, nsub) -> torch.Tensor:
    """[NSUB, ROWS] fp32 scales of tile n0, slice k_lo, as `_scales` stages them: the index
    arithmetic (rows past N: row N - 1; sub-steps past nsub: the last), bnb's two roundings."""
    N, K = q.shape
    bs = q.blocksize
    sj = torch.arange(G.KSPAN // G.SUB_K)
    sr = torch.clamp(torch.arange(G.ROWS_PER_CTA), max=N - 1 - n0)
    blk0 = n0 * (K // bs)
    blk = sr[None, :] * (K // bs) + ((k_lo + torch.clamp(sj, max=nsub - 1) * G.SUB_K) // bs)[:, None]
    if q.absmax2 is None:
        return q.absmax.float()[blk0 + blk]
    grp = (blk0 % 256 + blk) >> 8
    s = q.code8[q.absmax[blk0 + blk].long()] * q.absmax2[blk0 // 256 + grp]
    return s + q.offset


def _codes(cur, table, dtype, gen, wide=False) -> torch.Tensor:
    """The [rows, 64] slot-order table values of packed words `cur` [rows, 8], as `_codes`
    (`wide`: PRMT indices into the 64-word-stride table)."""
    rows = cur.shape[0]
    # any lane in 0..31 picks an identical copy: the lane only spreads the banks
    lane = torch.randint(0, 32, cur.shape, generator=gen, dtype=torch.int32)
    if wide:
        i = [_prmt(cur, 4 * lane, 0x5504 + 16 * p) >> 2 for p in range(4)]
    else:
        i = [((cur << 5) & 0x1FE0) | lane, ((cur >> 3) & 0x1FE0) | lane,
             ((cur >> 11) & 0x1FE0) | lane, ((cur >> 19) & 0x1FE0) | lane]
    q4 = torch.stack([torch.stack(i[:2], -1), torch.stack(i[2:], -1)], -1)
    idx = q4.permute(0, 1, 3, 2).reshape(rows, 4, 8).permute(0, 2, 1).reshape(rows * 32)
    two = table[idx].reshape(rows, 32)
    hi = two.to(torch.int16).view(dtype)
    lo = (two >> 16).to(torch.int16).view(dtype)
    return torch.stack([hi, lo], -1).reshape(rows, G.SUB_K)


def _x_slot(x, k0) -> torch.Tensor:
    """x[:, k0:k0 + 64] in slot order, as `_x_slot` stages it."""
    return x[:, k0:k0 + G.SUB_K].reshape(-1, 4, 8, 2).permute(0, 2, 1, 3).reshape(-1, G.SUB_K)


def _mirror(x, q, dtype, gen) -> torch.Tensor:
    """out[M, N] computed as _qlora_wgmma_kernel + the split-K sum compute it."""
    N, K = q.shape
    M = x.shape[0]
    words = q.data.reshape(-1).view(torch.int32).reshape(N, K // 8)
    table = codes.byte_pair_table(q.quant_type, dtype)[:, None].expand(256, 32).reshape(-1)
    out = torch.zeros(M, N, dtype=torch.float64)
    for k_lo in range(0, K, G.KSPAN):
        nsub = min(G.KSPAN, K - k_lo) // G.SUB_K
        scales = torch.cat([_scales(q, n0, k_lo, nsub) for n0 in range(0, N, G.ROWS_PER_CTA)], 1)
        acc = torch.zeros(N, M, dtype=torch.float32)
        for j in range(nsub):
            k0 = k_lo + j * G.SUB_K
            a = _codes(words[:, k0 // 8:k0 // 8 + 8], table, dtype, gen)
            part = a.float() @ _x_slot(x, k0).float().t()
            acc = acc + part * scales[j, :N][:, None]
        out += acc.t().double()
    return out


def _paired(r):
    """`_paired`: accumulator row r = 16 w + 8 h + g holds output 16 w + 2 g + h."""
    return (r & ~15) + 2 * (r & 7) + ((r >> 3) & 1)


def _mirror_large(x, q, dtype, gen, lora=None, keep_from=lambda first, m0: first - m0,
                  block_of=lambda g, bs: g * G.SUB_K // bs, paired=None) -> torch.Tensor:
    """out[M, N] as _qlora_wgmma_large_kernel computes it (M >= 128): its tile schedule (n fastest;
    the last m-tile shifted to end at row M, rows of the tile before not stored again), tensor
    row r holding weight row n0 + `_paired(r)` (clamped), each sub-step's block scales from
    `block_scales_t`, the slot-order sub-steps with PRMT table indices. Without `lora`: the
    [N, M] fp32 workspace seen as [M, N]; with `lora` = (L, R2, scaling, bias): the FUSED
    output in x's dtype (`_lora_epilogue`). Unwritten outputs stay NaN."""
    N, K = q.shape
    M, R, BMX = x.shape[0], G.ROWS_PER_CTA, G.LARGE_M
    nb = K // q.blocksize
    paired = paired or _paired
    words = q.data.reshape(-1).view(torch.int32).reshape(N, K // 8)
    table64 = codes.byte_pair_table(q.quant_type, dtype)[:, None].expand(256, 64).reshape(-1)
    st = (formulas.dequantize_absmax(q.absmax, q.absmax2, q.code8, q.offset)
          if q.absmax2 is not None else q.absmax.float()).reshape(N, nb).t()  # block_scales_t
    out = torch.full((M, N), float("nan"), dtype=torch.float64 if lora is None else dtype)
    n_tiles = -(-N // R)
    for tile in range(n_tiles * -(-M // BMX)):
        n0 = tile % n_tiles * R
        first = tile // n_tiles * BMX
        m0 = min(first, M - BMX)
        n = n0 + _paired(torch.arange(R))  # where the epilogue stores row r
        w_rows = torch.clamp(n0 + paired(torch.arange(R)), max=N - 1)  # which row it loaded
        xt = x[m0:m0 + BMX]
        acc = torch.zeros(R, BMX)
        for g in range(K // G.SUB_K):
            a = _codes(words[w_rows, 8 * g:8 * g + 8], table64, dtype, gen, wide=True)
            part = a.float() @ _x_slot(xt, g * G.SUB_K).float().t()
            acc = acc + part * st[block_of(g, q.blocksize), w_rows][:, None]
        live, keep = n < N, slice(keep_from(first, m0), BMX)
        if lora is None:
            out[m0:m0 + BMX][keep][:, n[live]] = acc[live].t()[keep].double()
            continue
        L, R2, scaling, bias = lora
        nc = torch.clamp(n, max=N - 1)  # the epilogue's columns (masked past N)
        o = acc + (R2[:, nc].t().float() @ L[m0:m0 + BMX].t().float()) * scaling
        if bias is not None:
            o = o + bias[nc].float()[:, None]
        rows = out[m0:m0 + BMX]
        rows[keep.start:, n[live]] = o[live].t()[keep].to(dtype)
    return out


def _prmt(a, b, sel: int) -> torch.Tensor:
    """PTX `prmt.b32 d, a, b, sel` (default mode) on int32 tensors: byte i of d is byte
    (sel >> 4 i) & 7 of the 8 bytes {b, a} (a's are 0-3)."""
    src = [(a.long() >> 8 * i) & 0xFF for i in range(4)] + [(b.long() >> 8 * i) & 0xFF for i in range(4)]
    d = sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))
    return torch.where(d >= 2 ** 31, d - 2 ** 32, d).to(torch.int32)


def _dx_stage(w, read_xor) -> torch.Tensor:
    """`_dx_stage`: a sub-step's words [s, q, t, e, jw] byte-transposed into the 512-word
    buffer (word 128 s + 32 t + (j ^ 9 t) holds byte j of rows 16 s + 8 q + 2 t + e)."""
    a = w.permute(0, 2, 4, 1, 3)  # [s, t, jw, q, e]
    a00, a01, a10, a11 = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    l01, h01 = _prmt(a00, a01, 0x5140), _prmt(a00, a01, 0x7362)
    l23, h23 = _prmt(a10, a11, 0x5140), _prmt(a10, a11, 0x7362)
    b = [_prmt(l01, l23, 0x5410), _prmt(l01, l23, 0x7632), _prmt(h01, h23, 0x5410),
         _prmt(h01, h23, 0x7632)]
    tw = torch.stack([torch.stack(b[:2], -1), torch.stack(b[2:], -1)], -1)  # [s, t, jw, i, o]
    tw = tw.permute(0, 1, 2, 4, 3).reshape(4, 4, 32)
    s, t, j = torch.arange(4)[:, None, None], torch.arange(4)[None, :, None], torch.arange(32)
    wb = torch.zeros(512, dtype=torch.int32)
    wb[(128 * s + 32 * t + (j ^ 9 * t)).reshape(-1)] = tw.reshape(-1)
    return wb


def _dx_codes(wb, table64, dtype, gen, read_xor, perm) -> torch.Tensor:
    """`_dx_codes`: the staged words as wgmma's A operand [64 rows r = 16 w + 8 h + g, 64 n]."""
    j, s, t = torch.arange(32)[:, None, None], torch.arange(4)[None, :, None], torch.arange(4)
    wd = wb[128 * s + 32 * t + (j ^ read_xor(t))]  # [j, s, t]
    # any lane in 0..31 picks an identical copy: the lane only spreads the banks
    lane4 = 4 * torch.randint(0, 32, wd.shape, generator=gen, dtype=torch.int32)
    i = [_prmt(wd, lane4, 0x5504 + 16 * p) >> 2 for p in range(4)]
    idx = torch.stack([torch.stack(i[:2], -1), torch.stack(i[2:], -1)], -1)  # [j, s, t, e, q]
    two = table64[idx.long()]
    hi = two.to(torch.int16).view(dtype)
    lo = (two >> 16).to(torch.int16).view(dtype)
    a = torch.stack([hi, lo], -1).reshape(4, 8, 4, 4, 2, 2, 2)  # [w, g, s, t, e, q, h]
    return a.permute(*perm).reshape(G.DX_ROWS, G.DX_SUB)


def _mirror_dx(dy, q, L, R2, scaling, mask, out_dtype, gen, sms=2, read_xor=lambda t: 9 * t,
               perm=(0, 6, 1, 2, 5, 3, 4), k_of_row=None, block_of=lambda k0, bs: k0 // bs,
               keep_from=lambda first, m0: first - m0, next_tile=None):
    """dX[M, K] as _qlora_wgmma_dx_kernel computes it (bf16 dY [M, N], M >= 128) on `sms` SMs:
    its persistent schedule (`dx_programs`; k fastest; the last m-tile shifted to end at row M,
    rows of the tile before not stored again; a tile's last K-loop step staging the next tile's
    first sub-step), the byte transpose through the swizzled buffer, the PRMT table indices
    into the 64-word-stride table, the A operand's row order (row r = 16 w + 8 h + g is
    k = 16 w + 2 g + h), dY times its columns' block scales in dY's dtype, and the epilogue
    (out = acc + s·(L·R2) [⊙ mask], one rounding). Unwritten outputs stay NaN."""
    N, K = q.shape
    M, BMX, DXR = dy.shape[0], G.LARGE_M, G.DX_ROWS
    words = q.data.reshape(-1).view(torch.int32).reshape(N, K // 8)
    table64 = codes.byte_pair_table(q.quant_type, dy.dtype)[:, None].expand(256, 64).reshape(-1)
    nb = K // q.blocksize
    st = (formulas.dequantize_absmax(q.absmax, q.absmax2, q.code8, q.offset)
          if q.absmax2 is not None else q.absmax.float()).reshape(N, nb).t().to(dy.dtype)
    k_of_row = k_of_row or (lambda r: (r & ~15) + 2 * (r & 7) + ((r >> 3) & 1))
    next_tile = next_tile or (lambda tile, G_, tiles: min(tile + G_, tiles - 1))
    out = torch.full((M, K), float("nan"), dtype=out_dtype)
    k_tiles, tiles = K // DXR, -(-M // BMX) * (K // DXR)

    def place(tile):  # _dx_tile
        first = tile // k_tiles * BMX
        return tile % k_tiles * DXR, first, min(first, M - BMX)

    def stage(k0, m0, n_lo):  # a sub-step's staged buffers: (A operand, scaled dY)
        w = words[n_lo:n_lo + G.DX_SUB, k0 // 8:k0 // 8 + 8].reshape(4, 2, 4, 2, 8)
        a = _dx_codes(_dx_stage(w, read_xor), table64, dy.dtype, gen, read_xor, perm)
        kb = block_of(k0, q.blocksize)
        return a, dy[m0:m0 + BMX, n_lo:n_lo + G.DX_SUB] * st[kb, n_lo:n_lo + G.DX_SUB]

    G_ = G.dx_programs(M, K, sms)
    for c in range(G_):
        k0, _, m0 = place(c)
        buf = stage(k0, m0, 0)
        for tile in range(c, tiles, G_):
            k0, first, m0 = place(tile)
            nk0, _, nm0 = place(next_tile(tile, G_, tiles))
            acc = torch.zeros(DXR, BMX)
            for n_lo in range(0, N, G.DX_SUB):
                a, y = buf
                last = n_lo + G.DX_SUB == N
                buf = stage(nk0, nm0, 0) if last else stage(k0, m0, n_lo + G.DX_SUB)
                acc = acc + a.float() @ y.float().t()
            kk = k0 + k_of_row(torch.arange(DXR))
            lora = (R2[:, kk].t().float() @ L[m0:m0 + BMX].t().float()) * scaling
            if mask is not None:
                lora = lora * mask[m0:m0 + BMX][:, kk].t().float()
            keep = slice(keep_from(first, m0), BMX)
            out[m0:m0 + BMX][keep, kk] = (acc + lora).t()[keep].to(out_dtype)
    return out


def _dx_case(gen, M, N, K, R, blocksize, kind, with_mask, out_dtype=torch.bfloat16):
    q, Wd = _quantized(gen, N, K, kind.split("-")[0], blocksize, kind.endswith("dq"))
    dt = torch.bfloat16
    dy = torch.randn(M, N, generator=gen).to(dt)
    L = (torch.randn(M, R, generator=gen)).to(dt)
    R2 = (torch.randn(R, K, generator=gen) / R ** 0.5).to(dt)
    mask = (torch.rand(M, K, generator=gen) > 0.1).to(dt) / 0.9 if with_mask else None
    oracle = dy.double() @ Wd.double() + 0.5 * (L.double() @ R2.double()) * (
        1 if mask is None else mask.double())
    baseline = dy @ Wd.to(dt) + (L @ R2) * 0.5 * (1 if mask is None else mask)
    return q, dy, L, R2, mask, oracle, baseline


@pytest.mark.parametrize("M, N, K, R, blocksize, kind, with_mask", [
    (128, 256, 256, 16, 64, "nf4-dq", False),   # one m-tile, 4 k-tiles, 2 K-loop iterations
    (200, 384, 192, 8, 64, "nf4", True),        # the last m-tile shifted; a rank under 16; dropout
    (300, 256, 512, 32, 128, "fp4-dq", False),  # two k-tiles per block, 3 m-tiles
    (129, 128, 256, 64, 256, "nf4", True),      # one K-loop step: the loop runs no iteration
    (128, 128, 128, 16, 64, "nf4-dq", False)])
def test_dx_mirror_follows_the_error_rule(M, N, K, R, blocksize, kind, with_mask, gen):
    q, dy, L, R2, mask, oracle, baseline = _dx_case(gen, M, N, K, R, blocksize, kind, with_mask)
    assert G.dx_supported(M, N, K, blocksize, torch.bfloat16) or not G.AVAILABLE
    got = _mirror_dx(dy, q, L, R2, 0.5, mask, torch.bfloat16, gen)
    assert_error_rule(f"dX mirror M={M} {kind} bs={blocksize}", got, oracle, baseline)


@pytest.mark.parametrize("mutation", ["reads without the swizzle", "q and e swapped",
                                      "rows in natural k order", "the next block's scales",
                                      "a row of the shifted tile not stored",
                                      "the next tile's first sub-step from the wrong tile"])
def test_dx_mirror_fails_on_a_wrong_index(mutation, gen):
    """The check above can fail: each of these index slips gives wrong values or NaN."""
    q, dy, L, R2, mask, oracle, baseline = _dx_case(gen, 200, 256, 256, 16, 64, "nf4", False)
    wrong = {"reads without the swizzle": {"read_xor": lambda t: 0 * t},
             "q and e swapped": {"perm": (0, 6, 1, 2, 4, 3, 5)},
             "rows in natural k order": {"k_of_row": lambda r: r},
             "the next block's scales": {"block_of": lambda k0, bs: (k0 // bs + 1) % 4},
             "a row of the shifted tile not stored":
                 {"keep_from": lambda first, m0: first - m0 + 1},
             "the next tile's first sub-step from the wrong tile":
                 {"next_tile": lambda tile, G_, tiles: min(tile + 1, tiles - 1)}}[mutation]
    got = _mirror_dx(dy, q, L, R2, 0.5, mask, torch.bfloat16, gen, **wrong)
    with pytest.raises(AssertionError):
        assert_error_rule("mutated", got, oracle, baseline)


@pytest.mark.parametrize("M, N, K, blocksize, kind, dt", [
    (1, 150, 512, 64, "nf4-dq", torch.bfloat16),     # one K slice, a partial n-tile
    (16, 260, 1280, 128, "fp4", torch.float16),       # 2.5 slices: the last one is shorter
    (5, 128, 1024, 512, "nf4", torch.bfloat16),       # one block per slice
    (3, 64, 768, 256, "nf4-dq", torch.float16),
    # the large kernel
    (128, 128, 512, 64, "nf4-dq", torch.bfloat16),     # one tile
    (200, 150, 640, 64, "nf4", torch.float16),         # the last m-tile shifted, a partial n-tile
    (300, 260, 1280, 128, "fp4-dq", torch.bfloat16),   # blocks of two sub-steps, 3 x 3 tiles
    (129, 64, 512, 256, "nf4", torch.float16)])
def test_mirror_of_the_kernel_follows_the_error_rule(M, N, K, blocksize, kind, dt, gen):
    q, Wd = _quantized(gen, N, K, kind.split("-")[0], blocksize, kind.endswith("dq"))
    assert G.supported(M, K, blocksize, dt) or not G.AVAILABLE
    x = torch.randn(M, K, generator=gen).to(dt)
    got = (_mirror if M <= G.MAX_M else _mirror_large)(x, q, dt, gen)
    oracle = x.double() @ Wd.double().t()
    baseline = x @ Wd.to(dt).t()
    assert_error_rule(f"mirror M={M} {kind} bs={blocksize}", got, oracle, baseline)


def test_mirror_fails_on_a_wrong_permutation(gen):
    """The check above can fail: x whose columns are permuted within each sub-step (as a wrong
    slot order of either operand would pair them) is far from x · Wᵀ."""
    N, K, M = 64, 512, 4
    q, Wd = _quantized(gen, N, K, "nf4", 64, False)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    shuffled = x.reshape(M, -1, 4, 8, 2).permute(0, 1, 3, 2, 4).reshape(M, K)
    got = _mirror(shuffled, q, torch.bfloat16, gen)
    err = (got - x.double() @ Wd.double().t()).abs().max().item()
    assert err > 0.1 * (x.double() @ Wd.double().t()).abs().max().item()


@pytest.mark.parametrize("M, N, K, R, blocksize, kind, dt, bias", [
    (128, 128, 512, 16, 64, "nf4-dq", torch.bfloat16, True),   # one tile
    (200, 150, 640, 8, 64, "nf4", torch.float16, False),       # shifted m-tile, partial n-tile
    (300, 260, 1280, 64, 128, "fp4-dq", torch.bfloat16, True)])
def test_large_fused_mirror_follows_the_error_rule(M, N, K, R, blocksize, kind, dt, bias, gen):
    """The large forward with its own epilogue (FUSED): x·Wᵀ + s·(xA)·Bᵀ + bias, one rounding."""
    q, Wd = _quantized(gen, N, K, kind.split("-")[0], blocksize, kind.endswith("dq"))
    x = torch.randn(M, K, generator=gen).to(dt)
    L = torch.randn(M, R, generator=gen).to(dt)
    R2 = (torch.randn(N, R, generator=gen) / R ** 0.5).to(dt).t()
    b = torch.randn(N, generator=gen).to(dt) if bias else None
    got = _mirror_large(x, q, dt, gen, lora=(L, R2, 0.5, b))
    oracle = x.double() @ Wd.double().t() + 0.5 * L.double() @ R2.double() + (
        0 if b is None else b.double())
    baseline = x @ Wd.to(dt).t() + (L @ R2) * 0.5 + (0 if b is None else b)
    assert_error_rule(f"fused mirror M={M} {kind}", got, oracle, baseline)


@pytest.mark.parametrize("mutation", ["a row of the shifted tile not stored",
                                      "a sub-step's own scale, not its block's",
                                      "rows in natural order"])
def test_large_mirror_fails_on_a_wrong_schedule_or_scale(mutation, gen):
    """The check above can fail: the shifted last tile leaving a row unwritten (NaN), blocks of
    two sub-steps scaled per sub-step, or weight rows loaded in natural order while the
    epilogue stores in paired order."""
    N, K, M = 64, 512, 200
    q, Wd = _quantized(gen, N, K, "nf4", 128, False)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    wrong = {"a row of the shifted tile not stored": {"keep_from": lambda first, m0: first - m0 + 1},
             "a sub-step's own scale, not its block's": {"block_of": lambda g, bs: min(g, K // bs - 1)},
             "rows in natural order": {"paired": lambda r: r}}[mutation]
    got = _mirror_large(x, q, torch.bfloat16, gen, **wrong)
    with pytest.raises(AssertionError):
        assert_error_rule("mutated", got, x.double() @ Wd.double().t(), x @ Wd.bfloat16().t())


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs Triton (interpreter)")
@pytest.mark.parametrize("dq", [True, False])
def test_block_scales_t_are_the_decoded_absmax(dq, gen):
    from peftkern.kernels import quant_4bit
    N, K, bs = 300, 1024, 64
    q, _ = _quantized(gen, N, K, "nf4", bs, dq)
    got = quant_4bit.block_scales_t(q.absmax, q.absmax2, q.code8, q.offset, N, K // bs)
    want = (formulas.dequantize_absmax(q.absmax, q.absmax2, q.code8, q.offset) if dq
            else q.absmax).reshape(N, K // bs).t()
    assert torch.equal(got, want)


@pytest.mark.parametrize("M, K, blocksize, dt, ok", [
    (16, 4096, 64, torch.bfloat16, True), (1, 14336, 64, torch.float16, True),
    (128, 4096, 64, torch.bfloat16, True), (8192, 8192, 128, torch.float16, True),
    (17, 4096, 64, torch.bfloat16, False),   # 16 < M < 128: the Triton kernel
    (127, 4096, 64, torch.bfloat16, False),
    (4096, 14336, 64, torch.bfloat16, True), (4096, 2048, 64, torch.bfloat16, True),
    (300, 11008, 256, torch.bfloat16, True), (4096, 4096, 4096, torch.float16, True),  # large M
    (4096, 4096, 96, torch.bfloat16, False),   # a block not a whole number of sub-steps
    (4, 4096, 32, torch.bfloat16, False),    # a block shorter than a sub-step
    (4, 4096, 1024, torch.bfloat16, False),  # a block longer than a K slice
    (4, 4160, 64, torch.bfloat16, False),    # K not a multiple of 128
    (4, 4096, 64, torch.float32, False)])
def test_where_the_kernel_applies(M, K, blocksize, dt, ok):
    assert G.supported(M, K, blocksize, dt) == (ok and G.AVAILABLE)


@pytest.mark.parametrize("M, N, K, blocksize, dt, ok", [
    (128, 4096, 4096, 64, torch.bfloat16, True), (8192, 14336, 4096, 64, torch.bfloat16, True),
    (300, 4096, 11008, 256, torch.bfloat16, True), (300, 11008, 4096, 64, torch.bfloat16, True),
    (300, 4096, 4160, 128, torch.bfloat16, False),  # K not a multiple of the blocksize
    (4096, 4096, 4096, 64, torch.float16, False),   # fp16: the scales would multiply dY in fp16
    (127, 4096, 4096, 64, torch.bfloat16, False),   # fewer rows than a tile
    (4096, 4160, 4096, 64, torch.bfloat16, False),  # N not a multiple of 128
    (4096, 4096, 4096, 32, torch.bfloat16, False),  # a block shorter than a tile
    (4096, 4096, 4096, 64, torch.float32, False)])
def test_where_the_dx_kernel_applies(M, N, K, blocksize, dt, ok):
    assert G.dx_supported(M, N, K, blocksize, dt) == (ok and G.AVAILABLE)


def test_lora_fits_in_the_large_kernels_epilogue():
    b16, f32 = torch.bfloat16, torch.float32
    assert G.lora_fits(torch.empty(4, 64, dtype=b16), torch.empty(64, 8, dtype=b16), b16)
    assert not G.lora_fits(torch.empty(4, 65, dtype=b16), torch.empty(65, 8, dtype=b16), b16)
    assert not G.lora_fits(torch.empty(4, 16, dtype=f32), torch.empty(16, 8, dtype=f32), b16)


def test_dx_schedule_covers_every_tile_once():
    for M, K in [(8192, 4096), (8192, 14336), (128, 64), (300, 4096), (65536, 11008)]:
        tiles = -(-M // G.LARGE_M) * (K // G.DX_ROWS)
        grid = G.dx_programs(M, K, 132)
        assert grid <= 132 * G.DX_RESIDENT
        seen = sorted(t for c in range(grid) for t in range(c, tiles, grid))
        assert seen == list(range(tiles))
        busiest, progs = G.dx_tiles_per_sm(M, K, 132)
        assert busiest >= -(-tiles // 132) and progs <= G.DX_RESIDENT


def test_persistent_schedule_covers_every_tile_once():
    for N, K in [(4096, 4096), (14336, 4096), (4096, 14336), (130, 1280), (11008, 4096)]:
        tiles, s = -(-N // G.ROWS_PER_CTA), G.splits(K)
        grid = G.programs(N, K, 132)
        assert grid % s == 0 and grid <= 132 * G.RESIDENT
        seen = sorted((t, c % s) for c in range(grid) for t in range(c // s, tiles, grid // s))
        assert seen == [(t, sp) for t in range(tiles) for sp in range(s)]
        busiest, progs = G.tiles_per_sm(N, K, 132)
        assert busiest >= -(-tiles * s // 132) and progs <= G.RESIDENT


def test_large_schedule_covers_every_tile_once():
    for M, N in [(8192, 4096), (8192, 14336), (128, 130), (300, 4096), (65536, 11008)]:
        tiles = -(-M // G.LARGE_M) * -(-N // G.ROWS_PER_CTA)
        grid = G.large_programs(M, N, 132)
        assert grid <= 132 * G.LARGE_RESIDENT
        seen = sorted(t for c in range(grid) for t in range(c, tiles, grid))
        assert seen == list(range(tiles))
        busiest, progs = G.large_tiles_per_sm(M, N, 132)
        assert busiest == -(-tiles // grid) and progs <= G.LARGE_RESIDENT


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs Triton (interpreter)")
@pytest.mark.parametrize("M, cfg", [(3, GLUON_CFG), (130, GLUON_LARGE_CFG)], ids=["small", "large"])
def test_interpreter_runs_the_triton_kernel_for_the_gluon_config(M, cfg, gen, monkeypatch):
    """Under TRITON_INTERPRET the GLUON config never reaches Gluon: the Triton kernel with its
    tiles computes the same math (and follows the error rule)."""
    for name in ("forward_partials", "large_linear", "dx_linear"):
        monkeypatch.setattr(G, name, lambda *a, **k: pytest.fail("Gluon launched"))
    N, K = 100, 512
    q, Wd = _quantized(gen, N, K, "nf4", 64, True)
    x = torch.randn(M, K, generator=gen).to(torch.float16)
    A = torch.zeros(4, K, dtype=torch.float16)
    B = torch.zeros(N, 4, dtype=torch.float16)
    with ops.use_backend("triton"), ops.use_config(cfg):
        got = ops.qlora_linear(x, q, None, A, B, 0.5)
    assert_error_rule("gluon config, interpreter", got, x.double() @ Wd.double().t(),
                      x @ Wd.to(torch.float16).t())
    assert not L._wgmma_applies(x, q.data, 64)


class _Launches:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the launch's kwargs."""
    def __init__(self, seen):
        self.seen = seen

    def __getitem__(self, grid):
        return lambda *a, **k: self.seen.append(k)


def _routing_weight(gen, N, K):
    """A 4-bit weight and lora_matmul's `wq` state for it (bf16 compute, CPU)."""
    from peftkern.ops.backends import triton as tb
    q, _ = _quantized(gen, N, K, "nf4", 64, True)
    return q, tb._qstate(q.absmax, q.absmax2, q.code8, q.offset, "nf4", 64, torch.device("cpu"),
                         torch.bfloat16)


@pytest.mark.parametrize("adapters", [torch.bfloat16, torch.float32])
def test_gluon_dx_config_routes_to_the_dx_kernel(adapters, gen, monkeypatch):
    """With a GLUON config where the dX kernel applies (forced here: it needs an sm_90 GPU),
    lora_matmul's dX is one `dx_linear` call, epilogue included, with its own arguments; fp32
    adapters (the exact-fp32 epilogue) go to the Triton kernel instead."""
    dx_calls, triton_calls = [], []
    monkeypatch.setattr(L, "_wgmma_applies", lambda inp, w, bs, forward=True, P=0: not forward)
    monkeypatch.setattr(G, "dx_linear", lambda *a: dx_calls.append(a) or a[-1])
    monkeypatch.setattr(L, "_lora_matmul_kernel", _Launches(triton_calls))
    N, K, M, R = 256, 512, 130, 16
    q, wq = _routing_weight(gen, N, K)
    dy = torch.randn(M, N, generator=gen).to(torch.bfloat16)
    Lt, R2 = torch.randn(M, R).to(adapters), torch.randn(R, K).to(adapters)
    mask = torch.ones(M, K, dtype=torch.bfloat16)
    out = L.lora_matmul(dy, q.data.reshape(-1), wq, Lt, R2, 0.5, mask, stride_wq=K, stride_wp=1,
                        P=K, config=GLUON_LARGE_CFG)
    if adapters == torch.float32:
        assert not dx_calls and triton_calls
        return
    assert not triton_calls and len(dx_calls) == 1
    a = dx_calls[0]
    assert a[0] is dy and a[7] == 64 and a[8] == K and a[9] is Lt and a[10] is R2
    assert a[11] == 0.5 and a[12] is mask and a[13] is out and out.shape == (M, K)


@pytest.mark.parametrize("dora", [False, True])
def test_gluon_large_forward_routes_to_its_fused_epilogue(dora, gen, monkeypatch):
    """With the GLUON large config where the large forward applies (forced here), lora_matmul's
    forward is one `large_linear` call, epilogue and bias included; DoRA's scale and z take
    the workspace path (`forward_partials` + the split-K epilogue kernel)."""
    fused, partials, launches = [], [], []
    monkeypatch.setattr(L, "_wgmma_applies", lambda inp, w, bs, forward=True, P=0: forward)
    monkeypatch.setattr(G, "large_linear", lambda *a: fused.append(a) or a[-1])
    monkeypatch.setattr(G, "forward_partials", lambda *a: partials.append(a) or torch.zeros(1, 1, 1))
    monkeypatch.setattr(L, "_split_k_epilogue_kernel", _Launches(launches))
    N, K, M, R = 256, 512, 130, 16
    q, wq = _routing_weight(gen, N, K)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    Lt, R2 = torch.randn(M, R).to(torch.bfloat16), torch.randn(N, R).to(torch.bfloat16).t()
    bias = torch.randn(N).to(torch.bfloat16)
    scale = torch.ones(N) if dora else None
    got = L.lora_matmul(x, q.data.reshape(-1), wq, Lt, R2, 0.5, None, bias, stride_wq=1,
                        stride_wp=K, P=N, config=GLUON_LARGE_CFG, scale=scale, keep_z=dora)
    if dora:
        assert not fused and len(partials) == 1 and launches and launches[0]["HAS_SCALE"]
        return
    assert not partials and not launches and len(fused) == 1
    a = fused[0]
    assert a[0] is x and a[7] == 64 and a[8] == N and a[9] is Lt and a[10] is R2
    assert a[11] == 0.5 and a[12] is bias and a[13] is got and got.shape == (M, N)


def test_misaligned_packed_bytes_are_not_read_in_place():
    """The kernel reads the packed bytes as int32 words in place; a view off a 4-byte boundary
    goes to the Triton kernel instead of a copy of the weight per call."""
    buf = torch.zeros(4097, dtype=torch.uint8)
    assert G.aligned(buf[:4096]) and not G.aligned(buf[1:4097])
