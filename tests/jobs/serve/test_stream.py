"""Streaming's own logic, without a server (jobs/serve/stream.py): the text deltas hold back an
incomplete UTF-8 character and concatenate to the whole text; a row's stream ends at EOS and at
its own max_tokens."""

from __future__ import annotations

import asyncio

from jobs.serve.stream import TokenStream, text_delta


class Bytes:
    """A byte-level tokenizer's decode: one token per byte, an incomplete character as U+FFFD."""

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


def deltas_of(tokens: list[int]) -> list[str]:
    out, sent = [], ""
    for i in range(1, len(tokens) + 1):
        d = text_delta(Bytes().decode(tokens[:i]), sent)
        sent += d
        out.append(d)
    return out


def test_a_character_split_across_tokens_is_held_back_until_whole():
    text = "né €5 😀!"
    tokens = list(text.encode())
    out = deltas_of(tokens)
    assert "".join(out) == text and not any("\ufffd" in d for d in out)
    # one delta per character, sent with the token that completes it; "" for the tokens before
    assert [d for d in out if d] == list(text)
    assert out[1:3] == ["", "é"] and out[4:7] == ["", "", "€"]
    assert text_delta("ab\ufffd\ufffd", "a") == "b" and text_delta("ab", "ab") == ""


def run_stream(tokens: list[int], max_tokens: int, eos_id: int) -> tuple[list[str], int]:
    async def main():
        s = TokenStream(max_tokens)
        s.open(3, Bytes(), eos_id)

        def decode():  # what the decode thread pushes: the batch decodes past this row's end
            for t in tokens:
                s.push(t)

        await asyncio.get_running_loop().run_in_executor(None, decode)
        s.close()  # as the batch's future does once the decode has returned
        assert await s.started()
        cut = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
        text = Bytes().decode(cut[:max_tokens])  # the non-streamed answer's text
        return [d async for d in s.deltas(lambda: text)], s.count

    return asyncio.run(main())


def test_a_stream_ends_at_eos_and_at_its_own_max_tokens():
    word = list("naïve".encode())  # 6 bytes
    deltas, n = run_stream(word + [0] + list(b"after"), max_tokens=100, eos_id=0)
    assert "".join(deltas) == "naïve" and n == 6
    deltas, n = run_stream(word + list(b"more"), max_tokens=4, eos_id=0)
    assert "".join(deltas) == "naï" and n == 4  # cut where the non-streamed answer is
    deltas, n = run_stream(word, max_tokens=3, eos_id=0)  # cut inside "ï": its bytes stay held
    assert "".join(deltas) == "na" + "\ufffd" and n == 3  # the last delta is the final text's rest
