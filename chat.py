"""Chat with a Pion checkpoint in the terminal.

    python chat.py                                   # the newest checkpoint under checkpoints/, sft/ first
    python chat.py --checkpoint PATH --system "You answer in one sentence."

The conversation is rendered with chat_template.render_conversation, the template the SFT model was tuned on,
and each reply is streamed by decoding.py's engine. It ends at <|endoftext|> or where the model
starts the user's next turn. Ctrl-C stops a reply; that exchange is then left out of the conversation,
so the next message continues from the last complete reply. /help lists the commands.
"""
import argparse
import dataclasses
import glob
import os
import sys
from dataclasses import dataclass, field

from chat_template import CHAT_TURN, render_conversation
from checkpoint import base_model_note, load_model
from quantize import quantize
from tokenizer import load_tokenizer
from cli import (ArgumentParser, PionError, add_inference_args, dataclass_from_args, run_cli, typed_lines,
                 use_one_line_warnings, valid_text)
from decoding import (COMPILE_NOTICE, SETTING_TYPES, DecodeTimer, PromptTruncatedWarning, SamplingSettings,
                      TextStream, add_sampling_args, generate_tokens, max_tokens_type, seeded_generator,
                      stream_text)

HELP = """\
/temp N       sampling temperature, a number >= 0 (0 = greedy); /temp alone shows it (as every setting)
/topk N       sample from the N most likely tokens, an integer >= 0 (0 = off)
/topp N       nucleus sampling, a number in (0, 1] (1 = off)
/minp N       drop tokens below N x the top probability, a number in [0, 1] (0 = off)
/penalty N    repetition penalty, a number > 0 (1 = off)
/tokens N     the longest reply in tokens, an integer >= 1
/system TEXT  set the system prompt (/system alone removes it)
/reset        start a new conversation (the system prompt stays)
/help         this list
/quit         exit (Ctrl-D too); Ctrl-C stops a reply"""

SETTING_COMMANDS = {"/temp": "temperature", "/topk": "top_k", "/topp": "top_p", "/minp": "min_p",
                    "/penalty": "repetition_penalty"}


@dataclass
class Conversation:
    system: str = ""
    turns: list = field(default_factory=list)  # {"role", "content"} messages: user, assistant, ..., user


def find_newest_checkpoint(root="checkpoints"):
    """The most recently written .pt under root/sft/, else under root/ (at any depth); None if none.
    Fine-tuned checkpoints come first: only they have learned the chat template."""
    for folder in (os.path.join(root, "sft"), root):
        paths = glob.glob(os.path.join(glob.escape(folder), "**", "*.pt"), recursive=True)
        if paths:
            return max(paths, key=os.path.getmtime)
    return None


def conversation_prompt(tokenizer, conversation, budget):
    """Token ids asking for the reply to the last (user) turn: the system prompt, as many of the latest
    turns as fit in `budget` tokens, and the assistant prefix.

    The oldest exchanges (a user turn and its reply) are dropped first. The system prompt and the current
    message are always kept; if they alone overflow, generate() keeps the prompt's last tokens and warns."""
    system = [{"role": "system", "content": conversation.system}] if conversation.system else []
    turns, first = conversation.turns, 0
    while True:
        input_ids, _ = render_conversation(tokenizer, system + turns[first:], add_generation_prompt=True)
        if len(input_ids) <= budget or first >= len(turns) - 1:
            return input_ids
        first += 2


def usage(command):
    return next(line for line in HELP.splitlines() if line.startswith(command + " "))


def run_command(line, conversation, session):
    """Apply one /command, printing what it did; False means quit. A bad value changes nothing."""
    command, _, value = line.strip().partition(" ")
    value = value.strip()
    if command in SETTING_COMMANDS or command == "/tokens":
        name = SETTING_COMMANDS.get(command, "max_tokens")
        if not value:  # /temp alone shows the current value
            print(f"{name} = {session.max_tokens if name == 'max_tokens' else getattr(session.settings, name)}")
            return True
        try:
            if name == "max_tokens":
                session.max_tokens = shown = session.reply_limit(max_tokens_type(value))
            else:
                shown = SETTING_TYPES[name](value)
                session.settings = dataclasses.replace(session.settings, **{name: shown})
            print(f"{name} = {shown}")
        except argparse.ArgumentTypeError:
            print(f"usage: {usage(command)}")
    elif command == "/system":
        conversation.system = value
        print("system prompt set" if value else "system prompt removed")
    elif command == "/reset":
        conversation.turns.clear()
        print("new conversation")
    elif command == "/help":
        print(HELP)
    elif command == "/quit":
        return False
    else:
        print(f"unknown command {command}; /help lists them")
    return True


@dataclass
class Session:
    """What a reply needs besides the conversation: the model and how to sample it."""
    model: object
    tokenizer: object
    settings: SamplingSettings
    max_tokens: int
    generator: object = None
    compile: bool = False

    def reply_limit(self, max_tokens):
        """max_tokens, capped at half the model's context (said out loud): the conversation needs the rest."""
        limit = self.model.config.max_seq_len // 2 if self.model is not None else max_tokens
        if max_tokens > limit:
            print(f"(a reply of {max_tokens} tokens would leave no room for the conversation in the model's "
                  f"{self.model.config.max_seq_len}-token context: replies stop at {limit})")
        return min(max_tokens, limit)


def reply(session, conversation):
    """Stream the model's reply to the conversation's last turn; returns it as the template stores it."""
    model, tokenizer = session.model, session.tokenizer
    prompt_ids = conversation_prompt(tokenizer, conversation, model.config.max_seq_len - session.max_tokens)
    columns = DecodeTimer(generate_tokens(model, prompt_ids, session.max_tokens, session.settings, session.generator,
                                          compile=session.compile), len(prompt_ids))
    stream = TextStream(tokenizer, turn=CHAT_TURN)
    for _, piece in stream_text(columns, [stream]):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if not stream.text.endswith("\n"):
        print()
    print(columns.report(), file=sys.stderr)
    return stream.text  # the reply's content: the turn's suffix and what ended it are not part of it


def parse_args(argv=None):
    parser = ArgumentParser(description="Chat with a Pion checkpoint.")
    parser.add_argument("--checkpoint", default=None,
                        help="a .pt file or hf:OWNER/REPO/FILE (default: the newest under checkpoints/, sft/ first)")
    parser.add_argument("--system", default="", help="system prompt")
    add_sampling_args(parser, SamplingSettings(temperature=0.7, top_k=50, top_p=0.9), max_tokens=512,
                      max_tokens_bound=" (at most half the context: the conversation needs the rest)")
    add_inference_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    use_one_line_warnings(PromptTruncatedWarning)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = find_newest_checkpoint()
        if checkpoint is None:
            raise PionError("no checkpoint found under checkpoints/ (looked for *.pt); pass --checkpoint PATH")
        print(f"using {checkpoint}, the newest checkpoint under checkpoints/", file=sys.stderr)
    model, device, saved = load_model(checkpoint, args.device, args.dtype)
    model = quantize(model, args.quantize)
    note = base_model_note(checkpoint, saved)
    if note:
        print(note, file=sys.stderr)
    tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    session = Session(model, tokenizer, dataclass_from_args(SamplingSettings, args), args.max_tokens,
                      seeded_generator(device, args.seed), args.compile)
    session.max_tokens = session.reply_limit(args.max_tokens)
    conversation_system = valid_text(args.system)
    conversation = Conversation(system=conversation_system)
    if args.compile:
        print(COMPILE_NOTICE, file=sys.stderr)
    print("Pion chat: /help lists the commands; Ctrl-C stops a reply; Ctrl-D or /quit exits.")
    for line in typed_lines():
        if line.startswith("/"):
            if not run_command(line, conversation, session):
                return
            continue
        if not line.strip():
            continue
        conversation.turns.append({"role": "user", "content": line})
        try:
            text = reply(session, conversation)
        except KeyboardInterrupt:
            conversation.turns.pop()
            print("\n[stopped; this exchange is left out of the conversation]")
            continue
        conversation.turns.append({"role": "assistant", "content": text})

if __name__ == "__main__":
    run_cli(main)
