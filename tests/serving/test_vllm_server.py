"""`vllm serve JOINT_DIR` on 127.0.0.1: /v1/completions answers with the joint model (JointLM's greedy tokens)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.serving.conftest import ENGINE, LMBDA, MEMORY_TEMP, vllm  # noqa: F401  (vllm: skips without it)

from models import load_memory  # noqa: E402
from models.joint import JointLM  # noqa: E402

STARTUP_SECONDS = 900  # a cold start on 2 busy cores takes minutes
PROMPT = [5, 7, 9, 11, 3, 20, 21]
NEW = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """``vllm serve`` of the tiny joint directory, one process (engine in-process, ``uni`` executor)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(tiny["joint_dir"]), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", ENGINE["dtype"], "--enforce-eager", "--max-model-len",
               str(ENGINE["max_model_len"]), "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
               "--distributed-executor-backend", "uni"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer /health in {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_completions_answer_with_the_joint_model(tiny, server):
    reply = post(f"{server}/v1/completions", {"model": str(tiny["joint_dir"]), "prompt": PROMPT, "max_tokens": NEW,
                                              "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                                              "logprobs": 1})
    choice = reply["choices"][0]
    joint = JointLM(tiny["base"], load_memory(str(tiny["memory_dir"])), lmbda=LMBDA, knn_temp=MEMORY_TEMP)
    expected = joint.generate(input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT)).long(),
                              max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(PROMPT):]
    assert choice["token_ids"] == expected.tolist()
    assert choice["text"].strip() == tiny["tokenizer"].decode(expected).strip()  # vLLM decodes after the prompt
    first = joint.log_probs(torch.tensor([PROMPT]))[0, -1, expected[0]].item()
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(first, abs=1e-4)
