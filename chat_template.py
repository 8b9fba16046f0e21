"""Pion's chat template, defined once: the turns the published SFT checkpoint was trained on, rendered as
token ids (fine-tuning, chat.py, server.py), as text (harness.py), as Jinja (the transformers and GGUF
exports) and as an Ollama Modelfile; and where a generated reply ends.

A turn is "<|role|>\\n" + its content stripped of surrounding whitespace + "\\n"; an assistant turn is then
closed by <|endoftext|>, and "<|assistant|>\\n" asks the model for the next reply. The role markers are plain
text to the tokenizer, not special tokens. Every rendering here is built from the constants below.
"""
from collections import namedtuple

from cli import PionError
from loss import IGNORE_INDEX
from tokenizer import EOS_ID

ROLES = ("system", "user", "assistant")
ROLE_OPEN, ROLE_CLOSE = "<|", "|>\n"  # a turn opens with "<|role|>\n"
TURN_PREFIXES = {role: ROLE_OPEN + role + ROLE_CLOSE for role in ROLES}
SYSTEM_PREFIX, USER_PREFIX, ASSISTANT_PREFIX = (TURN_PREFIXES[role] for role in ROLES)
TURN_SUFFIX = "\n"
EOS_TEXT = "<|endoftext|>"  # EOS_ID as text, as the text and Jinja renderings write it after an assistant turn
UNKNOWN_ROLE = "Pion chats have system, user and assistant turns, not "

# A reply ends at EOS_ID, or where the model starts writing the user's next turn; the TURN_SUFFIX before either
# closes the turn and is not the reply's content. Chat callers pass CHAT_TURN to decoding's TextStream (or
# generate_text), which applies this rule as it streams.
USER_MARKER = USER_PREFIX.strip()
STOP_STRINGS = (USER_MARKER,)
ChatTurn = namedtuple("ChatTurn", "stop_strings suffix")
CHAT_TURN = ChatTurn(STOP_STRINGS, TURN_SUFFIX)


def render_conversation(tokenizer, messages, add_generation_prompt=False):
    """messages [{"role": "system"|"user"|"assistant", "content": str}] -> (input_ids, labels), aligned.

    The rendering as ids, for training and for chat alike. Each piece (prefix, content, suffix) is tokenized
    on its own and the ids concatenated, exactly as the published SFT checkpoint was trained: the mask
    boundaries then fall between pieces, and a reply's first token never merges with the prefix before it.
    Assistant content, its suffix and the EOS_ID after it are trained (so the model learns to stop);
    everything else is IGNORE_INDEX. add_generation_prompt appends the assistant prefix to answer after.

    Content is stripped of surrounding whitespace, as CHAT_TEMPLATE does (`| trim`): then every piece
    boundary is also a boundary of the tokenizer's pre-tokenization, and tokenizing the pieces apart gives
    the ids that tokenizing the joined text gives (what transformers and llama.cpp do)."""
    input_ids, labels = [], []

    def add(ids, trained):
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    for message in messages:
        is_assistant = message["role"] == "assistant"
        add(tokenizer.encode(TURN_PREFIXES[message["role"]]).ids, trained=False)
        add(tokenizer.encode(message["content"].strip()).ids, trained=is_assistant)
        add(tokenizer.encode(TURN_SUFFIX).ids, trained=is_assistant)
        if is_assistant:
            add([EOS_ID], trained=True)  # the id itself: text that reads "<|endoftext|>" stays text
    if add_generation_prompt:
        add(tokenizer.encode(ASSISTANT_PREFIX).ids, trained=False)
    return input_ids, labels


def render_text(messages, add_generation_prompt=False, continue_final_message=False):
    """The conversation as the text CHAT_TEMPLATE renders in transformers, <|endoftext|> written as EOS_TEXT:
    what lm-evaluation-harness tokenizes (harness.PionLM.apply_chat_template).

    continue_final_message ends the text right after the last message's content, as transformers'
    option of that name does: a reply begun for the model to continue, with no suffix and no end of text."""
    text = ""
    for i, message in enumerate(messages):
        if message["role"] not in TURN_PREFIXES:
            raise PionError(f"{UNKNOWN_ROLE}{message['role']!r}")
        text += TURN_PREFIXES[message["role"]] + message["content"].strip()
        if continue_final_message and i == len(messages) - 1:
            return text
        text += TURN_SUFFIX + (EOS_TEXT if message["role"] == "assistant" else "")
    return text + (ASSISTANT_PREFIX if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------------
# The template for other tools


def jinja_string(text):
    """text as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# For transformers' apply_chat_template and llama.cpp (transformers_format.py and gguf_format.py write it into the
# exports). transformers passes eos_token; Jinja's `trim` is Python's str.strip.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in [" + ", ".join(map(jinja_string, ROLES)) + "] -%}"
    "{{- raise_exception(" + jinja_string(UNKNOWN_ROLE) + " + message['role']) -}}"
    "{%- endif -%}"
    "{{- " + jinja_string(ROLE_OPEN) + " + message['role'] + " + jinja_string(ROLE_CLOSE)
    + " + (message['content'] | trim) + " + jinja_string(TURN_SUFFIX) + " -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + jinja_string(ASSISTANT_PREFIX) + " -}}{%- endif -%}"
)


def ollama_modelfile(gguf_path):
    """An Ollama Modelfile for a .gguf export, which Ollama needs: it ignores Jinja templates it does not
    recognise. Go templates cannot strip content, so a message's surrounding whitespace reaches the model."""
    template = ("{{- range .Messages }}" + ROLE_OPEN + "{{ .Role }}" + ROLE_CLOSE + "{{ .Content }}" + TURN_SUFFIX
                + '{{ if eq .Role "assistant" }}' + EOS_TEXT + "{{ end }}\n{{- end }}" + ASSISTANT_PREFIX)
    stops = "".join(f"PARAMETER stop {stop}\n" for stop in (EOS_TEXT, *STOP_STRINGS))
    return f'FROM {gguf_path}\nTEMPLATE """{template}"""\n{stops}'
