"""chat.py: history rendering and truncation, commands, checkpoint picking, and a real terminal session."""
import io
import os
import signal
import sys
import time
import warnings

import pexpect
import pytest
import torch

import chat
from chat_template import CHAT_TURN, render_conversation
import decoding
from tokenizer import EOS_ID
from conftest import ROOT, run_in_process
from decoding import SamplingSettings, generate_text
from conftest import tiny_model
from checkpoint import save_checkpoint
from cli import PionError


@pytest.fixture(scope="module")
def tiny_chat_model():
    # A long context, so a reply can run for seconds when the Ctrl-C test needs it to.
    return tiny_model(vocab_size=50258, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=4096)


@pytest.fixture(scope="module")
def checkpoint(tiny_chat_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "tiny.pt")
    save_checkpoint(path, {"model": tiny_chat_model.state_dict(), "config": tiny_chat_model.config})
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------
# History


def test_the_prompt_is_the_whole_conversation_in_the_sft_template(tokenizer):
    conversation = chat.Conversation("Be brief.", [user("Hi"), assistant("Hello!"), user("How are you?")])
    ids = chat.conversation_prompt(tokenizer, conversation, budget=1000)
    expected = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nHow are you?\n<|assistant|>\n"
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected.replace("Hello!\n", "Hello!\n<|endoftext|>")


def test_history_truncation_drops_the_oldest_exchanges_but_never_the_system_prompt_or_the_current_turn(tokenizer):
    turns = [user("first question " * 5), assistant("first answer " * 5),
             user("second question"), assistant("second answer"), user("the current question")]
    conversation = chat.Conversation("System.", turns)
    system = [{"role": "system", "content": "System."}]

    def rendered(kept):
        return render_conversation(tokenizer, system + kept, add_generation_prompt=True)[0]

    assert chat.conversation_prompt(tokenizer, conversation, 1000) == rendered(turns)
    fits_last_exchange = len(rendered(turns[2:]))
    assert chat.conversation_prompt(tokenizer, conversation, fits_last_exchange) == rendered(turns[2:])
    assert chat.conversation_prompt(tokenizer, conversation, fits_last_exchange - 1) == rendered(turns[4:])
    assert chat.conversation_prompt(tokenizer, conversation, 1) == rendered(turns[4:])  # the current turn stays


# ---------------------------------------------------------------------------------------------------
# Commands and checkpoint picking


def session(model=None, tokenizer=None, **settings):
    return chat.Session(model, tokenizer, SamplingSettings(**settings), max_tokens=100)


def test_a_reply_is_its_turn_s_content(tiny_chat_model, tokenizer, monkeypatch, capsys):
    # Where a reply ends, and which "\n" is the template's, is decoding.TextStream's rule with
    # chat_template.CHAT_TURN (tests/test_decoding.py): here, that chat.py's reply is that content.
    tokens = iter(tokenizer.encode("Hello there\n").ids + [EOS_ID])
    monkeypatch.setattr(decoding, "sample_next_token", lambda *args: torch.tensor([next(tokens)]))
    assert chat.reply(session(tiny_chat_model, tokenizer, temperature=0), chat.Conversation(turns=[user("Hi")])) == \
        "Hello there"


def test_commands_change_settings_and_bad_values_change_nothing(capsys):
    conversation = chat.Conversation("", [user("Hi"), assistant("Hello")])
    s = session(temperature=0.7, top_k=50, top_p=0.9)
    for line in ["/temp 0.5", "/topk 3", "/topp 0.5", "/minp 0.1", "/penalty 1.2", "/tokens 20"]:
        assert chat.run_command(line, conversation, s)
    expected = SamplingSettings(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.2)
    assert s.settings == expected and s.max_tokens == 20
    capsys.readouterr()
    for line in ["/temp abc", "/temp -1", "/topk 1.5", "/topp 0", "/minp 2", "/penalty 0", "/tokens 0"]:
        assert chat.run_command(line, conversation, s)
        assert capsys.readouterr().out.startswith("usage: " + line.split()[0] + " N")
    assert s.settings == expected and s.max_tokens == 20
    chat.run_command("/temp", conversation, s)
    chat.run_command("/tokens", conversation, s)
    assert capsys.readouterr().out == "temperature = 0.5\nmax_tokens = 20\n"
    chat.run_command("/system Be kind.", conversation, s)
    chat.run_command("/reset", conversation, s)
    assert conversation == chat.Conversation("Be kind.", [])
    assert not chat.run_command("/quit", conversation, s)


def test_the_newest_checkpoint_is_picked_sft_ones_first(tmp_path):
    def write(relative, mtime):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
        return str(path)

    assert chat.find_newest_checkpoint(str(tmp_path)) is None
    write("nano/pion_100.pt", 100)
    newest = write("nano/pion_200.pt", 200)
    assert chat.find_newest_checkpoint(str(tmp_path)) == newest
    write("sft/pion_sft_1.pt", 10)
    newest_sft = write("sft/pion_sft_2.pt", 20)
    assert chat.find_newest_checkpoint(str(tmp_path)) == newest_sft


def test_without_checkpoint_it_uses_the_newest_and_says_which(checkpoint, tmp_path, monkeypatch, capsys,
                                                              tokenizer_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() changes it
    with pytest.raises(PionError, match="no checkpoint found under checkpoints/"):
        chat.main([])
    os.makedirs("checkpoints/sft")
    os.symlink(checkpoint, "checkpoints/sft/pion_sft_final.pt")
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    chat.main(["--tokenizer", tokenizer_path])
    assert "using checkpoints/sft/pion_sft_final.pt" in capsys.readouterr().err


def test_a_base_model_is_named_as_one_and_finetune_is_suggested(tiny_chat_model, tmp_path, monkeypatch,
                                                                tokenizer_path):
    path = tmp_path / "pion_nano_final.pt"
    save_checkpoint(path, {"model": tiny_chat_model.state_dict(), "config": tiny_chat_model.config,
                             "trainer": "pretrain"})
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    result = run_in_process(chat.main, ["--checkpoint", path, "--tokenizer", tokenizer_path])
    assert "pretrained base model, not instruction-tuned" in result.stderr
    assert f"python finetune.py --checkpoint {path}" in result.stderr


# ---------------------------------------------------------------------------------------------------
# A real terminal session


def prompt_tokens(child):
    """Wait for the end of a reply; -> how many prompt tokens it was generated from."""
    child.expect(r"tokens x 1 row\(s\); prefill of (\d+) tokens")
    tokens = int(child.match.group(1))
    child.expect_exact(">>> ")
    return tokens


def test_a_terminal_session(checkpoint, tiny_chat_model, tokenizer, tokenizer_path):
    # SIGINT at its default, as in a terminal: a suite started in the background (`cmd &` in a script)
    # passes SIGINT on ignored, and Ctrl-C would then never reach chat.py.
    child = pexpect.spawn(sys.executable, ["chat.py", "--checkpoint", checkpoint, "--temperature", "0",
                                           "--max_tokens", "8", "--tokenizer", tokenizer_path], cwd=ROOT,
                          encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact(">>> ")
        child.sendline("/temp 0.5")
        child.expect_exact("temperature = 0.5")
        child.sendline("/temp abc")
        child.expect_exact("usage: /temp N")
        child.sendline("/temp 0")
        child.expect_exact("temperature = 0")
        child.sendline("/help")
        child.expect_exact("/reset")

        # Two turns: the second prompt is the first exchange (with the reply the model gave) + the new turn.
        child.sendline("Hello there")
        first = [user("Hello there")]
        assert prompt_tokens(child) == len(render_conversation(tokenizer, first, add_generation_prompt=True)[0])
        first_reply = generate_text(tiny_chat_model, tokenizer, render_conversation(tokenizer, first, True)[0], 8,
                                    turn=CHAT_TURN)[0]
        child.sendline("And then?")
        second = first + [assistant(first_reply), user("And then?")]
        assert prompt_tokens(child) == len(render_conversation(tokenizer, second, add_generation_prompt=True)[0])

        child.sendline("/reset")
        child.expect_exact("new conversation")
        child.sendline("/tokens 4000")
        child.expect_exact("replies stop at 2048")
        child.expect_exact("max_tokens = 2048")
        child.sendline("Tell me a long story")
        child.expect_exact("Tell me a long story\r\n")
        child.expect(r"[\s\S]{20}")  # the reply is streaming...
        time.sleep(0.3)
        child.sendintr()  # ...and Ctrl-C stops it
        child.expect_exact("[stopped; this exchange is left out of the conversation]")
        child.expect_exact(">>> ")

        child.sendline("/tokens 4")
        child.sendline("Hi")  # the interrupted exchange is not in the history
        assert prompt_tokens(child) == len(render_conversation(tokenizer, [user("Hi")], True)[0])

        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.slow
def test_a_long_paste_reaches_the_model_whole(checkpoint, tokenizer, tokenizer_path):
    """A 20,000-character line: the terminal's canonical mode would cut it at 4,095; readline does not."""
    message = " ".join(f"word{i}" for i in range(3000))[:20000]
    child = pexpect.spawn(sys.executable, ["chat.py", "--checkpoint", checkpoint, "--temperature", "0",
                                           "--max_tokens", "4", "--tokenizer", tokenizer_path], cwd=ROOT,
                          encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline(message)
        expected = render_conversation(tokenizer, [user(message)], add_generation_prompt=True)[0]
        assert prompt_tokens(child) == len(expected)
    finally:
        child.close(force=True)
