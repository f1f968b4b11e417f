"""Block reconstruction: each block's compressed layers tuned together to the teacher's block
output, only kept weights moving, on blocks called with keywords (transformers) as well."""

import copy

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.errors import CompressionError, ConfigError
from mpdcompress.posthoc.calibrate import compress_calibrated, refit_
from mpdcompress.posthoc.reconstruct import default_blocks, reconstruct_

from .test_calibrate import correlated_inputs, relative_error


class Block(nn.Module):
    """A residual MLP block with a norm, as a transformer layer's second half is."""

    def __init__(self, d=24, hidden=48):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x, *, scale=1.0):
        return self.norm(x + scale * self.down(torch.relu(self.up(x))))


class Stack(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x, scale=0.5)  # a keyword the replayed calls must keep
        return self.head(x)


def test_default_blocks_are_the_list_elements_around_compressed_layers_else_the_model():
    student = mpd.mpdify_(Stack(), 2)
    assert default_blocks(student) == ["blocks.0", "blocks.1"]  # the head alone: refit fits it exactly
    plain = mpd.mpdify_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), 2)
    assert default_blocks(plain) == [""]
    listed = mpd.mpdify_(nn.ModuleList([nn.Linear(8, 8)]), 2)
    assert default_blocks(listed) == ["0"]


def test_reconstruction_lowers_each_block_error_and_moves_only_kept_weights():
    teacher, batches = Stack().eval(), correlated_inputs()
    student = refit_(mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights"), teacher, batches)
    refitted = copy.deepcopy(student)
    events = []
    reconstruct_(student, teacher, batches, steps=60, lr=3e-3, progress=events.append)
    assert [e["block"] for e in events] == ["blocks.0", "blocks.1"]
    for e in events:
        assert e["error_after"] < 0.8 * e["error_before"]

    def blocks_output(model):  # the head, outside every block, was fitted to the old blocks
        with torch.no_grad():
            x = torch.cat(batches)
            for block in model.blocks:
                x = block(x, scale=0.5)
            return x

    target = blocks_output(teacher)
    assert (blocks_output(student) - target).square().sum() < (blocks_output(refitted) - target).square().sum()
    for name, layer in mpd.compressed_layers(student).items():
        old = refitted.get_submodule(name)
        assert torch.equal(layer.mpd_mask.dense(), old.mpd_mask.dense())  # masks unchanged
        assert not (layer.weight * ~layer.mpd_mask.dense()).any()  # nothing off the mask
    for i in range(2):  # what is not compressed stays as it was
        assert torch.equal(student.blocks[i].norm.weight, refitted.blocks[i].norm.weight)
        assert student.blocks[i].norm.weight.requires_grad
    assert all(p.grad is None for p in student.parameters())
    for a, b in zip(teacher.parameters(), Stack().parameters()):  # the teacher is left alone
        assert torch.equal(a, b)
    packed = mpd.pack(student)
    with torch.no_grad():
        torch.testing.assert_close(packed(batches[0]), student(batches[0]), rtol=1e-5, atol=1e-5)


def test_compress_calibrated_with_block_steps_tunes_blocks_then_refits_the_layers_after_them():
    teacher, batches = Stack().eval(), correlated_inputs()
    in_blocks = lambda module, name: name.startswith("blocks.")  # noqa: E731
    refitted = compress_calibrated(teacher, 4, batches, filter_fn=in_blocks)
    tuned = compress_calibrated(teacher, 4, batches, filter_fn=in_blocks, block_steps=60, block_lr=3e-3)
    assert relative_error(tuned, teacher, batches) < 0.7 * relative_error(refitted, teacher, batches)
    # A compressed head outside the blocks is fitted to what the tuned blocks give: refitting
    # it once more changes nothing.
    whole = compress_calibrated(teacher, 4, batches, block_steps=20)
    again = refit_(copy.deepcopy(whole), teacher, batches, layers=["head"])
    torch.testing.assert_close(again.head.weight, whole.head.weight, rtol=1e-5, atol=1e-6)
    stale = refit_(copy.deepcopy(whole), teacher, batches, layers=["blocks.0.up"])  # its input did not move
    torch.testing.assert_close(stale.blocks[0].up.weight, refitted.blocks[0].up.weight, rtol=1e-5, atol=1e-6)


def test_a_model_without_blocks_is_reconstructed_whole():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    batches = correlated_inputs()
    refitted = compress_calibrated(teacher, 4, batches)
    events = []
    tuned = reconstruct_(copy.deepcopy(refitted), teacher, batches, steps=60, lr=3e-3, progress=events.append)
    assert [e["block"] for e in events] == [""]
    assert relative_error(tuned, teacher, batches) < relative_error(refitted, teacher, batches)


def test_reconstruction_requests_that_cannot_work_are_refused():
    teacher, batches = Stack().eval(), correlated_inputs()
    student = mpd.mpdify_(copy.deepcopy(teacher), 2)
    with pytest.raises(ConfigError, match="steps"):
        reconstruct_(student, teacher, batches, steps=0)
    with pytest.raises(ConfigError, match="separate"):
        reconstruct_(student, student, batches)
    with pytest.raises(CompressionError, match="no block 'blocks.7'"):
        reconstruct_(student, teacher, batches, blocks=["blocks.7"])
    with pytest.raises(CompressionError, match="before pack"):
        reconstruct_(mpd.pack(student), teacher, batches)
    with pytest.raises(CompressionError, match="never reach"):
        reconstruct_(student, teacher, [], blocks=["blocks.0"])
    with pytest.raises(ConfigError, match="more than once"):
        reconstruct_(student, teacher, iter(batches))
    with pytest.raises(CompressionError, match=r"no masked MPD layers named \['nope'\]"):
        refit_(student, teacher, batches, layers=["nope"])


def test_transformer_layers_called_with_keywords_are_reconstructed():
    transformers = pytest.importorskip("transformers")
    from mpdcompress.core.roles import select_roles

    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 97, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
        for _ in range(4)
    ]
    batches[0]["attention_mask"][:, 6:] = 0  # padding: the mask reaches the layers as a keyword
    refitted = compress_calibrated(bert, 4, batches, filter_fn=select_roles("mlp"))
    events = []
    tuned = reconstruct_(copy.deepcopy(refitted), bert, batches, steps=40, lr=3e-3, progress=events.append)
    assert [e["block"] for e in events] == ["encoder.layer.0", "encoder.layer.1"]
    assert all(e["error_after"] < e["error_before"] for e in events)

    def error(model):
        with torch.no_grad():
            return sum(
                float((model(**b).last_hidden_state - bert(**b).last_hidden_state).square().mean()) for b in batches
            )

    assert error(tuned) < error(refitted)


def test_a_block_called_with_a_cache_is_refused_until_the_batches_turn_it_off():
    # A key-value cache grows at every call: replayed calls would see longer keys than the real
    # forward did, and the blocks would be tuned to the wrong thing without a word.
    transformers = pytest.importorskip("transformers")
    from mpdcompress.core.roles import select_roles

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 97, (4, 9), generator=g) for _ in range(4)]
    student = refit_(mpd.mpdify_(copy.deepcopy(llama), 2, filter_fn=select_roles("mlp")), llama, ids)
    with pytest.raises(CompressionError, match=r"block 'model.layers.0' is called with .*Cache.*use_cache=False"):
        reconstruct_(copy.deepcopy(student), llama, [{"input_ids": x, "use_cache": True} for x in ids], steps=2)
    events = []
    batches = [{"input_ids": x, "use_cache": False} for x in ids]
    reconstruct_(student, llama, batches, steps=20, lr=3e-3, progress=events.append)
    assert [e["block"] for e in events] == ["model.layers.0", "model.layers.1"]
    assert all(e["error_after"] < e["error_before"] for e in events)
