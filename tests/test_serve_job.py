"""jobs/serve.py: the real SmolLM2 with a random LoRA adapter on the default backend (ray.serve.llm), driven with
the official `openai` client (streaming, n, stop, logprobs, content parts, text completions, 400 refusals), over
HTTP and through the chat page in a headless Chromium, then stopped with Ctrl-C. One server process serves the
slow tests (starting a vLLM engine costs about a minute on CPU). Bad inputs stop before anything starts, and
rayalign's own route refuses what it does not support (fast tests)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, load_job
from rayalign import config as C

PROMPT = "Suggest a vegetarian dinner."


# --------------------------------------------------------------------------------------------------------------
# Fast: config, inputs, the page file
# --------------------------------------------------------------------------------------------------------------


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # only what the job prints
    try:
        code = load_job("serve.py").main(args)
    except SystemExit as e:  # config errors exit from parse_job_config
        code = e.code
    return code, capsys.readouterr().err.strip()


def _fake_model(path: Path) -> Path:
    """Enough of an HF directory for resolve_model (nothing loads it)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _fake_adapter(path: Path, rank: int = 8) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_serve_config_documents_every_field():
    job = load_job("serve.py")
    for cls in (job.ServeJobConfig, job.ServeConfig):
        docs = C.field_docs(cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(cls)), cls.__name__
    assert job.ServeJobConfig().serve.host == "127.0.0.1"


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    base = _fake_model(tmp_path / "base")
    (tmp_path / "plain").mkdir()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    cases = {
        (f"serve.adapter={tmp_path / 'missing'}",): "does not exist",
        (f"serve.adapter={tmp_path / 'plain'}",): "not a peft adapter directory",
        (f"serve.adapter={weightless}",): "no adapter_model.safetensors",
        (f"serve.adapter={_fake_adapter(tmp_path / 'rank0', rank=0)}",): "is not a LoRA adapter",
        ("serve.adapter=x", "serve.run_id=y"): "set one of them",
        ("serve.port=0",): "serve.port",
        (f"model.name={tmp_path / 'no-such-model'}",): "is not an embedded model",
        (f"model.name={_fake_adapter(tmp_path / 'an-adapter')}",): "is a LoRA adapter, not a model",
    }
    for args, expected in cases.items():
        code, err = _run_main([f"model.name={base}", *args], capsys)
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (args, err)


def test_run_ids_resolve_to_the_saved_model_or_exit_2(tmp_path, capsys, monkeypatch):
    import mlflow

    job = load_job("serve.py")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err = _run_main(["serve.run_id=0123abcd"], capsys)
    assert code == 2 and "no MLflow store" in err, err

    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("rayalign-ppo", artifact_location=(tmp_path / "artifacts").as_uri())
    base = _fake_model(tmp_path / "base")

    def run(name: str, **artifacts: Path) -> str:
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(run_id, "model.name", str(base))
        for kind, path in artifacts.items():
            client.log_artifacts(run_id, str(path), f"model/{kind}")
        client.set_terminated(run_id)
        return run_id

    lora_run = run("ppo-lora", adapter=_fake_adapter(tmp_path / "adapter", rank=12),
                   merged=_fake_model(tmp_path / "merged"))
    full_run = run("ppo-full", merged=_fake_model(tmp_path / "full"))
    empty_run = run("ppo-crashed")

    cfg = job.ServeJobConfig(serve=job.ServeConfig(run_id=lora_run))
    served = job.resolve_served(cfg, tmp_path / "download")
    assert served.adapter is not None and (served.adapter / "adapter_config.json").is_file()
    assert served.adapter.is_relative_to(tmp_path / "download")
    assert (served.model_path, served.lora_rank, served.name) == (str(base.resolve()), 12, "ppo-lora")  # the run's own base

    served = job.resolve_served(dataclasses.replace(cfg, serve=job.ServeConfig(run_id=full_run)), tmp_path / "dl2")
    assert served.adapter is None and (Path(served.model_path) / "config.json").is_file()

    for run_id, expected in ((empty_run, "has no model/adapter or model/merged"), ("0123abcd", "no MLflow run")):
        code, err = _run_main([f"serve.run_id={run_id}"], capsys)
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("change, reason", [
    ({"seed": 2**70}, "seed in [0, 2^63)"), ({"temperature": float("nan")}, "temperature in [0, 2]"),
    ({"temperature": 3}, "temperature in [0, 2]"), ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": 1.5}, "'max_tokens' must be a number"), ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0] must be"),
    # what the rollout engines' route does not do is refused, never dropped
    ({"stream": True}, "'stream': this route answers whole responses only"),
    ({"n": 2}, "'n': this route returns one choice per request"),
    ({"logprobs": True, "tools": []}, "unsupported request field(s): logprobs, tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts are supported, got 'image_url'"),
    ({"stop": [""]}, "'stop' must be a string or a list of up to 4 non-empty strings"),
])
def test_chat_requests_are_validated(change, reason):
    from rayalign.config import SamplingConfig
    from rayalign.rollout.serve import parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **change}
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_chat_request(body, SamplingConfig())
    messages, sampling = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "seed": 7,
                                             "temperature": 2, "model": "any", "stop": "."}, SamplingConfig())
    assert sampling.seed == 7 and sampling.temperature == 2.0 and sampling.n == 1 and sampling.stop == (".",)
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]  # what many clients send
    messages, _ = parse_chat_request({"messages": [{"role": "user", "content": parts}]}, SamplingConfig())
    assert messages == [{"role": "user", "content": "Hello, world"}]


def test_ray_serve_llm_config_follows_the_engine_settings():
    from rayalign.config import EngineConfig, ModelConfig, SamplingConfig
    from rayalign.rollout.serve_llm import llm_config

    cpu = llm_config("/m", "smol", ModelConfig(dtype="float32"), EngineConfig(max_model_len=512),
                     defaults=SamplingConfig(temperature=0.5, max_new_tokens=24))
    assert cpu["model_loading_config"] == {"model_id": "smol", "model_source": "/m"}
    assert cpu["engine_kwargs"]["distributed_executor_backend"] == "mp"  # vLLM's CPU platform refuses Ray's
    assert cpu["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}  # else the engine stage asks for a GPU
    assert cpu["engine_kwargs"]["override_generation_config"]["max_new_tokens"] == 24
    gpu = llm_config("/m", "big", ModelConfig(dtype="bfloat16"), EngineConfig(
        num_engines=2, tensor_parallel_size=4, num_gpus=4, num_cpus=8, accelerator_type="H100"),
        lora_path="s3://bucket/adapters", max_lora_rank=64)
    assert gpu["placement_group_config"] == {"bundles": [{"CPU": 2.0, "GPU": 1}] * 4, "strategy": "STRICT_PACK"}
    assert gpu["deployment_config"] == {"num_replicas": 2} and gpu["accelerator_type"] == "H100"
    assert gpu["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/adapters"}
    from ray.serve.llm import LLMConfig

    for c in (cpu, gpu):
        LLMConfig.model_validate(c)
    with pytest.raises(C.ConfigError, match="serve.lora_path"):
        C.load_config(load_job("serve.py").ServeJobConfig, None, ["serve.lora_path=/local/dir"])


def test_the_chat_page_is_self_contained():
    import importlib.resources

    page = importlib.resources.files("rayalign.rollout").joinpath("chat.html").read_text()
    assert "://" not in page and "<link" not in page and " src=" not in page  # nothing fetched from elsewhere
    assert 'id="input"' in page and 'id="send"' in page and "/chat/completions" in page


# --------------------------------------------------------------------------------------------------------------
# Slow: one real server for the rest of the module
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    url: str
    """Base URL of the server, e.g. http://127.0.0.1:PORT: the OpenAI API at /v1, the chat page at /chat/."""
    port: int
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever the job left behind (it ran in its own session, its local Ray with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_path) -> Path:
    """A random LoRA adapter on the embedded model (r=8, not zero-initialised, so it changes what the model says)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dir):
    workdir = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log_path = workdir / "serve.log"
    args = [f"serve.adapter={adapter_dir}", f"serve.port={port}", "sampling.max_new_tokens=24",
            "engine.max_model_len=512"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), *args], cwd=workdir,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", port, log_path)
    try:
        deadline = time.time() + 600
        while not _answers(f"{server.url}/v1/models"):
            assert proc.poll() is None, server.tail()
            assert time.time() < deadline, "jobs/serve.py did not answer within 10 minutes\n" + server.tail()
            time.sleep(2)
        yield server
    finally:
        _kill_session(proc)


def _outbound_ip() -> str | None:
    """This machine's address on its network (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.slow
def test_chat_completion_over_http(server):
    body = {"model": _model_id(server), "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
    assert reply["choices"][0]["message"]["content"].strip(), reply
    assert reply["model"].endswith("/adapter")  # named after the adapter's directory (merged into its base)

    # a conversation longer than the engine's context: vLLM refuses it, the route answers 400 in one line
    body["messages"][0]["content"] = "lentils " * 3000
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=300)
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["error"]["message"]
    assert "\n" not in message and "length" in message, message

    ip = _outbound_ip()
    if ip is not None:  # bound to 127.0.0.1 only: not reachable on the machine's own network address
        with pytest.raises(OSError), socket.create_connection((ip, server.port), timeout=5):
            pass


def _model_id(server: Server) -> str:
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


@pytest.mark.slow
def test_the_openai_client_gets_what_it_asks_for(server):
    """The calls a user makes with the official client: each one honoured, or refused with a 400."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    model = _model_id(server)
    ask = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content.strip() and plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and streamed == plain.choices[0].message.content  # greedy: the same answer, in pieces

    two = client.chat.completions.create(model=model, messages=ask, max_tokens=8, n=2, seed=1)
    assert len(two.choices) == 2 and {c.index for c in two.choices} == {0, 1}

    stopped = client.chat.completions.create(model=model, messages=ask, max_tokens=24, temperature=0, stop=[" "])
    assert " " not in stopped.choices[0].message.content.strip() and stopped.choices[0].finish_reason == "stop"

    scored = client.chat.completions.create(model=model, messages=ask, max_tokens=4, temperature=0, logprobs=True,
                                            top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert len(tokens) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    assert all(t.logprob <= 0 for t in tokens)

    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]  # content as a list of parts
    assert client.chat.completions.create(model=model, messages=parts, max_tokens=12,
                                          temperature=0).choices[0].message.content == plain.choices[0].message.content

    text = client.completions.create(model=model, prompt="Lentils are", max_tokens=8, temperature=0)
    assert text.choices[0].text.strip() and text.usage.completion_tokens <= 8

    # a field the server does not know is refused, not dropped: vLLM alone would answer and ignore it
    with pytest.raises(openai.BadRequestError, match="unsupported request field.*frobnicate"):
        client.chat.completions.create(model=model, messages=ask, max_tokens=4, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError):  # more than the context holds
        client.chat.completions.create(model=model, messages=ask, max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ask, max_tokens=4)


@pytest.mark.slow
def test_the_openai_judge_backend_scores_through_the_served_app(server):
    """How a PPO run uses a judge hosted on ray.serve.llm (cluster/rayservice.yaml): judge.backend=openai by URL.
    Both modes reach the app and read its replies (score: the number it wrote; logprob: P(yes) from top_logprobs)."""
    from rayalign.judge.reward import build_judge

    answers = ["Try a lentil and mushroom shepherd's pie.", "Grill a steak with pepper sauce."]
    for mode in ("score", "logprob"):
        judge = build_judge(C.JudgeConfig(backend="openai", url=f"{server.url}/v1", endpoint_model=_model_id(server),
                                          mode=mode, timeout_s=120))
        try:
            judgements = judge.judge([PROMPT] * 2, answers)
        finally:
            judge.shutdown()
        assert len(judgements) == 2
        for j in judgements:  # a reply for each; a 135M judge may write no number, which is counted, never a 0
            assert j.raw or j.error, j
            assert (j.score is None) == (j.reward is None) and (j.score is None or 0 <= j.score <= 1)
            assert j.error is None or "HTTP" not in j.error, j.error  # the transport itself never failed
        if mode == "logprob":
            assert all(j.score is not None for j in judgements), judgements


@pytest.mark.slow
def test_chat_page_in_a_headless_browser(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs chromium and chromedriver on PATH (scripts/dev.sh test installs Debian's with apt, "
                    "which failed or was unavailable here)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    screenshot = tmp_path / "chat_page.png"
    try:
        browser.get(f"{server.url}/chat/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text)  # the page reached the API
        assert browser.find_element(By.ID, "model").text.endswith("/adapter")

        def replies(count: int):
            WebDriverWait(browser, 300).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant")) >= count
                or b.find_elements(By.CSS_SELECTOR, ".error"))
            errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".error")]
            assert not errors, errors
            return browser.find_elements(By.CSS_SELECTOR, ".assistant")

        browser.find_element(By.ID, "input").send_keys(PROMPT)
        browser.find_element(By.ID, "send").click()
        first = replies(1)[0]
        assert " tokens · " in first.text and first.text.split("tokens · ")[0].strip()
        browser.find_element(By.ID, "input").send_keys("And a dessert?", Keys.ENTER)  # Enter sends too
        replies(2)
        # the page keeps the whole conversation and posts all of it with every message
        assert browser.execute_script("return conversation.map(m => m.role)") == ["user", "assistant"] * 2
        browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("RAYALIGN_TEST_ARTIFACTS"):
        artifacts = Path(os.environ["RAYALIGN_TEST_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, artifacts / "chat_page.png")


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(server):
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=180) == 0, server.tail()
    assert "stopping" in server.log.read_text()
    assert not _answers(f"{server.url}/v1/models")
