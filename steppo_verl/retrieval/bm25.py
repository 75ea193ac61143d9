"""A BM25 index over a passage corpus, built with ``bm25s`` and saved to / loaded from a directory.

Tokenization (lower-casing, bm25s's English stopword list, Snowball stemming via PyStemmer) is recorded
next to the index so that a loaded index tokenizes queries exactly as its corpus was tokenized.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from .corpus import Hit, Passage, load_corpus, write_corpus

_SETTINGS_FILE = "steppo_index.json"
_PASSAGES_FILE = "passages.jsonl"
# Bumped whenever the on-disk layout changes, so an old directory is reported instead of misread.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TokenizerSettings:
    """How text is split into terms; ``stemmer_language=None`` disables stemming."""

    stopwords: str = "en"
    stemmer_language: str | None = "english"


class BM25Index:
    """Lexical search over passages. Create it with :meth:`build` or :meth:`load`."""

    def __init__(self, retriever: bm25s.BM25, passages: list[Passage], settings: TokenizerSettings) -> None:
        self._retriever = retriever
        self._passages = passages
        self._settings = settings
        self._per_thread = threading.local()
        self._stemmer()  # an unknown stemmer language fails here rather than at the first search

    def __len__(self) -> int:
        return len(self._passages)

    @classmethod
    def build(
        cls, corpus: list[Passage], settings: TokenizerSettings | None = None, progress: bool = True
    ) -> BM25Index:
        """Tokenize and index ``corpus``; ``progress`` shows bm25s's tqdm bars."""
        if not corpus:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        index = cls(bm25s.BM25(), list(corpus), settings or TokenizerSettings())
        index._retriever.index(index._tokenize([p.contents for p in corpus], progress), show_progress=progress)
        return index

    @staticmethod
    def is_saved(directory: str | Path) -> bool:
        """Whether ``directory`` holds a completely saved index."""
        return (Path(directory) / _SETTINGS_FILE).is_file()

    def save(self, directory: str | Path) -> None:
        """Write the index, its passages and its tokenizer settings to ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(directory, show_progress=False)
        write_corpus(self._passages, directory / _PASSAGES_FILE)
        # Written last: its presence marks the directory as a complete index (see is_saved).
        record = {"format": _FORMAT_VERSION, "num_passages": len(self._passages), **asdict(self._settings)}
        (directory / _SETTINGS_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        """Load an index saved by :meth:`save`, without re-tokenizing or re-indexing the corpus."""
        directory = Path(directory)
        if not cls.is_saved(directory):
            raise FileNotFoundError(f"{directory} holds no saved BM25 index ({_SETTINGS_FILE} is missing)")
        record = json.loads((directory / _SETTINGS_FILE).read_text(encoding="utf-8"))
        if record.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: index format {record.get('format')!r}, expected {_FORMAT_VERSION}")
        passages = load_corpus(directory / _PASSAGES_FILE)
        if len(passages) != record["num_passages"]:
            raise ValueError(f"{directory}: {len(passages)} passages on disk, index expects {record['num_passages']}")
        settings = TokenizerSettings(stopwords=record["stopwords"], stemmer_language=record["stemmer_language"])
        retriever = bm25s.BM25.load(directory, show_progress=False)
        # bm25s ranks document positions; positions beyond the passage list would fail at search time instead.
        indexed = retriever.scores["num_docs"]
        if indexed != len(passages):
            raise ValueError(
                f"{directory}: the BM25 index covers {indexed} documents but {len(passages)} passages are saved "
                "with it; rebuild the index from its corpus"
            )
        return cls(retriever, passages, settings)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Best passages for each query, highest score first, at most ``min(topk, len(self))`` each.

        Passages sharing no term with a query score zero and are not hits, so a query that is empty (or
        only stopwords, or only unknown words) gets an empty list.
        """
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        query_terms = self._tokenize(queries, progress=False)
        answerable = [i for i, terms in enumerate(query_terms) if terms]
        results: list[list[Hit]] = [[] for _ in queries]
        if not answerable:
            return results
        # One bm25s call for the whole batch; k must not exceed the corpus size or bm25s refuses.
        doc_indices, scores = self._retriever.retrieve(
            [query_terms[i] for i in answerable], k=min(topk, len(self)), show_progress=False
        )
        for row, query_position in enumerate(answerable):
            results[query_position] = self._hits(doc_indices[row], scores[row])
        return results

    def _hits(self, doc_indices: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """Hits for one query's ranked row, leaving out passages that matched no query term."""
        return [
            Hit(contents=self._passages[i].contents, score=float(score), id=self._passages[i].id)
            for i, score in zip(doc_indices.tolist(), scores.tolist(), strict=True)
            if score > 0
        ]

    def _stemmer(self) -> Stemmer.Stemmer | None:
        """This thread's stemmer: PyStemmer objects keep internal state and must not be shared between threads."""
        if self._settings.stemmer_language is None:
            return None
        if not hasattr(self._per_thread, "stemmer"):
            self._per_thread.stemmer = Stemmer.Stemmer(self._settings.stemmer_language)
        return self._per_thread.stemmer

    def _tokenize(self, texts: list[str], progress: bool) -> list[list[str]]:
        """Terms of each text; returned as strings so queries map onto the corpus vocabulary by name."""
        return bm25s.tokenize(
            texts,
            stopwords=self._settings.stopwords,
            stemmer=self._stemmer(),
            return_ids=False,
            show_progress=progress,
        )
