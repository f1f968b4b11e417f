"""Real English text from Debian packages, for distilling and evaluating sentence encoders.

``wordnet``: the glosses (definitions and examples) of WordNet 3.0 (package ``wordnet``, about
117k sentences). ``fortunes``: the ``fortune`` cookies (package ``fortunes``, about 14k
quotations). Both are read in a fixed order, so a split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataUnavailableError, UnknownNameError

__all__ = ["TextCorpus", "CORPORA", "corpus", "load_corpus", "held_out_split", "interleave", "sample_sentences"]


def _wordnet(folder: Path) -> list[str]:
    sentences = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(folder / f"data.{part}", encoding="utf-8", errors="replace") as f:
            for line in f:
                # Lines that start with spaces are the licence header; the gloss follows " | ".
                if line.startswith("  ") or " | " not in line:
                    continue
                sentences.append(line.split(" | ", 1)[1].strip())
    return sentences


def _fortunes(folder: Path) -> list[str]:
    sentences = []
    for path in sorted(folder.iterdir()):
        # Each collection is a plain file; .dat (index) and .u8 (links) sit beside it.
        if not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for cookie in text.split("\n%\n"):
            cookie = re.sub(r"\s+", " ", cookie.strip("% \n"))
            if 20 <= len(cookie) <= 400:
                sentences.append(cookie)
    return sentences


def _licenses(folder: Path) -> list[str]:
    sentences = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.is_symlink():  # GPL -> GPL-3 and the like: read once
            continue
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace"))
        # Sentence ends: a full stop, question or exclamation mark before a capital or a quote.
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text):
            # A section number that the split left at either end ("... Code. 4." / "2. The ...").
            sentence = re.sub(r"^(\d+|[a-z])[.)] |\s+\d+\.$", "", sentence.strip())
            # Prose, not headings, section numbers or lists of names.
            if 4 <= len(sentence.split()) <= 60 and sentence[-1] in ".!?" and sentence.lstrip("\"'(")[:1].isupper():
                sentences.append(sentence)
    return sentences


@dataclass(frozen=True)
class TextCorpus:
    """A corpus of English text that a Debian package installs, and how to read it into sentences."""

    name: str
    folder: Path  # where its Debian package installs it
    marker: str  # a file that shows it is installed
    package: str
    reader: Callable[[Path], list[str]]
    description: str

    def locate(self, root: str | os.PathLike | None = None) -> tuple[Path, bool]:
        folder = Path(root) if root else self.folder
        return folder, (folder / self.marker).exists()

    def load(self, root: str | os.PathLike | None = None) -> list[str]:
        """The corpus's sentences, unique, in file order."""
        folder, present = self.locate(root)
        if not present:
            raise DataUnavailableError(
                f"{self.name} text not found at {folder} (no {self.marker}); install it with "
                f"`apt-get install {self.package}`, or pass the folder that holds it"
            )
        return list(dict.fromkeys(s for s in self.reader(folder) if s))


CORPORA: dict[str, TextCorpus] = {
    c.name: c
    for c in (
        TextCorpus(
            "wordnet",
            Path("/usr/share/wordnet"),
            "data.noun",
            "wordnet",
            _wordnet,
            "WordNet 3.0 glosses (definitions and usage examples)",
        ),
        TextCorpus(
            "fortunes",
            Path("/usr/share/games/fortunes"),
            "fortunes",
            "fortunes",
            _fortunes,
            "fortune(6) quotations",
        ),
        TextCorpus(
            "licenses",
            Path("/usr/share/common-licenses"),
            "GPL-3",
            "base-files",
            _licenses,
            "the software licences every Debian system ships (GPL, Apache, MPL, ...): legal prose",
        ),
    )
}


def corpus(name: str) -> TextCorpus:
    """The registered text corpus called ``name`` (``wordnet``, ``fortunes``, ``licenses``)."""
    if name not in CORPORA:
        raise UnknownNameError(f"unknown text corpus {name!r}; choose from {', '.join(CORPORA)}")
    return CORPORA[name]


def load_corpus(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """The sentences of corpus ``name``, read from ``root`` or where its package installs it."""
    return corpus(name).load(root)


def held_out_split(sentences: list[str], held_out: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each sentence: stable when the corpus grows or is reordered."""
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must be a fraction between 0 and 1, got {held_out!r}")
    train, test = [], []
    for s in sentences:
        h = int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little") / 2**32
        (test if h < held_out else train).append(s)
    return train, test


def interleave(parts: list[list[str]]) -> list[str]:
    """The sentences of ``parts`` taken in turn (one of each, then the next of each, ...), the
    shorter parts repeated until the longest runs out: every source weighs alike in any stretch,
    whatever its size (a 1,000-sentence corpus beside WordNet's 100,000 glosses would otherwise
    make 1 % of the batches)."""
    parts = [part for part in parts if part]
    longest = max(map(len, parts), default=0)
    return [part[i % len(part)] for i in range(longest) for part in parts]


def sample_sentences(sentences: list[str], n: int) -> list[str]:
    """``n`` sentences spread over the whole corpus, chosen by a hash of each sentence (the same on
    every machine), for evaluating on a corpus nothing was trained on."""
    return sorted(sentences, key=lambda s: hashlib.sha256(s.encode()).digest())[:n]
