"""Compressing with calibration data: input moments, masks for ``W² E[x²]``, and the least-squares
refit of kept weights, checked against a brute-force regression on the same inputs."""

import copy

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.core.mask_search import mask_from_weight
from mpdcompress.errors import CompressionError, CompressionTypeError, ConfigError
from mpdcompress.posthoc.calibrate import compress_calibrated, input_moments, refit_

from .helpers import assert_close_to_scale


def correlated_inputs(n_batches=6, batch=64, d=24, seed=0):
    # Inputs with strong correlations between features, as a trained network's hidden states
    # have: what makes dropped inputs predictable from kept ones.
    fixed = torch.Generator().manual_seed(0)  # one distribution; seed draws other samples of it
    mix, basis = torch.randn(d, d, generator=fixed) / d**0.5, torch.randn(4, d, generator=fixed)
    g = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randn(batch, 4, generator=g) @ basis + 0.1 * torch.randn(batch, d, generator=g) @ mix + 0.5
        for _ in range(n_batches)
    ]


def mlp(seed=0, d=24, hidden=32, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, 8, bias=bias)).eval()


def relative_error(student, teacher, batches):
    with torch.no_grad():
        s = torch.cat([student(x) for x in batches])
        t = torch.cat([teacher(x) for x in batches])
    return float((s - t).square().sum() / t.square().sum())


def test_input_moments_are_mean_squares_of_each_layers_inputs():
    model, batches = mlp(), correlated_inputs()
    moments = input_moments(model, batches)
    x = torch.cat(batches)
    assert torch.allclose(moments["0"], x.square().mean(0), rtol=1e-5)
    with torch.no_grad():
        hidden = model[1](model[0](x))
    assert torch.allclose(moments["2"], hidden.square().mean(0), rtol=1e-5)


def test_mass_weighted_by_input_moments_is_the_mass_of_the_scaled_weight():
    g = torch.Generator().manual_seed(1)
    w, s = torch.randn(30, 40, generator=g), torch.rand(40, generator=g) * 4
    weighted = mask_from_weight(w, 4, input_moment=s, seed=3)
    scaled = mask_from_weight(w * s.sqrt(), 4, seed=3)
    assert torch.equal(weighted.row_order, scaled.row_order) and torch.equal(weighted.col_order, scaled.col_order)
    with pytest.raises(CompressionTypeError, match="one per input"):
        mask_from_weight(w, 4, input_moment=torch.ones(30))


@pytest.mark.parametrize("bias", [True, False])
def test_refit_is_the_least_squares_fit_of_each_output_on_its_kept_inputs(bias):
    teacher, batches = mlp(bias=bias), correlated_inputs()
    student = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="random", seed=2)
    refit_(student, teacher, batches, damping=1e-9)
    # Layer 2 is fitted on the student's own hidden units (layer 0 already refitted) against the
    # teacher's layer-2 outputs: the brute-force regression must give the same weights.
    for name in ("0", "2"):
        layer, dense = student.get_submodule(name), teacher.get_submodule(name)
        prefix = int(name)
        with torch.no_grad():
            u = torch.cat([student[:prefix](x) for x in batches]).double()
            target = torch.cat([dense(teacher[:prefix](x)) for x in batches]).double()
        mask = layer.mpd_mask.dense(torch.bool)
        for row in range(layer.out_features):
            cols = torch.nonzero(mask[row]).flatten()
            design = torch.cat([u[:, cols], torch.ones(len(u), 1, dtype=u.dtype)], 1) if bias else u[:, cols]
            solution = torch.linalg.lstsq(design, target[:, row : row + 1]).solution.flatten()
            assert torch.allclose(layer.weight[row, cols].double(), solution[: len(cols)], atol=1e-5, rtol=1e-4)
            if bias:
                assert torch.allclose(layer.bias[row].double(), solution[-1], atol=1e-5, rtol=1e-4)
        assert torch.all(layer.weight[~mask] == 0)


def test_refit_lowers_the_output_error_and_keeps_an_exact_packed_model():
    teacher, batches = mlp(), correlated_inputs()
    plain = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights")
    refitted = refit_(copy.deepcopy(plain), teacher, batches)
    held_out = correlated_inputs(seed=9)  # same distribution, other draws
    assert relative_error(refitted, teacher, held_out) < 0.5 * relative_error(plain, teacher, held_out)
    x = held_out[0]
    with torch.no_grad():
        assert_close_to_scale(mpd.pack(refitted)(x), refitted(x))


def test_each_refit_pass_stops_at_the_layer_it_fits():
    teacher, batches = mlp(), correlated_inputs()
    student = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights")
    runs = {"teacher": 0, "student": 0}
    for who, layer in (("teacher", teacher[2]), ("student", student[2])):
        layer.register_forward_pre_hook(lambda *_, who=who: runs.__setitem__(who, runs[who] + 1))
    refit_(student, teacher, batches)
    # Once per batch to count calls, once per batch to fit layer 2; fitting layer 0 stops before it.
    assert runs == {"teacher": 2 * len(batches), "student": 2 * len(batches)}


def test_a_layer_that_already_is_block_diagonal_is_left_as_it_is():
    teacher, batches = mlp(), correlated_inputs()
    student = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights")
    masked_teacher = mpd.unpack(mpd.pack(student))  # the masked weights as a dense model
    before = [p.clone() for p in student.parameters()]
    refit_(student, masked_teacher, batches, damping=1e-10)
    for p, q in zip(student.parameters(), before):
        assert torch.allclose(p, q, atol=1e-4)


def test_compress_calibrated_leaves_the_model_alone_and_beats_weight_masks_alone():
    teacher, batches = mlp(), correlated_inputs()
    state = copy.deepcopy(teacher.state_dict())
    student = compress_calibrated(teacher, 4, batches)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, state[key])
    assert student.mpd_config.masks == "weights"
    plain = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights")
    held_out = correlated_inputs(seed=9)
    assert relative_error(student, teacher, held_out) < relative_error(plain, teacher, held_out)
    joint = compress_calibrated(teacher, 4, batches, masks="weights-joint")
    assert torch.equal(joint[0].row_order, joint[2].col_order)  # one hidden grouping, no gather between


def test_calibration_requests_that_cannot_work_are_refused():
    teacher, batches = mlp(), correlated_inputs()
    with pytest.raises(ConfigError, match="not an iterator"):
        input_moments(teacher, iter(batches))
    with pytest.raises(ConfigError, match="mode='masked'"):
        compress_calibrated(teacher, 4, batches, mode="compact")
    with pytest.raises(CompressionError, match="use masks='weights'"):
        mpd.mpdify_(copy.deepcopy(teacher), 4, input_moments=input_moments(teacher, batches))
    packed = mpd.pack(mpd.mpdify_(copy.deepcopy(teacher), 4))
    with pytest.raises(CompressionError, match="refit before pack"):
        refit_(packed, teacher, batches)
    with pytest.raises(CompressionError, match="teacher has no layer"):
        refit_(mpd.mpdify_(copy.deepcopy(teacher), 4), nn.Sequential(nn.Linear(24, 32)), batches)
    unused = nn.ModuleDict({"used": nn.Linear(24, 8), "unused": nn.Linear(24, 8)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(CompressionError, match="never reach"):
        input_moments(unused, batches)


class Repeated(nn.Module):
    """One square layer applied ``times`` times: a student and teacher that disagree on how often."""

    def __init__(self, times):
        super().__init__()
        self.layer, self.times = nn.Linear(24, 24), times

    def forward(self, x):
        for _ in range(self.times):
            x = self.layer(x)
        return x


@pytest.mark.parametrize(
    "student_times, teacher_times, message",
    [(2, 1, "more often than the teacher's"), (1, 2, "more often in the teacher")],
)
def test_refit_refuses_a_teacher_whose_layers_run_another_number_of_times(student_times, teacher_times, message):
    torch.manual_seed(0)
    teacher = Repeated(teacher_times)
    student = mpd.mpdify_(Repeated(student_times), 2)
    with pytest.raises(CompressionError, match=message):
        refit_(student, teacher, correlated_inputs())


def test_transformers_encoder_and_gpt2_conv1d_are_refitted():
    transformers = pytest.importorskip("transformers")
    from mpdcompress.core.roles import select_roles

    ids = [torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=97, n_layer=2, n_embd=32, n_head=2, bos_token_id=0, eos_token_id=0)
    ).eval()
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    ).eval()
    for teacher, key in ((gpt2, "logits"), (bert, "last_hidden_state")):
        batches = [{"input_ids": x} for x in ids]
        plain = mpd.mpdify_(copy.deepcopy(teacher), 4, filter_fn=select_roles("mlp"), masks="weights")
        student = compress_calibrated(teacher, 4, batches, filter_fn=select_roles("mlp"))
        with torch.no_grad():
            target = teacher(**batches[0])[key]
            before = (plain(**batches[0])[key] - target).square().mean()
            after = (student(**batches[0])[key] - target).square().mean()
        assert after < before
