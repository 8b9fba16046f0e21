"""serve.py: its flags and one-line errors, --quantize, the script serving a checkpoint until interrupted (a
real process answering the openai client), and the chat page it serves, in a real headless browser."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

try:  # the HTTP client the openai package brings: httpx2 in its newer releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

import serve
from conftest import (ROOT, assert_one_line_error, long_context_pion, run_in_process, save_tiny_checkpoint,
                      scripted_reply, serving)
from model import Linear
from quantize import Int8Linear
from server import create_app


# ---------------------------------------------------------------------------------------------------
# serve.py


def test_serve_rejects_a_bad_flag_in_one_line():
    assert_one_line_error(run_in_process(serve.main, ["--checkpoint", "x.pt", "--max_batch", "0"]), "--max_batch")


def test_serve_reports_a_missing_checkpoint_in_one_line(tmp_path):
    assert_one_line_error(run_in_process(serve.main, ["--checkpoint", tmp_path / "none.pt"]), "not found")


def test_serve_reports_a_busy_port_in_one_line_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_in_process(serve.main, ["--checkpoint", tmp_path / "none.pt", "--port", port])
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5"])
def test_serving_beyond_loopback_without_a_key_is_refused(host, monkeypatch):
    monkeypatch.delenv("PION_API_KEY", raising=False)
    result = run_in_process(serve.main, ["--checkpoint", "x.pt", "--host", host])
    assert_one_line_error(result, f"--host {host} opens the server to other machines")


def test_serving_beyond_loopback_takes_a_key_or_allow_unauthenticated(monkeypatch):
    monkeypatch.delenv("PION_API_KEY", raising=False)
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "0.0.0.0", "--api_key", "k"]).api_key == "k"
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "0.0.0.0", "--allow_unauthenticated"]).host == "0.0.0.0"
    assert serve.parse_args(["--checkpoint", "x.pt", "--host", "localhost"]).host == "localhost"


def test_serve_defaults_to_localhost_and_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PION_API_KEY", "from-env")
    args = serve.parse_args(["--checkpoint", "x.pt"])
    assert (args.host, args.port, args.max_batch, args.api_key) == ("127.0.0.1", 8000, 8, "from-env")


def apps_served(monkeypatch, checkpoint_path, tokenizer_path, *flags, output=None):
    """serve.main up to the point of serving (it returns instead): the arguments it gave create_app, as
    (engine, tokenizer, name, api_key, limits) per call. output: a list that gets what it printed."""
    import uvicorn
    calls = []
    monkeypatch.setattr(serve, "create_app", lambda *args, **kwargs: calls.append(args) or create_app(*args, **kwargs))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    result = run_in_process(serve.main, ["--checkpoint", checkpoint_path, "--tokenizer", tokenizer_path,
                                         "--port", 0, "--device", "cpu", *flags])
    assert result.returncode == 0, result.stderr
    if output is not None:
        output.append(result.stderr)
    return calls


def test_serve_with_quantize_int8_serves_an_int8_model(tiny_checkpoint, tokenizer_path, monkeypatch):
    [(engine, *_)] = apps_served(monkeypatch, tiny_checkpoint[0], tokenizer_path, "--quantize", "int8")
    layers = {type(m) for m in engine.model.modules()}  # the model the engine decodes with
    assert Int8Linear in layers and Linear not in layers


def test_default_max_tokens_is_the_reply_length_of_requests_that_name_none(tiny_checkpoint, tokenizer_path,
                                                                           monkeypatch):
    calls = apps_served(monkeypatch, tiny_checkpoint[0], tokenizer_path, "--default_max_tokens", 7)
    assert [limits.default_max_tokens for *_, limits in calls] == [7]


def test_a_non_ascii_api_key_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("PION_API_KEY", raising=False)
    result = run_in_process(serve.main, ["--checkpoint", "x.pt", "--api_key", "clé-secrète"])
    assert_one_line_error(result, "--api_key must be ASCII")


def test_a_context_too_large_for_memory_is_refused_in_one_line_naming_max_context(tmp_path, tokenizer_path):
    save_tiny_checkpoint(tmp_path / "huge.pt", max_seq_len=10**12)
    result = run_in_process(serve.main, ["--checkpoint", tmp_path / "huge.pt", "--tokenizer", tokenizer_path,
                                         "--port", 0, "--device", "cpu"])
    assert_one_line_error(result, "pass a smaller --max_context")


def test_max_context_sizes_the_cache_and_bounds_the_requests(tmp_path, tokenizer_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "huge.pt", max_seq_len=10**12)
    [(engine, *_)] = apps_served(monkeypatch, tmp_path / "huge.pt", tokenizer_path, "--max_context", 100)
    assert engine.max_seq_len == 100 and engine.kv_cache.k[0].shape[2] == 100


def test_serving_a_base_model_says_it_is_not_instruction_tuned(tmp_path, tokenizer_path, monkeypatch):
    pion = save_tiny_checkpoint(tmp_path / "base.pt")
    import checkpoint
    checkpoint.save_checkpoint(str(tmp_path / "base.pt"), {"model": pion.state_dict(), "config": pion.config,
                                                           "trainer": "pretrain"})
    output = []
    apps_served(monkeypatch, tmp_path / "base.pt", tokenizer_path, output=output)
    assert "is a pretrained base model, not instruction-tuned" in output[0]


def wait_until_serving(process, port):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    deadline = time.monotonic() + 60
    while True:
        try:
            return client, client.models.list()
        except openai.APIConnectionError:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.2)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ctrl_c_stops_serve_py_in_one_line_with_exit_code_130(tiny_checkpoint, tokenizer_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint[0], "--tokenizer",
                                tokenizer_path, "--port", str(port)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_serving(process, port)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr


@pytest.mark.slow
def test_serve_py_serves_a_checkpoint_until_interrupted(tiny_checkpoint, tokenizer_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", tiny_checkpoint[0], "--tokenizer",
                                tokenizer_path, "--port", str(port), "--max_batch", "2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client, models = wait_until_serving(process, port)
        assert [m.id for m in models.data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=4).usage.completion_tokens <= 4
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------------
# The chat page in a real browser


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_page_is_one_file_that_loads_nothing_from_elsewhere_and_runs_only_its_own_script(server):
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page.text and page.text.count("<script") == 1
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http://" not in page.text and "https://" not in page.text and "innerHTML" not in page.text
    assert httpx.get(server[0] + "/").headers["content-security-policy"] != policy  # a fresh nonce each time


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium (install it with .ci/install_browser)")
def test_the_chat_page_streams_a_reply_as_text_and_stops_it(tokenizer):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    injected = '<script>document.title = "pwned"</script><img src=x onerror="document.title = \'pwned\'">'
    reply = tokenizer.encode(f"Hello {injected} and then" + " more" * 200).ids
    scripted, asked = scripted_reply(reply, seconds_per_step=0.03), []

    def sample_rows(logits, running):
        asked.extend(run.request for run in running if run.request not in asked)
        return scripted(logits, running)

    with serving(long_context_pion(tokenizer), tokenizer, sample_rows=sample_rows) as (url, engine), \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#system", "Be brief.")
            page.fill("#max_tokens", "100")
            page.fill("#input", "Say hello")
            page.keyboard.press("Enter")
            assistant = page.locator(".message.assistant")
            sync_api.expect(assistant).to_contain_text("and then", timeout=10_000)  # streamed: not finished yet
            assert page.locator(".message.user").text_content() == "Say hello"
            assert page.locator("#stop").is_visible()
            page.click("#stop")
            page.wait_for_selector("#send", state="visible")
            stopped = assistant.text_content()
            assert stopped.startswith(f"Hello {injected} and then") and len(reply) > 100
            assert page.locator("#messages script, #messages img").count() == 0
            assert page.title() == "Pion chat"
            assert page.text_content("#status") == "stopped"
            deadline = time.monotonic() + 5
            while engine.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.active == 0  # stopping in the page freed the row
            [request] = asked  # the page sent its settings and the system prompt
            assert request.max_tokens == 100 and request.settings.temperature == 0.7
            assert "<|system|>\nBe brief.\n<|user|>\nSay hello" in tokenizer.decode(request.prompt_ids)
            time.sleep(0.2)
            assert assistant.text_content() == stopped  # nothing more arrives
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()
