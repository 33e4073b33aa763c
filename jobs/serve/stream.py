"""A streamed request's tokens, sent as they are decoded: the batch's decode thread pushes each
token of the request's row (jobs/serve/batch.py, through the engine's `on_token`) into the
request's own `TokenStream`, which hands it to the event loop that answers the request; the
server-sent events carry the text each token adds.

A row's stream ends where its non-streamed answer is cut: at EOS or at the request's own
max_tokens (rows of one batch decode to the largest max_tokens of the batch, and a row decodes on
after its EOS until every row has stopped). The text deltas concatenate to the non-streamed text
exactly: each is the new suffix of the decode of the tokens so far, a trailing U+FFFD held back
(byte-level BPE can end a token inside a UTF-8 character: the next token completes it).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

END = object()  # the request's batch is decoded (its result, or its error, is in the batch's future)


def text_delta(text: str, sent: str) -> str:
    """What to send of `text` (the decode of a row's tokens so far) when `sent` has been sent:
    the new suffix, less any trailing U+FFFD (an incomplete UTF-8 sequence, whole once the next
    token comes); "" while nothing new is whole."""
    whole = text.rstrip("\ufffd")
    if len(whole) <= len(sent) or not whole.startswith(sent):
        return ""
    return whole[len(sent) :]


class TokenStream:
    """One streamed request: `open` and `push` are called by the decode thread, `started` and
    `deltas` in the request's event loop (the loop that made the stream)."""

    def __init__(self, max_tokens: int):
        self.loop = asyncio.get_running_loop()
        self.max_tokens = max_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.build = self.tokenizer = self.eos_id = None
        self.count, self.ended = 0, False
        self._first = None

    # -- the decode thread
    def open(self, build: int | None, tokenizer, eos_id: int) -> None:
        """Before the decode: the build that decodes the request and its tokenizer."""
        self.build, self.tokenizer, self.eos_id = build, tokenizer, eos_id

    def push(self, token: int) -> None:
        """A token of the request's row, as soon as it is sampled; ignored from EOS or
        max_tokens on (the row's answer is cut there)."""
        if self.ended:
            return
        if token == self.eos_id:
            self.ended = True
            return
        self.count += 1
        self.ended = self.count >= self.max_tokens
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    # -- the event loop
    def close(self, _=None) -> None:
        """The batch is decoded (a done-callback of its future: every token was queued before)."""
        self.queue.put_nowait(END)

    async def started(self) -> bool:
        """Waits for the first token: True once it has come, False when the batch ended without
        one (the request's error, or an answer of no token)."""
        self._first = await self.queue.get()
        return self._first is not END

    async def deltas(self, final_text) -> AsyncIterator[str]:
        """The text of each token as it comes (after `started`), then what of the final text
        (`final_text()`, the non-streamed answer's) is still to send."""
        tokens, sent = [], ""
        item = self._first if self._first is not None else await self.queue.get()
        while item is not END:
            tokens.append(item)
            delta = text_delta(self.tokenizer.decode(tokens), sent)
            if delta:
                sent += delta
                yield delta
            item = await self.queue.get()
        text = final_text()
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent) :]
