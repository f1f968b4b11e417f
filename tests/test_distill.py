"""Distillation (loss, schedule, checkpoints and resume), the text corpora, sentence-encoder
agreement metrics, the pretrained study and `mpdcompress distill`, on tiny random models and
small files in the corpora's real formats."""

import copy
import json

import pytest
import torch
from torch import nn

import mpdcompress as mpd
from mpdcompress.cli.main import main
from mpdcompress.core.roles import select_roles
from mpdcompress.data.text import corpus, held_out_split
from mpdcompress.errors import CheckpointError, ConfigError, DataUnavailableError
from mpdcompress.experiments.pretrained import PretrainedProfile, magnitude_prune_, run_pretrained_study
from mpdcompress.files.hf import load_compressed
from mpdcompress.posthoc.distill import DistillConfig, distill, distillation_loss
from mpdcompress.posthoc.sentence import embed, length_batches, neighbour_agreement

WORDS = "the a cat dog sat ran on under mat tree house red big small quick slow bird sang loud soft".split()


def sentences(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (3 + k % 9,), generator=g)) for k in range(n)]


def mlp_pair(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    student = mpd.mpdify_(copy.deepcopy(teacher), 4, masks="weights")
    return teacher, student


def batches(n=64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


def test_distillation_brings_the_student_closer_to_the_teacher():
    teacher, student = mlp_pair()
    x = torch.randn(256, 16)
    with torch.no_grad():
        before = float(distillation_loss(student(x), teacher(x)))
    result = distill(student, teacher, batches(), DistillConfig(steps=150, lr=3e-3))
    with torch.no_grad():
        after = float(distillation_loss(student(x), teacher(x)))
    assert after < 0.5 * before
    assert len(result.history) == 150 and not student.training
    assert float((student[0].weight * ~student[0].mask).abs().max()) == 0.0  # still the masked model


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path):
    teacher, student = mlp_pair()
    config = DistillConfig(steps=40, lr=1e-3, checkpoint_every=15, dropout=True)
    whole = copy.deepcopy(student)
    distill(whole, teacher, batches(), config)
    # A run killed after step 30 (its last checkpoint), then resumed from a fresh student.
    ckpt = tmp_path / "distill.pt"
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, batches(), config, checkpoint=ckpt, progress=_stop_at(31))
    resumed = mlp_pair()[1]
    result = distill(resumed, teacher, batches(), config, checkpoint=ckpt, resume=True)
    assert [h["step"] for h in result.history] == list(range(1, 41))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _stop_at(step):
    def progress(event):
        if event["step"] == step:
            raise KeyboardInterrupt

    return progress


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    teacher, student = mlp_pair()
    ckpt = tmp_path / "d.pt"
    distill(student, teacher, batches(4), DistillConfig(steps=4), checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="lr differ"):
        distill(student, teacher, batches(4), DistillConfig(steps=4, lr=1.0), checkpoint=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        distill(student, teacher, batches(4), DistillConfig(steps=4), checkpoint=tmp_path / "no.pt", resume=True)


def test_logits_are_matched_by_kl_and_other_outputs_by_relative_mse():
    t = {"logits": torch.tensor([[2.0, 0.0, -1.0]]), "hidden": torch.full((2, 3), 10.0)}
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    s = {"logits": t["logits"], "hidden": torch.full((2, 3), 11.0)}
    assert float(distillation_loss(s, t)) == pytest.approx(0.5 * (1 / 100))  # mean of KL 0 and MSE 1/100
    with pytest.raises(ConfigError, match="differ in structure"):
        distillation_loss({"logits": t["logits"]}, t)
    ids = {"ids": torch.tensor([1, 2])}  # token ids, nothing to match: said, not a raw torch error
    with pytest.raises(ConfigError, match=r"no floating-point output to match among \['ids'\]"):
        distillation_loss(ids, ids)


def test_a_classifiers_plain_output_is_matched_by_kl_when_named_as_logits():
    s, t = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, -1.0]])
    tau = 2.0
    kl = torch.nn.functional.kl_div(
        (s / tau).log_softmax(-1), (t / tau).log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert float(distillation_loss(s, t, tau, logits=("output",))) == pytest.approx(float(kl) * tau * tau)
    assert float(distillation_loss(s, t, tau)) == pytest.approx(float((s - t).square().mean() / t.square().mean()))
    # distill's default loss takes the names from its configuration.
    teacher, student = mlp_pair()
    x = batches(1)
    with torch.no_grad():
        expected = float(distillation_loss(student(x[0]), teacher(x[0]), 2.0, logits=("output",)))
    result = distill(student, teacher, x, DistillConfig(steps=1, logits=("output",)))
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="tuple of output names"):
        DistillConfig(steps=1, logits="output")
    assert DistillConfig(steps=1, logits=["output"]).logits == ("output",)


def test_distill_refuses_what_cannot_work():
    teacher, student = mlp_pair()
    with pytest.raises(ConfigError, match="separate"):
        distill(teacher, teacher, batches(), DistillConfig(steps=1))
    with pytest.raises(ConfigError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="no batches"):
        distill(student, teacher, [], DistillConfig(steps=1))


def test_batches_from_a_dataloader_cycle_and_skip_on_resume(tmp_path):
    teacher, student = mlp_pair()
    loader = torch.utils.data.DataLoader(torch.randn(48, 16), batch_size=16)  # 3 batches
    with torch.no_grad():
        sums = [float(teacher(b).sum()) for b in loader]
    config = DistillConfig(steps=5, checkpoint_every=3)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        distill(
            student,
            teacher,
            loader,
            config,
            loss_fn=_recording(seen),
            checkpoint=tmp_path / "c.pt",
            progress=_stop_at(4),
        )
    distill(student, teacher, loader, config, loss_fn=_recording(seen), checkpoint=tmp_path / "c.pt", resume=True)
    # Steps 1-4, then steps 4-5 again after resuming from the checkpoint of step 3.
    assert seen == pytest.approx([sums[i % 3] for i in (0, 1, 2, 0, 0, 1)])


def _recording(seen):
    def loss(student_out, teacher_out):
        seen.append(float(teacher_out.sum()))
        return (student_out - teacher_out).square().mean()

    return loss


def test_neighbour_agreement_is_perfect_for_the_teacher_and_low_for_noise():
    emb = torch.randn(200, 16)
    assert neighbour_agreement(emb, emb) == {"cosine": pytest.approx(1.0), "recall@10": 1.0}
    noise = neighbour_agreement(torch.randn(200, 16), emb)
    assert noise["recall@10"] < 0.2 and abs(noise["cosine"]) < 0.1


def test_magnitude_pruning_keeps_the_largest_weights_at_the_density():
    layer = nn.Sequential(nn.Linear(40, 20))
    original = layer[0].weight.detach().clone()
    magnitude_prune_(layer, 0.25, lambda m, n: True)
    kept = layer[0].weight != 0
    assert int(kept.sum()) == 200
    assert original.abs()[kept].min() >= original.abs()[~kept].max()


# --- text corpora in their Debian formats -----------------------------------------------------


def write_wordnet(folder, glosses):
    folder.mkdir(parents=True)
    licence = "  1 This software and database is being provided to you, the LICENSEE, by\n"
    for part in ("noun", "verb", "adj", "adv"):
        lines = [f"0000{i:04d} 03 n 01 word 0 000 | {g}\n" for i, g in enumerate(glosses) if hash(part) or True]
        (folder / f"data.{part}").write_text(licence + ("".join(lines) if part == "noun" else ""))


def test_wordnet_glosses_are_read_without_the_licence_header(tmp_path):
    write_wordnet(tmp_path / "wn", ["a small dog", "a big cat; `the cat sat'"])
    assert corpus("wordnet").load(tmp_path / "wn") == ["a small dog", "a big cat; `the cat sat'"]


def test_licences_are_split_into_prose_sentences(tmp_path):
    folder = tmp_path / "licenses"
    folder.mkdir()
    (folder / "GPL-3").write_text(
        'GNU GENERAL PUBLIC LICENSE\n  Version 3\n\n 0. Definitions. "This License" refers to version 3\n'
        "of the GNU General Public License. You may convey verbatim copies of the Program. 4.\nA short one."
    )
    (folder / "GPL").symlink_to(folder / "GPL-3")
    assert corpus("licenses").load(folder) == [
        '"This License" refers to version 3 of the GNU General Public License.',
        "You may convey verbatim copies of the Program.",
    ]


def test_fortunes_are_split_on_percent_lines(tmp_path):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "fortunes").write_text("A first saying, long enough.\n%\nA second\n  one, also long enough.\n%\n")
    (folder / "fortunes.dat").write_bytes(b"\x00\x01binary index")
    assert corpus("fortunes").load(folder) == ["A first saying, long enough.", "A second one, also long enough."]


def test_a_missing_corpus_says_how_to_install_it(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install wordnet"):
        corpus("wordnet").load(tmp_path)


def test_the_held_out_split_depends_on_each_sentence_only():
    text = sentences(400)
    train, test = held_out_split(text, 0.2)
    assert set(train) | set(test) == set(text) and not set(train) & set(test)
    assert held_out_split(list(reversed(text)), 0.2)[1] == list(reversed(test))


# --- a tiny sentence encoder in the pretrained model's file layout -----------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("tiny-minilm")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture
def tiny_encoder(encoder_dir):
    from mpdcompress.posthoc.sentence import load_sentence_encoder

    return load_sentence_encoder("all-minilm-l6-v2", encoder_dir)


def test_length_batches_hold_every_sentence_once_in_similar_lengths(tiny_encoder):
    _, tokenizer = tiny_encoder
    text = sentences(100)
    out = length_batches(tokenizer, text, 16, seed=0)
    assert sum(int(b["attention_mask"].sum()) for b in out) == sum(len(s.split()) + 2 for s in text)
    assert max(b["input_ids"].shape[1] - int(b["attention_mask"].sum(1).min()) for b in out) <= 2


def test_embeddings_are_in_sentence_order_and_unit_length(tiny_encoder):
    model, tokenizer = tiny_encoder
    text = sentences(50)
    emb = embed(model, tokenizer, text, batch_size=8)
    one = embed(model, tokenizer, [text[7]])
    torch.testing.assert_close(emb[7], one[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(50))


def test_the_pretrained_study_measures_every_row(tiny_encoder):
    model, tokenizer = tiny_encoder
    profile = PretrainedProfile(
        factors=(2, 4),
        eval_sentences=60,
        calibration=100,
        block_steps=20,
        distilled=(("weights", 4),),
        steps=30,
        lr=1e-3,
    )
    results = run_pretrained_study(model, tokenizer, sentences(300), sentences(60, seed=1), profile)
    rows = {(r["masks"], r["compression"]): r for r in results["rows"]}
    assert set(rows) == {(m, c) for m in ("random", "weights", "weights-joint", "calibrated") for c in (2, 4)}
    for c in (2, 4):  # the search keeps more of the weights than a random mask does
        assert rows["weights", c]["kept_mass_mean"] > rows["random", c]["kept_mass_mean"]
        # ...and calibration data (moments, refit, block tuning) brings the student closer still
        assert rows["calibrated", c]["before"]["cosine"] > rows["weights", c]["before"]["cosine"]
    distilled = rows["weights", 4]
    assert distilled["after"]["cosine"] > distilled["before"]["cosine"]
    assert [b["compression"] for b in results["baselines"]] == [2, 4]
    assert results["speed"][0]["file_vs_dense"] < 1.0
    from mpdcompress.experiments.pretrained import render_pretrained_report

    report = render_pretrained_report(results, "cmd", {"cpu": "test"})
    assert "At 4x, weight-chosen masks keep more of W² than random masks on 4 of 4 layers." in report
    assert "tuned together (20 Adam steps)" in report
    calibrated = rows["calibrated", 2]["before"]
    assert f"At 2x before distillation, calibrated MPD keeps cosine {calibrated['cosine']:.3f}" in report


def test_the_distill_command_writes_a_model_that_loads(encoder_dir, tmp_path, capsys):
    write_wordnet(tmp_path / "wn", sentences(200, seed=2))
    out = tmp_path / "student"
    argv = ["distill", "--model-dir", str(encoder_dir), "--corpus-dir", str(tmp_path / "wn"), "-c", "2"]
    argv += ["--steps", "6", "--eval-sentences", "20", "--checkpoint", str(tmp_path / "ck.pt"), "-o", str(out)]
    assert main([*argv, "--block-steps", "3", "--quiet"]) == 2  # tuning needs the calibration sentences
    assert "give --calibration as well" in capsys.readouterr().err
    assert main([*argv, "--calibration", "64", "--block-steps", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "compressed mlp layers at 2x (weights masks for 64 calibration sentences" in printed
    assert "tuned 3 steps per block" in printed
    assert "after 6 steps" in printed
    loaded = load_compressed(out)
    assert len(mpd.compressed_layers(loaded)) == 4
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    assert main([*argv, "--calibration", "64", "--resume", "--quiet"]) == 0  # at its last step: nothing to do
    assert "after 6 steps" in capsys.readouterr().out


def test_distill_with_no_steps_saves_the_calibrated_student_and_reports_every_source(encoder_dir, tmp_path, capsys):
    """The calibrated-only path (no budget for distillation), and agreement on text that nothing
    was calibrated on, reported per source."""
    write_wordnet(tmp_path / "wn", sentences(200, seed=2))
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "fortunes").write_text("\n%\n".join(s + " and some more words" for s in sentences(80, seed=3)))
    out = tmp_path / "student"
    argv = ["distill", "--model-dir", str(encoder_dir), "--corpus-dir", str(tmp_path / "wn"), "-c", "2"]
    argv += ["--calibration", "64", "--steps", "0", "--eval-sentences", "30", "-o", str(out)]
    assert main([*argv, "--eval-corpus", f"fortunes={fortunes}", "wordnet", "--quiet"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("compressed mlp layers"))
    assert "wordnet (held out): cosine" in line and "; fortunes: cosine" in line and line.count("recall@10") == 2
    assert "after" not in printed and "distilled" not in printed
    assert len(mpd.compressed_layers(load_compressed(out))) == 4


def test_distill_calibrates_and_distils_on_several_corpora_interleaved(encoder_dir, tmp_path, capsys):
    from mpdcompress.data.text import interleave

    assert interleave([["a1", "a2", "a3"], ["b1"], []]) == ["a1", "b1", "a2", "b1", "a3", "b1"]
    write_wordnet(tmp_path / "wn", sentences(200, seed=2))
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "fortunes").write_text("\n%\n".join(s + " and some more words" for s in sentences(300, seed=3)))
    argv = ["distill", "--model-dir", str(encoder_dir), "-c", "2", "--calibration", "64", "--steps", "2"]
    argv += ["--eval-sentences", "20", "-o", str(tmp_path / "student"), "--quiet"]
    corpora = ["--corpus", f"wordnet={tmp_path / 'wn'}", f"fortunes={fortunes}"]
    assert main([*argv, *corpora, "--eval-corpus", f"fortunes={fortunes}"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("after 2 steps"))
    assert "wordnet (held out): cosine" in line and "fortunes (held out): cosine" in line
    assert main([*argv, "--corpus", "wordnet", "fortunes", "--corpus-dir", str(tmp_path / "wn")]) == 2
    assert "give several as NAME=DIR" in capsys.readouterr().err
    assert main([*argv, "--corpus", "manpages"]) == 2
    assert "unknown corpus ['manpages']" in capsys.readouterr().err


def test_the_distill_command_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["distill", "--model-dir", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_select_roles_accepts_groups_and_roles():
    f = select_roles(["mlp_up"], "attention")
    assert f(None, "encoder.layer.0.intermediate.dense") and f(None, "encoder.layer.0.attention.self.key")
    assert not f(None, "encoder.layer.0.output.dense")


def test_the_posthoc_control_measures_every_budget(data_dir):
    from mpdcompress.experiments.posthoc import PosthocProfile, render_posthoc_report, run_posthoc_study

    profile = PosthocProfile(
        models=(("lenet300", 1, 1e-2),), budgets=(0, 3), train_limit=200, batch_size=50, calibration=500
    )
    results = run_posthoc_study(profile)
    (entry,) = results["models"]
    assert entry["epoch_steps"] == 4
    assert sorted((r["masks"], r["steps"]) for r in entry["rows"]) == sorted(
        (m, s) for m in ("random", "weights", "calibrated") for s in (0, 3, 4)
    )
    assert all(0 <= r["accuracy"] <= 1 for r in entry["rows"]) and 0 < entry["scratch_accuracy"] <= 1
    report = render_posthoc_report(results, "cmd")
    assert "| weights |" in report and "4 steps (1 epoch)" in report


def test_the_posthoc_control_with_compressed_convolutions_against_filter_pruning(data_dir):
    from mpdcompress.experiments.posthoc import PosthocProfile, render_posthoc_report, run_posthoc_study

    profile = PosthocProfile(
        models=(("deep-mnist", 1, 1e-3),),
        budgets=(0,),
        masks=("weights", "calibrated", "l1-filters"),
        train_limit=100,
        batch_size=50,
        calibration=100,
        compression=4,
        convs=True,
    )
    results = run_posthoc_study(profile)
    (entry,) = results["models"]
    sizes = entry["parameters"]
    assert abs(sizes["l1-filters"] / sizes["weights"] - 1) < 0.05  # the baseline at the MPD model's size
    assert {r["masks"] for r in entry["rows"]} == {"weights", "calibrated", "l1-filters"}
    report = render_posthoc_report(results, "cmd")
    assert "| l1-filters |" in report and "filter-pruned to the MPD model's parameter count" in report


def test_the_encoders_sequence_length_comes_from_its_sentence_bert_config(encoder_dir, tmp_path):
    import shutil

    from mpdcompress.errors import DataCorruptError
    from mpdcompress.posthoc.sentence import load_sentence_encoder

    folder = tmp_path / "model"
    shutil.copytree(encoder_dir, folder)
    _, tokenizer = load_sentence_encoder(model_dir=folder)
    assert tokenizer.truncation["max_length"] == 128  # the registry's default without the file
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 256, "do_lower_case": false}')
    _, tokenizer = load_sentence_encoder(model_dir=folder)
    assert tokenizer.truncation["max_length"] == 256
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": "long"}')
    with pytest.raises(DataCorruptError, match="max_seq_length"):
        load_sentence_encoder(model_dir=folder)
