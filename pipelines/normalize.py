"""Text normalization and document hashes (pure functions, no Ray).

`normalize_text` is what every later stage sees: quality filters, dedup, tokenizer and
chunking all run on its output, and `content_hash` of that output is the stable identity of a
document's content. Choices, and why:

* Unicode NFC, applied *after* every character is removed or replaced: removing a control
  character can put a combining mark next to a base letter ("e\\x00\\u0301"), so NFC first
  would not be idempotent. (No NFC mapping yields any character removed here; checked over
  every code point when this was written.)
* Line breaks: "\\r\\n", "\\r", VT, FF, NEL, U+2028 and the ASCII information separators
  (U+001C..U+001F, which Python's str.split treats as whitespace) become "\\n"; U+2029
  (paragraph separator) becomes a blank line. Mapping the separators to a break rather than
  deleting them keeps the words on either side apart.
* Tabs are KEPT: they carry structure in code and tables, and the word splitter treats them
  as whitespace anyway. They are stripped at line ends like spaces.
* Other Unicode spaces (NBSP, thin/em spaces, ideographic space, ...) become one ASCII space
  each; runs of spaces inside a line are kept (indentation, aligned columns).
* Control characters other than \\n and \\t are removed, as are the invisible format
  characters that only break words apart for no reader (soft hyphen, zero-width space, word
  joiner, BOM). ZWJ/ZWNJ and bidi marks are kept: emoji sequences and several scripts need
  them.
* Lone surrogates (from `surrogateescape` decoding or JSON "\\ud800") become U+FFFD so the
  text can always be encoded to UTF-8.
* Trailing spaces/tabs of every line are stripped, 3+ newlines collapse to 2 (one blank
  line), and the document is stripped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["normalize_text", "content_hash", "exact_dedup_key"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINE = re.compile("\r\n?|[\x0b\x0c\x1c-\x1f\x85\u2028]")
# After _NEWLINE has run, so \x0b \x0c \x1c-\x1f \x85 are already gone.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x9f\u00ad\u200b\u2060\ufeff]+")
_ASCII_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f]+")
_ASCII_ODD = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # anything the two above would touch
_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# One scan that finds whether any of the four substitutions above has work to do.
_ODD = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00a0\u00ad\u1680\u2000-\u200b\u2028-\u2029"
    "\u202f\u205f\u2060\u3000\ufeff\ud800-\udfff]"
)
_TRAILING = re.compile("[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile("\n{3,}")


def normalize_text(text: str) -> str:
    """Return the canonical form of `text` (see the module docstring). Idempotent."""
    if text.isascii():
        # Fast path (most documents): nothing outside ASCII to map, NFC is the identity.
        if _ASCII_ODD.search(text) is not None:
            text = _ASCII_CONTROL.sub("", _NEWLINE.sub("\n", text))
    else:
        if _ODD.search(text) is not None:
            text = _SURROGATE.sub("\ufffd", text)
            text = _NEWLINE.sub("\n", text).replace("\u2029", "\n\n")
            text = _CONTROL.sub("", text)
            text = _SPACE.sub(" ", text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
    # Both substitutions are skipped when a fast substring test shows they would do nothing:
    # the regex scans cost more than the rest of the function on clean text.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


def _utf8(text: str) -> bytes:
    # surrogatepass: hashing must never raise, even on text that skipped normalize_text.
    return text.encode("utf-8", "surrogatepass")


def content_hash(text: str) -> str:
    """Hex BLAKE2b-128 of the UTF-8 bytes of `text` (pass it normalized text)."""
    return hashlib.blake2b(_utf8(text), digest_size=16).hexdigest()


def exact_dedup_key(text: str) -> int:
    """Signed int64 (BLAKE2b-64) of a looser form of `text`: NFC, casefolded, every
    whitespace run collapsed to one space, stripped. Copies differing only in case, line
    wrapping or indentation get the same key, so exact dedup catches them. Signed so the
    key fits an Arrow/DuckDB int64 column as is.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", _SURROGATE.sub("\ufffd", text))
    loose = " ".join(text.casefold().split())
    digest = hashlib.blake2b(_utf8(loose), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
