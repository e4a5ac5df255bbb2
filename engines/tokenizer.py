"""The tokenizer a GGUF file (or a checkpoint's tokenizer.json) describes (byte-level BPE),
on the `tokenizers` library.

Invariants:

- Ids are the file's vocabulary ids, and ``encode`` splits text the way the model's own
  tokenizer does. For ``tokenizer.ggml.pre == "smollm"`` that is llama.cpp's and SmolLM2's
  ``tokenizer.json``: every digit alone, then GPT-2's byte-level regex. A ``pre`` this module
  does not implement is refused, never approximated by plain GPT-2.
- Control tokens (``token_type`` 3, e.g. ``<|im_start|>``) are special: written inline in
  text they encode to their one id, and ``decode(skip_special_tokens=True)`` drops them.
  User-defined tokens (4) also match whole but are not special.
- A `StreamDecoder` fed ids one by one returns deltas whose concatenation is
  ``decode(ids)`` (for any ids whose bytes are valid UTF-8); no delta ends inside a
  multi-byte character: the bytes of an unfinished one wait for the next token.
- The chat template is reproduced in Python, not run through jinja: only templates this
  module recognizes exactly (ChatML, with or without a default system prompt, as
  SmolLM2-Instruct's) are accepted; `apply_chat_template` raises for any other.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from gguf import TokenType
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from engines.config import ModelLoadError
from engines.gguf_file import GGUFHeader, gguf_eos_token_ids, read_gguf_header

Message = dict[str, str]


class PreTokenizer(Enum):
    """How text is cut before BPE, named for llama.cpp's groups of ``tokenizer.ggml.pre``."""

    GPT2 = "gpt2"  # GPT-2's regex alone
    DIGITS_THEN_GPT2 = "digits_then_gpt2"  # each digit alone, then GPT-2's regex


# llama.cpp (llama-vocab.cpp) gives every name in a group the same regexes
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais", "trillion"), PreTokenizer.GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), PreTokenizer.DIGITS_THEN_GPT2),
}


def _backend_pre_tokenizer(kind: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind is PreTokenizer.GPT2:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes spell themselves, the
    rest (space, control bytes, ...) are shifted to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars |= {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


def _token_bytes(token: str, byte_decoder: dict[str, int]) -> bytes:
    """The bytes a token decodes to. Like tokenizers' ByteLevel decoder, a token spelled
    outside the byte alphabet (a user-defined one stored as plain text) is its UTF-8."""
    try:
        return bytes(byte_decoder[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


# --------------------------------------------------------------------------- chat template

_CHATML_HEAD = "{% for message in messages %}"
_CHATML_SYSTEM_OPEN = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                       "{{ '<|im_start|>system\n")
_CHATML_SYSTEM_CLOSE = "<|im_end|>\n' }}{% endif %}"
_CHATML_TURN = ("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}")
_CHATML_TAIL = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
_CHATML_PATTERN = re.compile(
    re.escape(_CHATML_HEAD)
    + "(?:" + re.escape(_CHATML_SYSTEM_OPEN) + r"(?P<system>[^'\\{}]*)"
    + re.escape(_CHATML_SYSTEM_CLOSE) + ")?"
    + re.escape(_CHATML_TURN) + re.escape(_CHATML_TAIL) + r"\s*")


@dataclass(frozen=True)
class ChatMLTemplate:
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, a default system message
    first when the conversation has none (if the template names one), and
    ``<|im_start|>assistant\\n`` as the generation prompt."""

    default_system_prompt: str | None = None

    @classmethod
    def from_jinja(cls, source: str) -> ChatMLTemplate | None:
        """The template ``source`` is, if it is one of these; else None. Jinja reads ``\\n``
        in a string literal as a newline, so both spellings are accepted."""
        match = _CHATML_PATTERN.fullmatch(source.replace("\\n", "\n"))
        if match is None:
            return None
        return cls(default_system_prompt=match.group("system"))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if not messages:
            raise ValueError("a chat needs at least one message")
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(f"chat message {i} needs string 'role' and 'content', "
                                 f"got {message!r}")
            if i == 0 and role != "system" and self.default_system_prompt is not None:
                parts.append(f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


# --------------------------------------------------------------------------- tokenizer


class StreamDecoder:
    """Incremental detokenizer: `push` one id, get the text it completes (maybe ""); `finish`
    returns what an unfinished character left (U+FFFD per broken sequence)."""

    def __init__(self, token_bytes: Sequence[bytes], skipped_ids: frozenset[int]) -> None:
        self._token_bytes = token_bytes
        self._skipped_ids = skipped_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{len(self._token_bytes) - 1})")
        if token_id in self._skipped_ids:
            return ""
        return self._utf8.decode(self._token_bytes[token_id])

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Encode, decode, stream-decode and chat-format for one model's vocabulary."""

    def __init__(self, backend: BackendTokenizer, *, token_bytes: Sequence[bytes],
                 special_ids: frozenset[int], bos_token_id: int | None,
                 eos_token_ids: tuple[int, ...], add_bos_token: bool,
                 chat_template: ChatMLTemplate | None) -> None:
        if add_bos_token and bos_token_id is None:
            raise ModelLoadError("the tokenizer adds a BOS token but names none")
        self._backend = backend
        self._token_bytes = token_bytes
        self._special_ids = special_ids
        self._bos_token_id = bos_token_id
        self._eos_token_ids = eos_token_ids
        self._add_bos_token = add_bos_token
        self._chat_template = chat_template

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        return cls.from_gguf_header(read_gguf_header(path))

    @classmethod
    def from_gguf_header(cls, header: GGUFHeader) -> Tokenizer:
        model = header.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(f"{header.path!r}: tokenizer model {model!r} is not supported "
                                 f"(only byte-level BPE, 'gpt2')")
        pre = header.get("tokenizer.ggml.pre")
        if pre not in PRE_TOKENIZERS:
            raise ModelLoadError(f"{header.path!r}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) "
                                 f"is not implemented; known: {sorted(PRE_TOKENIZERS)}")
        tokens = _string_list(header, "tokenizer.ggml.tokens")
        merges = _merges(header, _string_list(header, "tokenizer.ggml.merges"))
        token_types = header.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
        if not isinstance(token_types, list) or len(token_types) != len(tokens):
            raise ModelLoadError(f"{header.path!r}: tokenizer.ggml.token_type does not give one "
                                 f"type per token")
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ModelLoadError(f"{header.path!r}: tokenizer.ggml.tokens repeats a token")

        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                              continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = _backend_pre_tokenizer(PRE_TOKENIZERS[pre])
        backend.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(token_types) if t == TokenType.CONTROL]
        user_defined = [i for i, t in enumerate(token_types) if t == TokenType.USER_DEFINED]
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i in special])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i in user_defined])
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ModelLoadError(f"{header.path!r}: added tokens grew the vocabulary past "
                                 f"{len(tokens)}")

        byte_decoder = _byte_decoder()
        template_source = header.get("tokenizer.chat_template")
        bos = header.get("tokenizer.ggml.bos_token_id")
        return cls(
            backend,
            token_bytes=[_token_bytes(token, byte_decoder) for token in tokens],
            special_ids=frozenset(special),
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_ids=gguf_eos_token_ids(header, len(tokens)),
            # byte-level BPE vocabularies add no BOS unless the file says so (GPT-2's default)
            add_bos_token=bool(header.get("tokenizer.ggml.add_bos_token") or False),
            chat_template=(ChatMLTemplate.from_jinja(template_source)
                           if isinstance(template_source, str) else None),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a Hugging Face checkpoint directory: ``tokenizer.json`` (a
        byte-level BPE, as Llama 3's and SmolLM2's are) and ``tokenizer_config.json``
        (BOS/EOS, ``add_bos_token``, the chat template)."""
        import json

        directory = os.fspath(path)
        file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(file):
            raise ModelLoadError(f"{directory}: no tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ModelLoadError(f"{file}: cannot read it ({e})") from None
        try:
            with open(os.path.join(directory, "tokenizer_config.json")) as f:
                settings = json.load(f)
        except FileNotFoundError:
            settings = {}
        except ValueError as e:
            raise ModelLoadError(f"{directory}/tokenizer_config.json: {e}") from None
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise ModelLoadError(f"{file}: not a byte-level BPE tokenizer (only those are "
                                 "supported, as GPT-2, Llama 3 and SmolLM2 use)")
        size = backend.get_vocab_size(with_added_tokens=True)
        tokens = [backend.id_to_token(i) or "" for i in range(size)]
        byte_decoder = _byte_decoder()
        special = frozenset(
            i for i, added in backend.get_added_tokens_decoder().items() if added.special)

        def token_id(name: str) -> int | None:
            value = settings.get(name)
            if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        eos = [t for t in (token_id("eos_token"), backend.token_to_id("<|im_end|>"),
                           backend.token_to_id("<|eot_id|>")) if t is not None]
        template = settings.get("chat_template")
        return cls(
            backend,
            token_bytes=[_token_bytes(token, byte_decoder) for token in tokens],
            special_ids=special, bos_token_id=token_id("bos_token"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            add_bos_token=bool(settings.get("add_bos_token", False)),
            chat_template=(ChatMLTemplate.from_jinja(template)
                           if isinstance(template, str) else None),
        )

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply: eos, eot/eom where the file names them, ``<|im_end|>``."""
        return self._eos_token_ids

    @property
    def chat_template(self) -> ChatMLTemplate | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids for ``text``, with BOS first when the file asks for it; special tokens written
        in the text are their own ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._add_bos_token:
            assert self._bos_token_id is not None, "checked in __init__"
            return [self._bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self._token_bytes,
                             self._special_ids if skip_special_tokens else frozenset())

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        if self._chat_template is None:
            raise ModelLoadError("this model's chat template (tokenizer.chat_template) is "
                                 "missing or not one engines.tokenizer implements (ChatML)")
        return self._chat_template.render(messages, add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True) -> list[int]:
        """`render_chat`'s ids. No BOS is added: a template writes what it needs itself."""
        text = self.render_chat(messages, add_generation_prompt)
        return self._backend.encode(text, add_special_tokens=False).ids


def _string_list(header: GGUFHeader, key: str) -> list[str]:
    value = header.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelLoadError(f"{header.path!r}: {key} is missing or not a list of strings")
    return value


def _merges(header: GGUFHeader, merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        if not left or not right or " " in right:
            raise ModelLoadError(f"{header.path!r}: merge {merge!r} is not two tokens")
        pairs.append((left, right))
    return pairs
