"""The artifact's tokenizer and incremental (streaming) detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(art_dir: Path) -> Tokenizer | None:
    """``<art_dir>/tokenizer.json`` as a ``tokenizers.Tokenizer``, or None if the file is absent."""
    path = Path(art_dir) / TOKENIZER_FILE
    return Tokenizer.from_file(str(path)) if path.is_file() else None


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that are each complete UTF-8.

    A byte-level BPE token may hold part of a multi-byte character (an emoji is often two
    tokens); decoding it alone gives U+FFFD. ``push`` decodes the ids not yet shown together
    with the last shown piece as context and returns only the new text, or "" while the text
    ends in an incomplete character. ``flush`` returns whatever is left (an incomplete
    character then decodes to U+FFFD). The pieces joined equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context: the ids of the last piece shown
        self.read = 0  # ids[:read] have been shown

    def _pending_text(self) -> str:
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(shown):]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._pending_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def flush(self) -> str:
        text = self._pending_text()
        self.prefix, self.read = self.read, len(self.ids)
        return text
