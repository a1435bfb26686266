"""Tiny random transformers models and PEFT helpers for the PEFT-backend tests (no download)."""
import torch
import transformers

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96


def llama(seed=0, intermediate_size=96, dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64,
                                   intermediate_size=intermediate_size, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def gpt2(seed=0, n_embd=32):
    """GPT-2 with Conv1D attention (`c_attn` weight [in, out]); model dropouts off, so that only
    LoRA's dropout is random."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


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
