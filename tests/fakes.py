"""Test doubles shared by the unit tests."""

from __future__ import annotations

from collections.abc import Sequence

BOS, EOS, EOT = 256, 257, 258
_SPECIAL = {BOS: "<s>", EOS: "</s>", EOT: "<|eot|>"}


class FakeTokenizer:
    """Byte-level: ids 0..255 are bytes; 256-258 are special. Chat template is plain text."""

    vocab_size = 259
    bos_token_id = BOS
    eos_token_ids = (EOS,)
    add_bos_token = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if not (skip_special_tokens and self.is_special(i))]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [_SPECIAL[i] if i in _SPECIAL else f"<0x{i:02X}>" for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        out, buf = [], bytearray()
        for t in tokens:
            if t.startswith("<0x"):
                buf.append(int(t[3:5], 16))
            else:
                out.append(buf.decode("utf-8", errors="replace") + t)
                buf = bytearray()
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        return token_id in _SPECIAL

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if messages[0]["role"] == "assistant":
            raise ValueError("Conversation must not start with an assistant message")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
