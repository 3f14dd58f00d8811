"""Load test of the OpenAI-compatible server (src/serve.py): throughput against the number of
concurrent streaming clients, and that every request is answered completely.

The server runs in its own process (src/serve.py on a random GPT-2 saved as our checkpoint:
no download), the clients are threads of this process, each with the real `openai` client,
each sending --requests streaming chat requests one after the other. For each number of
clients: every request must end with a finish_reason and its usage (nothing dropped or cut);
throughput is the completion tokens of all requests over the wall time. At the end the
server must still answer, and 16 clients must get at least --min-speedup x the throughput of
one (batching: concurrent requests share decode steps).

    python scripts/bench_serving.py                      # GPT-2 small's shape, random weights
    python scripts/bench_serving.py --size imdb --clients 1,16,32 --requests 3 --repeat 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = {"tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # the tests' model
         "imdb": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # configs/imdb/sft.yaml's model
         "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)}  # GPT-2 small


def save_model(size: str, folder: Path) -> Path:
    import torch

    from gpt2rlhf.checkpoint import save_checkpoint, step_dir
    from gpt2rlhf.model import GPT, GPTConfig

    torch.manual_seed(0)
    return save_checkpoint(step_dir(folder / "checkpoints", 0), {"model": GPT(GPTConfig(**SIZES[size]))})


def start_server(checkpoint: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "src" / "serve.py"), "-p", str(checkpoint), "--model-name",
                             "bench", "--port", str(port), "--device", "cpu"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer within 120 s")


def one_client(url: str, i: int, requests: int, max_tokens: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results = []
    for j in range(requests):
        t0 = time.perf_counter()
        finish, usage, pieces, first = None, None, 0, None
        for chunk in client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": f"Tell me a story, number {i}.{j}."}],
                max_tokens=max_tokens, temperature=0.7, seed=1000 * i + j, stream=True,
                stream_options={"include_usage": True}):
            if chunk.choices:
                if chunk.choices[0].delta.content:
                    pieces += 1
                    first = first or time.perf_counter() - t0
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        results.append({"finish": finish, "tokens": usage.completion_tokens if usage else 0, "pieces": pieces,
                        "seconds": time.perf_counter() - t0, "first": first or 0.0})
    return results


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(lambda i: one_client(url, i, requests, max_tokens), range(clients)))
    wall = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    complete = [r for r in results if r["finish"] in ("stop", "length") and r["tokens"] > 0]
    tokens = sum(r["tokens"] for r in results)
    latencies = sorted(r["seconds"] for r in results)
    return {"clients": clients, "requests": len(results), "complete": len(complete), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(latencies[len(latencies) // 2], 2), "max_latency_s": round(latencies[-1], 2),
            "mean_first_token_s": round(sum(r["first"] for r in results) / len(results), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="gpt2", help="the random model's shape")
    p.add_argument("--clients", default="1,4,16,32", help="numbers of concurrent clients to measure")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--min-speedup", type=float, default=4.0, help="16 clients' throughput over 1 client's")
    p.add_argument("--repeat", type=int, default=1, help="measure every level this many times, interleaved; "
                   "report the median (on a shared machine, load from others hits the levels alike)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(save_model(args.size, Path(tmp)), args.threads)
        try:
            one_client(url, 0, 1, 4)  # warm-up
            runs = {c: [] for c in levels}
            for _ in range(args.repeat):
                for c in levels:
                    runs[c].append(run_level(url, c, args.requests, args.max_tokens))
                    print(json.dumps(runs[c][-1]), flush=True)
            rows = []
            for c in levels:  # the run of median throughput, with every run's completeness
                ordered = sorted(runs[c], key=lambda r: r["tokens_per_s"])
                median = dict(ordered[len(ordered) // 2])
                median["requests"] = sum(r["requests"] for r in runs[c])
                median["complete"] = sum(r["complete"] for r in runs[c])
                median["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs[c]]
                rows.append(median)
            health = json.load(urllib.request.urlopen(url + "/health", timeout=10))
            after = one_client(url, 0, 1, 4)[0]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    import torch

    print(f"\nserver: {args.size} ({SIZES[args.size]}), random weights, CPU, {args.threads} torch threads, "
          f"torch {torch.__version__}; {args.requests} streaming chat requests per client, max_tokens "
          f"{args.max_tokens}, temperature 0.7; median of {args.repeat} interleaved runs per level\n")
    print("| clients | requests, all runs (complete) | tokens/s (median) | x 1 client | every run's tokens/s | "
          "p50 latency s | max latency s | mean first token s |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} ({r['complete']}) | {r['tokens_per_s']} | "
              f"{r['tokens_per_s'] / base:.1f} | {', '.join(map(str, r['all_tokens_per_s']))} | {r['p50_latency_s']} | "
              f"{r['max_latency_s']} | {r['mean_first_token_s']} |")
    print(f"\nengine: {health['steps']} decode steps, {health['prefills']} prefills, {health['rows']} rows, largest batch "
          f"{health['largest_batch']}; after the load the server answered ({after['finish']}, {after['tokens']} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "engine": health}, indent=2))
    ok = all(r["complete"] == r["requests"] for r in rows) and after["finish"] in ("stop", "length")
    by_clients = {r["clients"]: r["tokens_per_s"] for r in rows}
    if 1 in by_clients and 16 in by_clients:
        speedup = by_clients[16] / by_clients[1]
        print(f"16 clients / 1 client: {speedup:.1f}x (need >= {args.min_speedup})")
        ok = ok and speedup >= args.min_speedup
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
