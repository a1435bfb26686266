"""kernels/qlora_wgmma.py, the Gluon (sm_90a) small-M 4-bit forward, without a GPU.

Gluon kernels do not run under TRITON_INTERPRET. What a CPU can check:
- the kernel's index algebra: `_mirror` replays its logical tensor program in torch, op for op
  (word loads, byte extraction into table indices, the slot-order permutations of the bytes and
  of x, the 32-way table, the per-block scaling of fp32 partial sums per K slice), and must
  follow the error rule against the exactly decoded weight. A wrong permutation of either side,
  a wrong table index or a scale from the wrong block fails it (Gluon's layouts change where
  values live, not what the tensor program computes; the fragment mapping itself is proven by
  the compiler's `convert_layout(assert_trivial=True)`, tests/test_static.py);
- where the GLUON config applies and that the interpreter runs the Triton kernel instead.
The kernel itself runs in tests/test_gpu.py on a GPU.
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


def _codes(cur, table, dtype, gen) -> torch.Tensor:
    """The [rows, 64] slot-order table values of packed words `cur` [rows, 8], as `_codes`."""
    rows = cur.shape[0]
    # any lane in 0..31 picks an identical copy: the lane only spreads the banks
    lane = torch.randint(0, 32, cur.shape, generator=gen, dtype=torch.int32)
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


def _mirror_large(x, q, dtype, gen, keep_from=lambda first, m0: first - m0,
                  block_of=lambda g, bs: g * G.SUB_K // bs) -> torch.Tensor:
    """out[M, N] as _qlora_wgmma_large_kernel computes it (M >= 128): its tile schedule (n fastest;
    the last m-tile shifted to end at row M, rows of the tile before not stored again), the
    clamped weight rows, the staged block scales (rows past N unset: NaN), the slot-order
    sub-steps; returns the [N, M] workspace seen as [M, N]."""
    N, K = q.shape
    M, R, BMX = x.shape[0], G.ROWS_PER_CTA, G.LARGE_M
    nb = K // q.blocksize
    words = q.data.reshape(-1).view(torch.int32).reshape(N, K // 8)
    table = codes.byte_pair_table(q.quant_type, dtype)[:, None].expand(256, 32).reshape(-1)
    st = (formulas.dequantize_absmax(q.absmax, q.absmax2, q.code8, q.offset)
          if q.absmax2 is not None else q.absmax.float()).reshape(N, nb).t()  # block_scales_t
    ws = torch.full((N, M), float("nan"))
    n_tiles = -(-N // R)
    for tile in range(n_tiles * -(-M // BMX)):
        n0 = tile % n_tiles * R
        first = tile // n_tiles * BMX
        m0 = min(first, M - BMX)
        w_rows = torch.clamp(torch.arange(n0, n0 + R), max=N - 1)
        staged = torch.full((G.stage_blocks(nb), R), float("nan"))
        staged[:nb, :min(R, N - n0)] = st[:, n0:n0 + R]
        xt = x[m0:m0 + BMX]
        acc = torch.zeros(R, BMX)
        for g in range(K // G.SUB_K):
            a = _codes(words[w_rows, 8 * g:8 * g + 8], table, dtype, gen)
            part = a.float() @ _x_slot(xt, g * G.SUB_K).float().t()
            acc = acc + part * staged[block_of(g, q.blocksize)][:, None]
        keep = slice(keep_from(first, m0), BMX)
        ws[n0:n0 + R, m0:m0 + BMX][:, keep] = acc[:min(R, N - n0), keep]
    return ws.t().double()


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
    # (the large kernel's launcher also limits K to its spill-free specializations: the tensor
    # program is the same at every K)
    assert G.supported(M, K, blocksize, dt) or M >= G.LARGE_M and G.supported(M, 4096, 64, dt)
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


@pytest.mark.parametrize("mutation", ["a row of the shifted tile not stored",
                                      "a sub-step's own scale, not its block's"])
def test_large_mirror_fails_on_a_wrong_schedule_or_scale(mutation, gen):
    """The check above can fail: the shifted last tile leaving a row unwritten (NaN), or blocks of
    two sub-steps scaled per sub-step."""
    N, K, M = 64, 512, 200
    q, Wd = _quantized(gen, N, K, "nf4", 128, False)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    wrong = ({"keep_from": lambda first, m0: first - m0 + 1}
             if mutation.startswith("a row") else {"block_of": lambda g, bs: g})
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
    (4096, 14336, 64, torch.bfloat16, False),  # large M: a specialization that spills
    (4096, 2048, 64, torch.bfloat16, False),
    (4, 4096, 32, torch.bfloat16, False),    # a block shorter than a sub-step
    (4, 4096, 1024, torch.bfloat16, False),  # a block longer than a K slice
    (4, 4160, 64, torch.bfloat16, False),    # K not a multiple of 128
    (4, 4096, 64, torch.float32, False)])
def test_where_the_kernel_applies(M, K, blocksize, dt, ok):
    assert G.supported(M, K, blocksize, dt) == (ok and G.AVAILABLE)


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
    monkeypatch.setattr(G, "forward_partials", lambda *a, **k: pytest.fail("Gluon launched"))
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


def test_misaligned_packed_bytes_are_not_read_in_place():
    """The kernel reads the packed bytes as int32 words in place; a view off a 4-byte boundary
    goes to the Triton kernel instead of a copy of the weight per call."""
    buf = torch.zeros(4097, dtype=torch.uint8)
    assert G.aligned(buf[:4096]) and not G.aligned(buf[1:4097])
