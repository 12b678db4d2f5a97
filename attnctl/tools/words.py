"""Words of a prompt and the text-token positions (key columns) that make them up.

A prompt is recorded once per generation with the pipeline's tokenizer: its token strings
and its words, each word the consecutive sub-tokens ending in CLIP's end-of-word mark
``</w>`` (or, for SentencePiece-style tokenizers, starting at ``▁``). Looking a word up
then needs no tokenizer, so a saved trace answers word queries on its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

END_OF_WORD = "</w>"
WORD_START = "▁"
# CLIP's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs.
_CLIP_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


@dataclass(frozen=True)
class PromptText:
    """A prompt as the text encoder saw it.

    ``tokens``: token strings of the key columns, from BOS to EOS (padding left out).
    ``words``: (text, positions) per word, positions being key-column indices.
    ``truncated``: the prompt was longer than the text encoder's limit and was cut.
    """

    prompt: str
    tokens: Tuple[str, ...]
    words: Tuple[Tuple[str, Tuple[int, ...]], ...]
    truncated: bool = False

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "tokens": list(self.tokens), "truncated": self.truncated,
                "words": [[text, list(pos)] for text, pos in self.words]}

    @classmethod
    def from_json(cls, d: dict) -> "PromptText":
        return cls(d["prompt"], tuple(d["tokens"]), tuple((t, tuple(p)) for t, p in d["words"]),
                   d["truncated"])

    def positions(self, word: str, occurrence: int = 0, tokenizer=None) -> List[int]:
        """Key columns of the ``occurrence``-th appearance (0 = first) of ``word`` (one or
        more words) in this prompt."""
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"word: expected a non-empty string, got {word!r}")
        query = query_words(word, tokenizer)
        texts = [text for text, _ in self.words]
        starts = [i for i in range(len(texts) - len(query) + 1) if texts[i:i + len(query)] == query]
        if not starts:
            cut = (f"; the prompt was cut to {len(self.tokens)} tokens by the text encoder's limit"
                   if self.truncated else "")
            raise ValueError(f"word: {word!r} is not in the prompt {self.prompt!r} "
                             f"(its words: {', '.join(texts)}{cut})")
        if not 0 <= occurrence < len(starts):
            raise ValueError(f"occurrence: {word!r} appears {len(starts)} time(s) in the prompt, "
                             f"got occurrence={occurrence}")
        first = starts[occurrence]
        return [p for _, pos in self.words[first:first + len(query)] for p in pos]


def _join(tokenizer, tokens: Sequence[str]) -> str:
    text = tokenizer.convert_tokens_to_string(list(tokens))
    return text.replace(END_OF_WORD, " ").replace(WORD_START, " ").strip().lower()


def group_words(tokens: Sequence[str]) -> List[List[int]]:
    """Indices into ``tokens`` grouped into words."""
    groups: List[List[int]] = []
    current: List[int] = []
    for i, tok in enumerate(tokens):
        if tok.startswith(WORD_START) and current:
            groups.append(current)
            current = []
        current.append(i)
        if tok.endswith(END_OF_WORD):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def record_prompt(tokenizer, prompt: str, max_length: Optional[int] = None) -> PromptText:
    """Tokenise ``prompt`` as the pipeline does (truncated to the encoder's length)."""
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=length).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    body = [i for i, tok in enumerate(tokens) if tok not in special]
    words = tuple((_join(tokenizer, [tokens[body[j]] for j in group]), tuple(body[j] for j in group))
                  for group in group_words([tokens[i] for i in body]))
    return PromptText(prompt, tuple(tokens), words, truncated=len(tokenizer.tokenize(prompt)) > len(body))


def query_words(word: str, tokenizer=None) -> List[str]:
    """The words of a query, normalised as prompt words are (through the tokenizer when
    given, else by CLIP's lower-casing and split)."""
    if tokenizer is not None:
        tokens = tokenizer.tokenize(word)
        return [_join(tokenizer, [tokens[j] for j in group]) for group in group_words(tokens)]
    return _CLIP_SPLIT.findall(word.lower())
