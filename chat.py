"""Chat with a Pion checkpoint in the terminal.

    python chat.py                                   # the newest checkpoint under checkpoints/, sft/ first
    python chat.py --checkpoint PATH --system "You answer in one sentence."

The conversation is rendered with sft_data.render_conversation, the template the SFT model was tuned on,
and each reply is streamed by generate.py's generate_text. It ends at <|endoftext|> or where the model
starts the user's next turn. Ctrl-C stops a reply; that exchange is then left out of the conversation,
so the next message continues from the last complete reply. /help lists the commands.
"""
import argparse
import glob
import os
import sys
from dataclasses import dataclass, field

from generate import (DTYPES, ArgumentParser, generate_text, load_model, seeded_generator, setting, speed_report,
                      typed_lines, use_one_line_warnings)
from model import PionError, load_tokenizer, run_cli
from sft_data import TURN_SUFFIX, USER_MARKER, render_conversation

HELP = """\
/temp N       sampling temperature, a number >= 0 (0 = greedy)
/topk N       sample from the N most likely tokens, an integer >= 0 (0 = off)
/topp N       nucleus sampling, a number in (0, 1] (1 = off)
/tokens N     the longest reply in tokens, an integer >= 1
/system TEXT  set the system prompt (/system alone removes it)
/reset        start a new conversation (the system prompt stays)
/help         this list
/quit         exit (Ctrl-D too); Ctrl-C stops a reply"""

SETTING_COMMANDS = {"/temp": "temperature", "/topk": "top_k", "/topp": "top_p", "/tokens": "max_tokens"}


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


def run_command(line, conversation, settings):
    """Apply one /command, printing what it did; False means quit. A bad value changes nothing."""
    command, _, value = line.strip().partition(" ")
    value = value.strip()
    if command in SETTING_COMMANDS:
        name = SETTING_COMMANDS[command]
        try:
            settings[name] = setting(name)(value)
            print(f"{name} = {settings[name]}")
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


def reply(model, tokenizer, conversation, settings, generator, compile=False):
    """Stream the model's reply to the conversation's last turn; returns it as the template stores it."""
    budget = model.config.max_seq_len - settings["max_tokens"]
    prompt_ids = conversation_prompt(tokenizer, conversation, budget)

    def show(row, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    stats = {}
    text = generate_text(model, tokenizer, prompt_ids, settings["max_tokens"], stop_strings=(USER_MARKER,),
                         on_text=show, temperature=settings["temperature"], top_k=settings["top_k"],
                         top_p=settings["top_p"], generator=generator, stats=stats, compile=compile)[0]
    if not text.endswith("\n"):
        print()
    print(speed_report(stats), file=sys.stderr)
    # A reply is rendered as content + TURN_SUFFIX + <|endoftext|>: the suffix the model wrote is not content.
    return text.removesuffix(TURN_SUFFIX)


def parse_args(argv=None):
    parser = ArgumentParser(description="Chat with a Pion checkpoint.")
    parser.add_argument("--checkpoint", default=None,
                        help="a .pt file or hf:OWNER/REPO/FILE (default: the newest under checkpoints/, sft/ first)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--temperature", type=setting("temperature"), default=0.7, help="0 = greedy")
    parser.add_argument("--top_k", type=setting("top_k"), default=50, help="0 = off")
    parser.add_argument("--top_p", type=setting("top_p"), default=0.9, help="1 = off")
    parser.add_argument("--max_tokens", type=setting("max_tokens"), default=512, help="the longest reply")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same replies")
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    use_one_line_warnings()
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = find_newest_checkpoint()
        if checkpoint is None:
            raise PionError("no checkpoint found under checkpoints/ (looked for *.pt); pass --checkpoint PATH")
        print(f"using {checkpoint}, the newest checkpoint under checkpoints/", file=sys.stderr)
    model, device = load_model(checkpoint, args.device, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer)
    generator = seeded_generator(device, args.seed)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens)
    conversation = Conversation(system=args.system)
    print("Pion chat: /help lists the commands; Ctrl-C stops a reply; Ctrl-D or /quit exits.")
    for line in typed_lines():
        if line.startswith("/"):
            if not run_command(line, conversation, settings):
                return
            continue
        if not line.strip():
            continue
        conversation.turns.append({"role": "user", "content": line})
        try:
            text = reply(model, tokenizer, conversation, settings, generator, compile=args.compile)
        except KeyboardInterrupt:
            conversation.turns.pop()
            print("\n[stopped; this exchange is left out of the conversation]")
            continue
        conversation.turns.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    run_cli(main)
