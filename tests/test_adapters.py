"""peftkern.adapters: one-call LoRA injection into a plain PyTorch model (a tiny random Llama, no
download), PEFT-format adapter files both ways, merge/unmerge, and bad input left harmless."""
import copy

import pytest
import torch

import peftkern

pytest.importorskip("transformers")
PeftModel = pytest.importorskip("peft").PeftModel

from helpers import LINEARS, llama, randomize_lora, tokens  # noqa: E402


def test_inject_adapter_loads_into_plain_peft(tmp_path):
    model = peftkern.inject(llama(), LINEARS, r=4, lora_alpha=8)
    assert all(".lora_" in n for n, _ in peftkern.trainable_parameters(model))
    assert len(peftkern.trainable_parameters(model)) == 4 * len(LINEARS)
    randomize_lora(model)
    ids = tokens()
    want = model(input_ids=ids).logits
    peftkern.save_adapter(model, str(tmp_path))
    plain = PeftModel.from_pretrained(llama(), str(tmp_path))
    torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    # and back: a PEFT adapter into an injected model
    plain.save_pretrained(tmp_path / "again")
    other = peftkern.inject(llama(), LINEARS, r=4, lora_alpha=8)
    peftkern.load_adapter(other, str(tmp_path / "again"))
    torch.testing.assert_close(other(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_inject_regex_quantize_and_merge():
    model = peftkern.inject(llama(), r".*\.mlp\.(up|down)_proj", r=4, quantize="nf4",
                            compute_dtype=torch.float32)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("up_proj", "down_proj"))}
    assert kinds == {"QLoRALinear"}
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    randomize_lora(model)
    ids = tokens()
    y = model(input_ids=ids).logits
    peftkern.merge(model)
    assert (model(input_ids=ids).logits - y).abs().max() < 0.5  # 4-bit merge is lossy
    peftkern.unmerge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, y)


def test_inject_bad_input_leaves_model_unchanged(tmp_path):
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        peftkern.inject(model, ["nonexistent"])
    with pytest.raises(ValueError, match="quantize must be one of"):
        peftkern.inject(model, LINEARS, quantize="int3")
    with pytest.raises(ValueError, match="r must be an int"):
        peftkern.inject(model, LINEARS, r=1000)
    assert all(type(m) is not peftkern.nn.LoRALinear for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_load_adapter_refuses_other_shapes_and_tampered_files(tmp_path):
    src = peftkern.inject(llama(), LINEARS, r=4)
    peftkern.save_adapter(src, str(tmp_path / "r4"))
    dst = peftkern.inject(llama(), LINEARS, r=8)
    snapshot = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="has shape .* expects"):
        peftkern.load_adapter(dst, str(tmp_path / "r4"))
    f = tmp_path / "r4" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        peftkern.load_adapter(src, str(tmp_path / "r4"))
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in snapshot.items())
    with pytest.raises(ValueError, match="no peftkern LoRA layers"):
        peftkern.save_adapter(llama(), str(tmp_path / "none"))
