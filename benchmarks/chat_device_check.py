"""Device check of the chat command on a GPU (or any device): one script, one call, about a minute.

    PYTHONPATH=. python benchmarks/chat_device_check.py MODEL_DIR [--device cuda]

MODEL_DIR: any save_pretrained directory with a chat template (tests' `save_tiny_model_dir` writes a 28 MB one that
travels to a device machine). Checks, for float32 and bfloat16: `rollout.stream` draws what `rollout.sample` draws
(greedy and sampled), a 4-turn conversation on the kept KV cache equals fresh caches, and streaming speed; then
`--prompt` through the CLI, and `--web` with 20 concurrent clients of which half hang up, and Ctrl-C mid-reply.
Prints one line per check; exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import torch

from integration_training.models import load_model, load_tokenizer
from integration_training.rollout import SamplingSettings, SpecialTokens, StreamCache, sample, stream
from integration_training.template import render_prompt, stop_token_ids

CHAT = [sys.executable, "-m", "integration_training.chat"]


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def engine_checks(model_dir: str, device: str) -> bool:
    tokenizer = load_tokenizer(model_dir)
    stops = stop_token_ids(tokenizer)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "héllo 世界"}])
    ok = True
    for dtype in ("float32", "bfloat16"):
        model = load_model(model_dir, dtype, "sdpa", torch.device(device), training=False).eval()

        def gen(seed: int) -> torch.Generator:
            return torch.Generator(device=device).manual_seed(seed)

        for temperature in (0.0, 1.0):
            streamed = list(stream(model, prompt, 64, temperature, 0, stops, gen(1), StreamCache()))
            settings = SamplingSettings(max_new_tokens=64, temperature=temperature, top_k=0, batch_size=1)
            batch = sample(model, [prompt], num_samples=1, settings=settings,
                           special=SpecialTokens(stop_ids=stops, pad_id=0), generator=gen(1),
                           greedy_first=False)[0][0].token_ids
            ok &= check(f"{dtype} temperature {temperature}: stream draws what sample draws", streamed == batch)
        kept, conversation, same = StreamCache(), prompt, True
        for turn in range(4):
            reply = list(stream(model, conversation, 32, 0.0, 0, stops, gen(turn), kept))
            same &= reply == list(stream(model, conversation, 32, 0.0, 0, stops, gen(turn), StreamCache()))
            conversation = conversation + reply + prompt[-5:]
        ok &= check(f"{dtype}: 4 turns on the kept cache equal fresh caches", same)
        for _ in range(2):  # the first pass warms up kernels
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = len(list(stream(model, prompt, 256, 1.0, 0, frozenset(), gen(2), StreamCache())))
            seconds = time.perf_counter() - start
        check(f"{dtype}: streamed {n} tokens", True, f"{seconds:.2f} s, {n / seconds:.0f} tokens/s")
    return ok


def cli_checks(model_dir: str, device: str) -> bool:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    once = subprocess.run(CHAT + [model_dir, "--device", device, "--dtype", "bfloat16", "--prompt", "héllo",
                                  "--temperature", "0", "--max-new-tokens", "40"], capture_output=True, text=True, env=env)
    ok = check("--prompt", once.returncode == 0 and bool(once.stdout.strip()), repr(once.stdout[:60]))
    server = subprocess.Popen(CHAT + [model_dir, "--device", device, "--web", "--port", "0", "--temperature", "0",
                                      "--max-new-tokens", "200"], stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while not line.startswith("serving"):
        line = server.stderr.readline()
        assert line, "the server died before serving"
    host, port = line.split("/")[2].split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    results: list[tuple[int, str, str]] = []

    def client(i: int) -> None:
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.sendall(f"POST /api/chat HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            stream_file, kinds, texts = sock.makefile("rb"), [], []
            while line := stream_file.readline():
                if line.startswith(b"event: "):
                    kinds.append(line[7:].strip().decode())
                elif line.startswith(b"data: ") and kinds[-1] == "text":
                    texts.append(json.loads(line[6:])["text"])
                    if i % 2:
                        break  # hang up mid-reply
            stream_file.close()
        results.append((i, kinds[-1], "".join(texts)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    time.sleep(2)  # the last hang-up is noticed at the server's next piece
    info = json.loads(urllib.request.urlopen(f"http://{host}:{port}/api/info").read())
    done = [r for r in results if r[1] == "done"]
    ok &= check("--web: 20 clients, half hanging up", len(done) == 10 and len({r[2] for r in done}) == 1
                and info["queue"] == 0 and info["abandoned"] == 10,
                str({k: info[k] for k in ("device", "dtype", "queue", "delivered", "abandoned", "tokens")}))
    threading.Thread(target=client, args=(0,), daemon=True).start()
    time.sleep(1.0)
    server.send_signal(signal.SIGINT)
    ok &= check("--web: Ctrl-C mid-reply exits 0", server.wait(timeout=60) == 0)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    print(f"torch {torch.__version__} on {name}", flush=True)
    ok = engine_checks(args.model_dir, args.device)
    ok &= cli_checks(args.model_dir, args.device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
