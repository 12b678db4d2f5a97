"""Words of a prompt and the text-token positions (key columns) that make them up.

A prompt is recorded once per generation with the pipeline's tokenizer: its token strings
and its words, each word the consecutive sub-tokens ending in CLIP's end-of-word mark
``</w>`` (or, for SentencePiece-style tokenizers, starting at ``▁``). Looking up a word
of the prompt then needs no tokenizer, so a saved trace answers such queries on its own;
DAAM's lookup of a word inside longer words needs the tokenizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

END_OF_WORD = "</w>"
MATCHES = ("tokens", "words")  # how positions() finds a word: DAAM's token runs, or whole words
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

    def positions(self, word: str, occurrence: Optional[int] = 0, tokenizer=None,
                  match: str = "words") -> List[int]:
        """Key columns of ``word`` (one or more words) in this prompt.

        ``match="words"``: a run of whole words. ``match="tokens"`` (DAAM's
        compute_token_merge_indices): the word's tokens, end-of-word marks removed, as a run
        anywhere in the prompt's tokens (so also the part of a longer word made of those
        tokens). ``occurrence``: the index of one appearance (0 = first), or None for the
        columns of every appearance (DAAM).
        """
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"word: expected a non-empty string, got {word!r}")
        if match == "tokens":
            spans = self._token_spans(word, tokenizer)
        elif match == "words":
            spans = self._word_spans(word, tokenizer)
        else:
            raise ValueError(f"match: expected one of {MATCHES}, got {match!r}")
        if not spans:
            texts = [text for text, _ in self.words]
            cut = (f"; the prompt was cut to {len(self.tokens)} tokens by the text encoder's limit"
                   if self.truncated else "")
            raise ValueError(f"word: {word!r} is not in the prompt {self.prompt!r} "
                             f"(its words: {', '.join(texts)}{cut})")
        if occurrence is None:
            return [p for span in spans for p in span]
        if not 0 <= occurrence < len(spans):
            raise ValueError(f"occurrence: {word!r} appears {len(spans)} time(s) in the prompt, "
                             f"got occurrence={occurrence}")
        return spans[occurrence]

    def _word_spans(self, word: str, tokenizer) -> List[List[int]]:
        query = query_words(word, tokenizer)
        texts = [text for text, _ in self.words]
        starts = [i for i in range(len(texts) - len(query) + 1) if texts[i:i + len(query)] == query]
        return [[p for _, pos in self.words[i:i + len(query)] for p in pos] for i in starts]

    def _token_spans(self, word: str, tokenizer) -> List[List[int]]:
        query = self._query_tokens(word, tokenizer)
        if not query:  # nothing the tokenizer keeps (an empty run would match everywhere)
            return []
        columns = [p for _, pos in self.words for p in pos]
        body = [_bare(self.tokens[p]) for p in columns]
        n = len(query)
        return [columns[i:i + n] for i in range(len(body) - n + 1) if body[i:i + n] == query]

    def _query_tokens(self, word: str, tokenizer) -> List[str]:
        if tokenizer is not None:
            return [_bare(t) for t in tokenizer.tokenize(word.lower())]
        # A saved trace without its tokenizer: CLIP's BPE splits each word on its own, so a
        # word of the prompt has the same tokens wherever it appears; others are unknown.
        known = {}
        for text, pos in self.words:
            known.setdefault(text, pos)
        parts = query_words(word)
        missing = [p for p in parts if p not in known]
        if missing:
            raise ValueError(f"word: {missing} are not whole words of the prompt {self.prompt!r}; "
                             "finding their tokens inside longer words needs the tokenizer: load the "
                             "trace with TraceMaps.load(path, tokenizer=pipe.tokenizer)")
        return [_bare(self.tokens[p]) for part in parts for p in known[part]]


def _bare(token: str) -> str:
    """A token without CLIP's end-of-word mark (DAAM compares tokens so)."""
    return token.replace(END_OF_WORD, "")


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


def tokenizer_limit(tokenizer) -> Optional[int]:
    """The tokenizer's own length limit (CLIP's 77), or None where it has none: a tokenizer
    saved without ``model_max_length`` (common for T5, umT5, Gemma) reports transformers'
    sentinel 1e30, which is no length (and overflows the fast tokenizers' ints)."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    limit = tokenizer.model_max_length
    return None if limit is None or limit >= VERY_LARGE_INTEGER else int(limit)


def record_prompt(tokenizer, prompt: str, max_length: Optional[int] = None) -> PromptText:
    """Tokenise ``prompt`` as the pipeline does: cut to ``max_length`` tokens, the length
    the pipeline's text encoder got (PixArt, Sana, Wan, Flux's and SD3's T5: the call's
    ``max_sequence_length``). None: the tokenizer's own limit (what SD pipelines cut CLIP
    prompts to), or no cut where it has none (a word looked up on its own)."""
    length = max_length if max_length is not None else tokenizer_limit(tokenizer)
    ids = tokenizer(prompt, truncation=length is not None, max_length=length).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    body = [i for i, tok in enumerate(tokens) if tok not in special]
    words = tuple((_join(tokenizer, [tokens[body[j]] for j in group]), tuple(body[j] for j in group))
                  for group in group_words([tokens[i] for i in body]))
    return PromptText(prompt, tuple(tokens), words, truncated=len(tokenizer.tokenize(prompt)) > len(body))


def check_words(tokenizer, prompt: str, words: Sequence[str], max_length: Optional[int] = None) -> None:
    """Raise ValueError (as a heat map's ``word`` would) unless every one of ``words`` is
    found in ``prompt`` cut to ``max_length`` tokens (see record_prompt): for checks before
    any generation."""
    text = record_prompt(tokenizer, prompt, max_length)
    for word in words:
        text.positions(word, None, tokenizer, "tokens")


def record_after_instruction(tokenizer, prompt: str, instruction: Sequence[str], length: int) -> PromptText:
    """A prompt tokenised as SanaPipeline does with a ``complex_human_instruction``: the
    instruction lines joined by newlines, then the prompt, cut or padded to the
    instruction's token count + ``length`` − 2, of which the text encoder's output keeps
    token 0 and the last ``length`` − 1. The prompt's tokens are the kept ones whose
    characters lie after the instruction (the tokenizer's offset mapping)."""
    chi = "\n".join(instruction)
    total = len(tokenizer.encode(chi)) + length - 2
    encoded = tokenizer(chi + prompt, max_length=total, truncation=True, padding="max_length",
                        return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    kept = [0] + list(range(total - length + 1, total))
    special = set(tokenizer.all_special_ids)
    body = [c for c, i in enumerate(kept) if ids[i] not in special and offsets[i][1] > len(chi)]
    tokens = tokenizer.convert_ids_to_tokens([ids[i] for i in kept])
    end = body[-1] + 1 if body else 1
    if end < len(kept) and ids[kept[end]] in special and ids[kept[end]] != tokenizer.pad_token_id:
        end += 1                                   # the end token after the prompt, as record_prompt keeps it
    words = tuple((_join(tokenizer, [tokens[body[j]] for j in group]), tuple(body[j] for j in group))
                  for group in group_words([tokens[c] for c in body]))
    return PromptText(prompt, tuple(tokens[:end]), words, truncated=len(tokenizer.tokenize(prompt)) > len(body))


def query_words(word: str, tokenizer=None) -> List[str]:
    """The words of a query, normalised as prompt words are (through the tokenizer when
    given, else by CLIP's lower-casing and split)."""
    if tokenizer is not None:
        tokens = tokenizer.tokenize(word)
        return [_join(tokenizer, [tokens[j] for j in group]) for group in group_words(tokens)]
    return _CLIP_SPLIT.findall(word.lower())
