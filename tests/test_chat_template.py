"""chat_template: the published SFT template as ids, text, Jinja and an Ollama Modelfile, and where a reply ends.

The ids are what the published SFT checkpoint was trained on; every other rendering must agree with them."""
import os

import pytest

import chat_template
from chat_template import EOS_TEXT, STOP_STRINGS, render_conversation, render_text
from cli import PionError
from conftest import CHAT, ROOT, trained_spans
from tokenizer import EOS_ID

EOS = "<|endoftext|>"


def messages(*turns):
    return [{"role": role, "content": text} for role, text in turns]


TERSE = messages(("system", "You are terse."), ("user", "What is 2+2?"), ("assistant", "Four."))
TWO_REPLIES = messages(("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"),
                       ("assistant", " Green, or red."))
EMOJI = messages(("user", "Say hello in emoji"), ("assistant", "👋 héllo\n  bye"))

# The template of the exports made before chat_template.py built it from its constants: still byte for byte.
PUBLISHED_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Pion chats have system, user and assistant turns, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + (message['content'] | trim) + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    """The transformers tokenizer transformers_format writes (with CHAT_TEMPLATE), loaded as AutoTokenizer loads it."""
    transformers = pytest.importorskip("transformers")
    import transformers_format
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    transformers_format.write_tokenizer(tokenizer, folder, max_len=128)
    return transformers.AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------
# The pieces


def test_template_constants_spell_the_published_template():
    assert (chat_template.SYSTEM_PREFIX, chat_template.USER_PREFIX, chat_template.ASSISTANT_PREFIX,
            chat_template.TURN_SUFFIX) == ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "\n")
    assert chat_template.USER_MARKER == "<|user|>"


def test_a_chat_stops_where_the_user_s_next_turn_begins():
    assert STOP_STRINGS == ("<|user|>",)


def test_eos_text_is_how_the_tokenizer_writes_the_end_of_text_id(tokenizer):
    assert tokenizer.decode([EOS_ID], skip_special_tokens=False) == EOS_TEXT == EOS


# ----------------------------------------------------------------------------------------------------
# As ids, with the training mask


def test_render_concatenates_separately_tokenized_template_pieces(tokenizer):
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    input_ids, _ = render_conversation(tokenizer, TERSE)
    assert input_ids == (encode("<|system|>\n") + encode("You are terse.") + encode("\n")
                         + encode("<|user|>\n") + encode("What is 2+2?") + encode("\n")
                         + encode("<|assistant|>\n") + encode("Four.") + encode("\n") + [0])


def test_system_user_and_assistant_prefix_tokens_are_masked(tokenizer):
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    input_ids, labels = render_conversation(tokenizer, TERSE)
    n_prompt = len(encode("<|system|>\n") + encode("You are terse.") + encode("\n") + encode("<|user|>\n")
                   + encode("What is 2+2?") + encode("\n") + encode("<|assistant|>\n"))
    assert labels == [-100] * n_prompt + input_ids[n_prompt:]


def test_trained_tokens_are_the_reply_its_newline_and_the_end_token(tokenizer):
    input_ids, labels = render_conversation(tokenizer, EMOJI)
    assert trained_spans(tokenizer, input_ids, labels) == ["👋 héllo\n  bye\n" + EOS]
    assert input_ids[-1] == labels[-1] == 0


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer):
    input_ids, labels = render_conversation(tokenizer, TWO_REPLIES)
    assert trained_spans(tokenizer, input_ids, labels) == ["Blue.\n" + EOS, "Green, or red.\n" + EOS]


def test_labels_are_aligned_with_input_ids(tokenizer):
    input_ids, labels = render_conversation(tokenizer, TWO_REPLIES)
    assert len(labels) == len(input_ids)
    assert all(label == token for token, label in zip(input_ids, labels) if label != -100)


def test_generation_prompt_appends_the_masked_assistant_prefix(tokenizer):
    conversation = TWO_REPLIES[:3]  # ends with the user's "Another?"
    input_ids, labels = render_conversation(tokenizer, conversation, add_generation_prompt=True)
    prefix = tokenizer.encode("<|assistant|>\n").ids
    assert input_ids == render_conversation(tokenizer, conversation)[0] + prefix
    assert labels[-len(prefix):] == [-100] * len(prefix)
    assert tokenizer.decode(input_ids, skip_special_tokens=False).endswith("<|user|>\nAnother?\n<|assistant|>\n")


# ----------------------------------------------------------------------------------------------------
# As text (what harness.PionLM gives lm-evaluation-harness)


def test_text_renders_the_sft_conversation():
    chat = messages(("user", "Hi!"), ("assistant", "Hello."), ("user", "Count to 3."))
    assert render_text(chat, add_generation_prompt=True) == \
        "<|user|>\nHi!\n<|assistant|>\nHello.\n<|endoftext|><|user|>\nCount to 3.\n<|assistant|>\n"


def test_text_continuing_a_final_message_ends_right_after_its_content():
    chat = messages(("user", "Sky?"), ("assistant", " Answer: "))
    assert render_text(chat, continue_final_message=True) == "<|user|>\nSky?\n<|assistant|>\nAnswer:"


def test_text_refuses_a_role_the_template_has_not():
    with pytest.raises(PionError, match="system, user and assistant turns, not 'tool'"):
        render_text(messages(("tool", "42")))


# ----------------------------------------------------------------------------------------------------
# As Jinja, for transformers and llama.cpp


def test_the_jinja_template_is_the_one_the_exports_have_always_carried():
    assert chat_template.CHAT_TEMPLATE == PUBLISHED_JINJA


def test_chat_template_renders_the_sft_strings(hf_tokenizer):
    rendered = hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == ("<|system|>\nYou are Pion.\n<|user|>\nHi!\n<|assistant|>\nHello. How can I help?\n"
                        "<|endoftext|><|user|>\nCount to 3.\n")
    prompt = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "<|assistant|>\n"
    with pytest.raises(Exception, match="system, user and assistant"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


@pytest.mark.parametrize("padding", ["", " ", "\n", "  \n\t"])
def test_chat_template_tokenizes_like_sft_training(hf_tokenizer, tokenizer, padding):
    """The same token ids, also when a message starts or ends in whitespace (BPE could merge it with the
    template's newlines in the joined text transformers tokenizes)."""
    chat = [{**m, "content": padding + m["content"] + padding} for m in CHAT]
    expected, _ = render_conversation(tokenizer, chat, add_generation_prompt=True)
    rendered = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert hf_tokenizer(rendered, add_special_tokens=False).input_ids == expected


# ----------------------------------------------------------------------------------------------------
# Every rendering agrees


PLAIN_CONTENTS = {
    "surrounding whitespace": "  \n\t Hello there \n\n ",
    "internal whitespace": "one  two\n\nthree\t four   five",
    "unicode spaces": "\u3000\u00a0wide\u3000and\u00a0narrow\u2003",
    "cjk": "東京は晴れです。你好，世界",
    "emoji": "👋🏽 hi 🇫🇷 👨‍👩‍👧 ✨",
    "combining marks": "e\u0301 n\u0303 a\u0308 \u0301leading mark",
    "role marker text": "I wrote <|user|>\nhi and <|assistant|> and <|system|>",
    "quotes and backslashes": "it's \"quoted\" \\n not a newline {{ not jinja }} {% raw %}",
}
SPECIAL_TOKEN_CONTENTS = {
    "end of text": "The end <|endoftext|> of it",
    "padding and unknown": "<|pad|> then <|unk|>",
}


def every_role(content):
    """A conversation with `content` in each turn, ending in a user turn."""
    return messages(("system", content), ("user", content), ("assistant", content), ("user", content))


@pytest.mark.parametrize("content", [*PLAIN_CONTENTS.values(), *SPECIAL_TOKEN_CONTENTS.values()],
                         ids=[*PLAIN_CONTENTS, *SPECIAL_TOKEN_CONTENTS])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_jinja_in_transformers_renders_the_text_rendering(hf_tokenizer, content, add_generation_prompt):
    chat = every_role(content)
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt) \
        == render_text(chat, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("content", [*PLAIN_CONTENTS.values(), *SPECIAL_TOKEN_CONTENTS.values()],
                         ids=[*PLAIN_CONTENTS, *SPECIAL_TOKEN_CONTENTS])
def test_jinja_continuing_a_final_message_renders_the_text_rendering(hf_tokenizer, content):
    chat = every_role(content)[:3]  # ends with the assistant's reply
    assert hf_tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True) == \
        render_text(chat, continue_final_message=True)


@pytest.mark.parametrize("content", PLAIN_CONTENTS.values(), ids=PLAIN_CONTENTS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokenizing_the_text_gives_the_trained_ids(hf_tokenizer, tokenizer, content, add_generation_prompt):
    """Role markers are plain text to both tokenizers, so the ids agree whatever the content holds."""
    chat = every_role(content)
    text = render_text(chat, add_generation_prompt=add_generation_prompt)
    expected, _ = render_conversation(tokenizer, chat, add_generation_prompt=add_generation_prompt)
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == expected


@pytest.mark.parametrize("content", SPECIAL_TOKEN_CONTENTS.values(), ids=SPECIAL_TOKEN_CONTENTS)
def test_special_token_text_is_text_to_pion_and_a_control_token_to_transformers(hf_tokenizer, tokenizer, content):
    """Pion's tokenizer encodes special-token text in content as characters (encode_special_tokens), so the
    only <|endoftext|> id in the trained ids is the template's own. A transformers tokenizer parses it in the
    rendered text: its ids are those of the same rendering by a tokenizer that matches special-token text."""
    chat = every_role(content)
    text = render_text(chat, add_generation_prompt=True)
    ids, _ = render_conversation(tokenizer, chat, add_generation_prompt=True)
    matching = type(tokenizer).from_str(tokenizer.to_str())
    matching.encode_special_tokens = False
    hf_ids = hf_tokenizer(text, add_special_tokens=False).input_ids
    assert hf_ids == render_conversation(matching, chat, add_generation_prompt=True)[0] != ids
    assert ids.count(EOS_ID) == 1 and hf_ids.count(EOS_ID) == 1 + 4 * content.count(EOS)
    assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(hf_ids) == text


# ----------------------------------------------------------------------------------------------------
# As an Ollama Modelfile


def test_the_modelfile_spells_the_turns_in_go_template_syntax():
    assert chat_template.ollama_modelfile("./pion.gguf") == (
        'FROM ./pion.gguf\n'
        'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>\n'
        '{{ .Content }}\n'
        '{{ if eq .Role "assistant" }}<|endoftext|>{{ end }}\n'
        '{{- end }}<|assistant|>\n'
        '"""\n'
        'PARAMETER stop <|endoftext|>\n'
        'PARAMETER stop <|user|>\n')


def test_the_export_docs_show_the_generated_modelfile():
    with open(os.path.join(ROOT, "docs", "export.md"), encoding="utf-8") as f:
        assert "\n```\n" + chat_template.ollama_modelfile("./pion.gguf") + "```\n" in f.read()
