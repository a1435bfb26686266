"""Shared test helpers: the DESIGN.md error rule, the backends on this host, and tiny random
transformers models with PEFT helpers (no download). Tests import it as `helpers`; conftest
only sets up the environment and fixtures."""
import torch

from peftkern import ops

CPU_BACKENDS = ops.available(torch.device("cpu"))
GPU = torch.cuda.is_available()


def assert_error_rule(name, got, oracle, baseline, rel_atol=1e-6):
    """DESIGN.md §6: error vs the float64 oracle <= 2x plain torch's error in the same precision
    (+ a tiny atol relative to the output's scale). NaN anywhere fails."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in output (unwritten elements?)"
    if oracle.numel() == 0:
        return
    err = (got.double() - oracle).abs().max().item()
    base = (baseline.double() - oracle).abs().max().item()
    atol = rel_atol * oracle.abs().max().item() + 1e-12
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 x torch's {base:.3e} + {atol:.1e}"


# ---- tiny random transformers models (the PEFT tests skip without transformers) -----------------

def _transformers():
    import transformers
    return transformers


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96


def llama(seed=0, intermediate_size=96, dtype=torch.float32):
    cfg = _transformers().LlamaConfig(vocab_size=VOCAB, hidden_size=64,
                                   intermediate_size=intermediate_size, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return _transformers().LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(seed=0, n_embd=32):
    """GPT-2 with Conv1D attention (`c_attn` weight [in, out]); model dropouts off, so that only
    LoRA's dropout is random."""
    cfg = _transformers().GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return _transformers().GPT2LMHeadModel(cfg).eval()


def randomize_lora(model, seed=1):
    """lora_B (and lora biases) start at zero under PEFT's init: draw them, so LoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def tokens(seed=2, batch=2, T=9):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_run(got, want, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-6):
    """`loss_and_grads` results equal: logits, loss and every gradient (same names)."""
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)
    assert got[2].keys() == want[2].keys() and got[2]
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=grad_rtol, atol=grad_atol, msg=n)
