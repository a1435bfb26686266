"""PEFT backend and one-call injection on a tiny random Llama (built from a config, no download)."""
import logging

import pytest
import torch

import peftkern
from peftkern import ops

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import peftkern.integrations.peft as pk  # noqa: E402
from helpers import LINEARS, llama, loss_and_grads, randomize_lora, tokens  # noqa: E402

BACKENDS = [b for b in ops.available(torch.device("cpu")) if b in ("triton", "reference")]


def peft_llama(**cfg):
    model = get_peft_model(llama(), LoraConfig(target_modules=LINEARS, r=4, lora_alpha=8, **cfg))
    randomize_lora(model)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_enable_matches_peft_logits_and_lora_grads(backend):
    model = peft_llama()
    ids = tokens()
    want_logits, want_loss, want_grads = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 * len(LINEARS)
    with ops.use_backend(backend):
        logits, loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys() and len(grads) == 4 * len(LINEARS)
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6)
    assert pk.disable(model) == 2 * len(LINEARS)
    torch.testing.assert_close(loss_and_grads(model, ids)[0], want_logits, rtol=0, atol=0)


def test_twenty_optimizer_steps_give_the_same_loss_curve():
    ids = tokens(batch=4, T=12)
    curves = []
    for use_peftkern in (False, True):
        model = peft_llama()
        if use_peftkern:
            pk.enable(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0]  # it trained
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)


def test_custom_module_route_builds_fused_layers():
    cfg = LoraConfig(target_modules=LINEARS, r=4, lora_alpha=8)
    cfg._register_custom_module(pk.custom_modules())
    ours = get_peft_model(llama(), cfg)
    theirs = peft_llama()
    ours.load_state_dict(theirs.state_dict())
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj) is pk.LoraLinear
    ids = tokens()
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_unsupported_features_fall_back_with_one_log_line(caplog):
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], r=4, alora_invocation_tokens=[3, 4]))
    ids = tokens()
    want = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, logger="peftkern"):
        assert pk.enable(model) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "peftkern"]
    assert len(lines) == 1 and "ALoraLinearVariant" in lines[0] and "q_proj" in lines[0]
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_disabled_adapters_and_merge_go_through_peft():
    model = peft_llama()
    pk.enable(model)
    ids = tokens()
    base = llama()(input_ids=ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
    on = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, on, rtol=1e-4, atol=1e-5)


def test_save_pretrained_round_trips_both_ways(tmp_path):
    ids = tokens()
    plain = peft_llama()
    want = plain(input_ids=ids).logits
    plain.save_pretrained(tmp_path / "plain")
    # a plain-PEFT adapter into a peftkern-enabled model
    loaded = PeftModel.from_pretrained(llama(), tmp_path / "plain")
    pk.enable(loaded)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    # an enabled model saves the same files
    loaded.save_pretrained(tmp_path / "enabled")
    for f in ("adapter_model.safetensors",):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "enabled" / f).read_bytes()


def test_enable_refuses_a_model_that_is_not_a_peft_model():
    with pytest.raises(TypeError, match="model must be a peft.PeftModel"):
        pk.enable(llama())


def _assert_compiles_fullgraph(model):
    pk.enable(model)
    ids = tokens()
    want = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_compile_of_enabled_model_has_no_graph_break():
    _assert_compiles_fullgraph(peft_llama())


# ---- 4-bit: a model loaded by transformers with BitsAndBytesConfig(load_in_4bit=True) ---------------


@pytest.fixture(scope="module")
def llama_4bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    d = tmp_path_factory.mktemp("llama")
    # intermediate_size 128: bnb 0.50.2's native CPU dequantize is wrong when in_features is not a
    # multiple of the blocksize (see README), which would corrupt the PEFT+bnb baseline itself.
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def _load_4bit(path, **cfg):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                          dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(target_modules=LINEARS, r=4, lora_alpha=8, **cfg))
    randomize_lora(model)
    return model.train()  # eval mode would let bnb repack weights into its bf16 CPU layout


def test_enable_on_transformers_4bit_model_matches_peft_and_shares_bytes(llama_4bit_dir):
    model = _load_4bit(llama_4bit_dir)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    ptr = q_proj.base_layer.weight.data_ptr()
    ids = tokens()
    want_logits, _, want_grads = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 * len(LINEARS)
    logits, _, grads = loss_and_grads(model, ids)
    assert q_proj.base_layer.weight.data_ptr() == ptr  # the bnb bytes are used in place
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-3, atol=1e-5)


def test_enable_on_a_4bit_dora_model_matches_peft(llama_4bit_dir):
    """QDoRA: PEFT's DoRA over bnb Linear4bit layers; the norm decodes the 4-bit rows itself."""
    model = _load_4bit(llama_4bit_dir, use_dora=True)
    ids = tokens()
    want_logits, _, want_grads = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 * len(LINEARS) and pk.coverage(model) == {"fused": 14}
    logits, _, grads = loss_and_grads(model, ids)
    assert sum("lora_magnitude_vector" in n for n in grads) == 14
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-3, atol=1e-5)


def test_from_bnb_undoes_bnb_cpu_repacking(llama_4bit_dir):
    model = _load_4bit(llama_4bit_dir).eval()
    layer = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    with torch.no_grad():
        layer(torch.randn(2, 64))  # bnb repacks in place on AVX512-BF16 CPUs (not on others)
    q = peftkern.from_bnb(layer.weight)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert q.shape == (128, 64) and q.data.numel() == 128 * 64 // 2


def test_compile_fullgraph_of_enabled_4bit_model(llama_4bit_dir):
    """torch.compile breaks on bnb 4-bit layers today; through peftkern it traces in one graph."""
    _assert_compiles_fullgraph(_load_4bit(llama_4bit_dir))
