"""Hugging Face transformers models built from tiny configs (random weights, no download):
selection by role, GPT-2's Conv1D, exact packing, saving with ties, and a folder round trip."""

import sys

import pytest
import torch

import mpdcompress as mpd
from mpdcompress.core.roles import layer_role, roles_of, select_roles
from mpdcompress.errors import CompressionError, UnknownNameError
from mpdcompress.files.hf import load_compressed, save_compressed

from .helpers import assert_close_to_scale

transformers = pytest.importorskip("transformers")

VOCAB = 97


def bert(cls_name="BertModel"):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return getattr(transformers, cls_name)(config).eval()


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama}
IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


def first_output(model):
    with torch.no_grad():
        return model(IDS)[0]


@pytest.mark.parametrize(
    "name, role",
    [
        ("encoder.layer.0.intermediate.dense", "mlp_up"),
        ("encoder.layer.0.output.dense", "mlp_down"),
        ("encoder.layer.0.attention.output.dense", "attn_out"),
        ("encoder.layer.0.attention.self.query", "attn_qkv"),
        ("transformer.h.1.mlp.c_fc", "mlp_up"),
        ("transformer.h.1.attn.c_proj", "attn_out"),
        ("model.layers.0.mlp.gate_proj", "mlp_gate"),
        ("model.layers.0.mlp.down_proj", "mlp_down"),
        ("lm_head", None),
        ("pooler.dense", None),
    ],
)
def test_roles_are_read_from_the_names_of_every_family(name, role):
    assert layer_role(name) == role


def test_unknown_roles_are_refused():
    with pytest.raises(UnknownNameError, match="unknown layer role 'ffn'"):
        select_roles("ffn")


@pytest.mark.parametrize("family", BUILDERS)
def test_every_family_compresses_by_role_and_packs_exactly(family):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    layers = {n for n, r in roles_of(model).items() if r.startswith("mlp")}
    assert layers  # the family's MLP layers are recognised
    mpd.mpdify_(model, 4, filter_fn=select_roles("mlp"), masks="weights")
    assert set(mpd.compressed_layers(model)) == layers
    masked = first_output(model)
    assert_close_to_scale(first_output(mpd.pack(model)), masked, 1e-5)


def test_gpt2_conv1d_becomes_a_masked_linear_that_computes_the_same_layer():
    torch.manual_seed(0)
    model = gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, 32)
    mpd.mpdify_(model, 4, filter_fn=select_roles("mlp_up"))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, mpd.MPDLinear) and layer.weight.shape == (128, 32)
    # The masked layer is the Conv1D with the mask applied to its transposed weight.
    expected = x @ (conv.weight * layer.mask.T) + conv.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.bias is conv.bias


def test_training_steps_keep_masked_transformer_weights_off_the_mask_at_zero():
    torch.manual_seed(0)
    model = llama().train()
    mpd.mpdify_(model, 4, filter_fn=select_roles("mlp", "attention"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer in mpd.compressed_layers(model).values():
        assert float((layer.weight * ~layer.mask).abs().max()) == 0.0


@pytest.mark.parametrize("form", ["masked", "packed"])
def test_a_tied_language_model_head_saves_and_loads_with_the_tie_kept(tmp_path, form):
    torch.manual_seed(0)
    model = gpt2()
    mpd.mpdify_(model, 4, filter_fn=select_roles("all"))
    model = mpd.pack(model) if form == "packed" else model
    mpd.save(model, tmp_path / "gpt2.safetensors")
    assert mpd.read_manifest(tmp_path / "gpt2.safetensors")["ties"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = mpd.load(tmp_path / "gpt2.safetensors", model=gpt2()).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(first_output(loaded), first_output(model), rtol=0, atol=0)


@pytest.mark.parametrize("family, auto", [("bert", "AutoModel"), ("gpt2", "AutoModelForCausalLM")])
def test_a_packed_model_round_trips_through_a_folder_with_its_config(tmp_path, family, auto):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    mpd.mpdify_(model, 2, filter_fn=select_roles("mlp"))
    packed = mpd.pack(model)
    save_compressed(packed, tmp_path / family)
    assert (tmp_path / family / "config.json").is_file()
    loaded = load_compressed(tmp_path / family, getattr(transformers, auto))
    assert type(loaded) is type(packed)
    torch.testing.assert_close(first_output(loaded), first_output(packed), rtol=0, atol=0)


def test_multihead_attention_is_refused_and_left_alone():
    model = torch.nn.TransformerEncoderLayer(16, 2, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressionError, match="out_proj"):
        mpd.mpdify_(model, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.self_attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear


def test_a_model_built_on_the_meta_device_gets_its_masks_back_when_materialized():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = bert()
    mpd.mpdify_(model, 4, filter_fn=select_roles("mlp"), seed=3)
    model.to_empty(device="cpu")
    reference = mpd.mpdify_(bert(), 4, filter_fn=select_roles("mlp"), seed=3)
    for name, layer in mpd.compressed_layers(reference).items():
        got = model.get_submodule(name)
        assert torch.equal(got.row_order, layer.row_order) and torch.equal(got.col_order, layer.col_order)
        assert torch.equal(got.mask, layer.mask) and got.compression == 4
    model.load_state_dict(reference.state_dict())
    mpd.pack(model)  # a materialized model is a normal one


def test_weight_chosen_masks_need_the_weights():
    with torch.device("meta"):
        model = bert()
    with pytest.raises(CompressionError, match="meta"):
        mpd.mpdify_(model, 4, filter_fn=select_roles("mlp"), masks="weights")


def test_joint_weight_masks_group_a_gated_mlps_hidden_units_once():
    torch.manual_seed(0)
    model = llama()
    mpd.mpdify_(model, 4, filter_fn=select_roles("mlp"), masks="weights-joint")
    for block in model.model.layers:
        mlp = block.mlp
        assert torch.equal(mlp.gate_proj.row_order, mlp.down_proj.col_order)
        assert torch.equal(mlp.up_proj.row_order, mlp.down_proj.col_order)
    assert_close_to_scale(first_output(mpd.pack(model)), first_output(model), 1e-5)


def test_a_missing_hf_dependency_names_the_extra_that_installs_it(monkeypatch):
    from mpdcompress.errors import MissingDependencyError
    from mpdcompress.files.hf import hf_module

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import now fails
    with pytest.raises(MissingDependencyError, match=r"needs tokenizers: pip install 'mpdcompress\[hf\]'"):
        hf_module("tokenizers")


def test_save_pretrained_refuses_models_it_would_bring_back_wrong_and_keeps_masked_linears(tmp_path):
    """GPT-2's masked Conv1D layers and every packed layer would come back from from_pretrained as
    other tensors (transposed, or random): save_pretrained refuses them and names save_compressed.
    A masked BERT (plain nn.Linear) still survives it as the dense model of the same function."""
    masked_gpt2 = mpd.mpdify_(gpt2(), 2, filter_fn=select_roles("mlp"))
    with pytest.raises(CompressionError, match="Conv1D.*save_compressed"):
        masked_gpt2.save_pretrained(str(tmp_path / "gpt2"))
    assert not (tmp_path / "gpt2").exists()
    packed_bert = mpd.pack(mpd.mpdify_(bert(), 2, filter_fn=select_roles("mlp")))
    with pytest.raises(CompressionError, match="packed layers.*save_compressed"):
        packed_bert.save_pretrained(str(tmp_path / "packed"))
    compact = mpd.mpdify_(bert(), 2, filter_fn=select_roles("mlp"), mode="compact")
    with pytest.raises(CompressionError, match="save_compressed"):
        compact.save_pretrained(str(tmp_path / "compact"))
    masked_bert = mpd.mpdify_(bert(), 2, filter_fn=select_roles("mlp"))
    masked_bert.save_pretrained(str(tmp_path / "bert"))
    reloaded = transformers.BertModel.from_pretrained(str(tmp_path / "bert")).eval()
    assert torch.equal(first_output(reloaded), first_output(masked_bert))
    import copy
    import pickle

    for clone in (copy.deepcopy(packed_bert), pickle.loads(pickle.dumps(packed_bert))):
        with pytest.raises(CompressionError, match="save_compressed"):
            clone.save_pretrained(str(tmp_path / "clone"))
    save_compressed(packed_bert, tmp_path / "folder")  # the way that works
    assert torch.equal(first_output(load_compressed(tmp_path / "folder")), first_output(packed_bert))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_export_to_onnx_without_their_cache_and_match(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = mpd.pack(mpd.mpdify_(BUILDERS[family](), 2, filter_fn=select_roles("mlp")))
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    path = mpd.export_onnx(model, {"input_ids": ids}, tmp_path / "m.onnx", dynamic_dims={0: "batch", 1: "sequence"})
    assert model.config.use_cache  # restored after the export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    (logits,) = session.run(None, {"input_ids": other.numpy()})[:1]
    with torch.no_grad():
        expected = model(other, use_cache=False).logits
    assert_close_to_scale(torch.from_numpy(logits), expected, 1e-5)
