"""Text -> token ids under a token limit, with time and memory bounded before the limit check.

Tokenising a text costs time and memory in proportion to its length (a 10 MB text is millions
of tokens, each with its string, offsets and masks inside the tokenizer), so the token limit
must be enforced before the whole text is tokenised, not after:

1. **Length bound, no tokenising.** A token covers at most ``max_token_chars`` characters of
   the input, the longest entry of the tokenizer's vocabulary (added and special tokens
   included; computed once, at start-up). A text of ``c`` characters therefore has at least
   ``ceil(c / max_token_chars)`` tokens, and a text longer than
   ``max_tokens * max_token_chars`` characters is refused at once. (For tokenizers whose
   normaliser deletes characters the bound is not a proof, only a limit on text length in its
   own right; the vocabularies of byte-level BPE and SentencePiece tokenizers satisfy it.)
2. **Counting in pieces.** A text longer than ``piece_chars`` is first tokenised piece by piece
   (one piece in memory at a time), counting tokens; once the count is past the limit by more
   than what the cuts between pieces can account for (``cut_slack`` tokens per cut), the text
   is refused without tokenising the rest.
3. **The real tokenisation** runs on the whole text (cuts could change the tokens next to them)
   and is checked exactly; by then the text is known to hold about ``max_tokens`` tokens at
   most, so its cost is bounded too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hsae_runtime.errors import InputError

log = logging.getLogger(__name__)

PIECE_CHARS = 16384
"""Characters per piece when counting the tokens of a long text."""


def longest_token_chars(tokenizer: Any) -> int | None:
    """Characters in the longest vocabulary entry of ``tokenizer`` (``None`` if it has no vocab).

    Entries are counted as stored: a byte-level BPE entry has one character per byte it covers,
    a SentencePiece entry one per character (``▁`` stands for a space), and byte-fallback
    entries such as ``<0xE4>`` are longer than the one byte they cover, so the count is an
    upper bound on what one token covers.
    """
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if not vocab:
        return None
    return max(len(entry) for entry in vocab)


@dataclass(frozen=True)
class BoundedTokeniser:
    """Tokenises request text for the server, refusing texts over ``max_tokens`` early."""

    tokenizer: Any
    """A Hugging Face tokenizer: ``tokenizer(text, add_special_tokens=...)["input_ids"]``."""
    max_tokens: int
    """Most tokens (special tokens included) a text may have."""
    max_token_chars: int | None
    """Longest vocabulary entry in characters (:func:`longest_token_chars`); ``None`` skips
    the length bound."""
    piece_chars: int = PIECE_CHARS
    """Texts longer than this are counted piece by piece before the real tokenisation."""

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_tokens: int) -> BoundedTokeniser:
        longest = longest_token_chars(tokenizer)
        if longest is None:
            log.warning("the tokenizer exposes no vocabulary: long texts are counted in pieces")
        return cls(tokenizer, max_tokens, longest)

    @property
    def max_chars(self) -> int | None:
        """Longest text (in characters) that can fit in ``max_tokens`` tokens."""
        if self.max_token_chars is None:
            return None
        return self.max_tokens * self.max_token_chars

    @property
    def cut_slack(self) -> int:
        """Tokens by which one cut between pieces may change the count (generous: a cut only
        changes the tokens next to it, each at most ``max_token_chars`` long)."""
        return 2 * max(self.max_token_chars or 0, 8)

    def __call__(self, text: str) -> list[int]:
        """The token ids of ``text`` with the tokenizer's special tokens (e.g. BOS) added."""
        max_chars = self.max_chars
        if max_chars is not None and len(text) > max_chars:
            raise self._too_long(
                f"text too long: {len(text)} characters, more than the {max_chars} that "
                f"{self.max_tokens} tokens of this tokenizer can cover (its longest token has "
                f"{self.max_token_chars} characters)"
            )
        if len(text) > self.piece_chars:
            self._count_in_pieces(text)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(ids) > self.max_tokens:
            raise self._too_long(f"too many tokens: {len(ids)}")
        return ids

    def _count_in_pieces(self, text: str) -> None:
        count = 0
        for cuts, start in enumerate(range(0, len(text), self.piece_chars), start=1):
            piece = text[start : start + self.piece_chars]
            count += len(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
            # ``cuts`` counts the cut after this piece too: the rest could merge across it.
            if count > self.max_tokens + cuts * self.cut_slack:
                raise self._too_long(
                    f"too many tokens: the first {start + len(piece)} of {len(text)} characters "
                    f"already hold about {count} tokens"
                )

    def _too_long(self, message: str) -> InputError:
        return InputError(
            f"{message}; max_request_tokens={self.max_tokens}",
            hint="split the text over several requests (or EncodeStream)",
        )


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each of ``ids`` decoded on its own: the strings a response shows next to the tokens.

    A fast tokenizer's Rust backend decodes the whole list in one call that releases the GIL.
    ``batch_decode`` gives the same strings but converts every id in a Python loop while
    holding the GIL, which for a request of thousands of tokens stalled the server's other
    threads (health checks included) for hundreds of milliseconds. It is kept as the fallback
    for slow tokenizers and for those whose decoding cleans up spaces afterwards.
    """
    pieces = [[i] for i in ids]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return list(backend.decode_batch(pieces, skip_special_tokens=False))
    return list(tokenizer.batch_decode(pieces))
