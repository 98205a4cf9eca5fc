"""`storyengine bench serve`: the naive baseline against the batching scheduler.

The same workload goes through both in one run: M continuation requests from N
simulated channels (each channel sends its next request when the last one is answered),
mixed prompt lengths, mixed sampling parameters, and three adapters (the base model and
two LoRA adapters). Every request decodes exactly `max_new_tokens` tokens, so both sides
do the same work.

With `best_of` > 1, a third run serves the same workload with every sampling request
asking for that many candidates (`submit_many`: one shared prefill); greedy requests
stay single. Its batch bound is the scheduler's times n, so that the channels' rows fit
as they do in the scheduler's run. A request's latency is when its last candidate
finishes; its time to first token, when its candidates start (together); tokens/s
counts every candidate's tokens.

With `remote`, one more run sends the workload over HTTP to a completions service
(`storyengine serve`) through the `RemoteGenerator`, streamed, as `STORY_GENERATOR_URL`
does: `local` starts one on this machine with the same model and batch bound (what the
HTTP hop costs), a URL uses that one (its base model only: the workload's adapters are
this process's).
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..sampling import PRESETS, SamplingParams
from ..serving.generation import BASE_ADAPTER, GenerationRequest, Generator, SequentialGenerator
from ..serving.modeling import LoadedModel
from ..serving.scheduler import BatchingGenerator, SchedulerConfig
from .configs import ServeBenchConfig

_STORY = (
    "Once upon a time, in a small village by the sea, there lived a girl named Mia. "
    "Every morning she walked to the harbour to watch the fishing boats come home. "
    "One day she found a tiny blue crab stuck in a net, and she set it free. "
    "The crab waved a claw at her and ran back into the water. "
    "That night, Mia dreamed of a city under the waves where the crabs had a king. "
    "When she woke up, there was a shiny shell on her windowsill. "
)
PROMPT_LENGTHS = (16, 64, 160, 320)
ADAPTERS = (BASE_ADAPTER, "lora_a", "lora_b")


@dataclass
class RequestTiming:
    ttft_s: float
    latency_s: float
    tokens: int


def build_model(kind: str, device: str) -> LoadedModel:
    """The bundled model, or GPT-2 small's architecture with random weights, with two
    random LoRA adapters attached."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ..config import Settings, bundled_model_path
    from ..serving.modeling import load_model

    if kind == "default":
        loaded = load_model(Settings(device=device))
        base, tokenizer, model_id = loaded.model, loaded.tokenizer, loaded.model_id
    elif kind == "gpt2-config":
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
        base = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0))
        model_id = "random:gpt2-124M"
    else:
        raise ValueError(f"unknown model {kind!r}")
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base = base.to(dev, dtype=dtype).eval()  # pyright: ignore[reportArgumentType]
    lora = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        "init_lora_weights": False,
    }  # random, so adapters differ
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="lora_a")
    model.add_adapter("lora_b", LoraConfig(**lora))
    model = model.to(dev, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, model_id, "lora_a", dev)


def build_workload(
    model: LoadedModel, requests: int, max_new_tokens: int
) -> list[GenerationRequest]:
    story_ids = model.encode(_STORY * 8)
    styles = [
        SamplingParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0),
        PRESETS["balanced"].params,
        PRESETS["gentle"].params,
        PRESETS["wild"].params,
    ]
    workload = []
    for i in range(requests):
        length = PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        offset = (i * 7) % 40
        params = styles[i % len(styles)].replace(max_new_tokens=max_new_tokens, seed=1000 + i)
        workload.append(
            GenerationRequest(
                story_ids[offset : offset + length],
                params,
                adapter=ADAPTERS[i % len(ADAPTERS)],
                min_new_tokens=max_new_tokens,
            )
        )
    return workload


async def run_workload(
    generator: Generator,
    workload: list[GenerationRequest],
    concurrency: int,
    best_of: int = 1,
    *,
    task: str | None = None,
) -> tuple[dict[str, float], list[list[int]]]:
    """Run the workload; each request's timing, and its tokens (best-of-n: the first
    candidate's, which is the request itself). With `task`, show its progress
    (`storyengine.progress`) by requests answered."""
    timings: list[RequestTiming | None] = [None] * len(workload)
    outputs: list[list[int]] = [[] for _ in workload]
    progress = Progress(task, len(workload), unit="request") if task else None

    async def channel(index: int) -> None:
        for i in range(index, len(workload), concurrency):
            request = workload[i]
            request.channel = f"channel-{index}"
            if best_of > 1:
                handles = generator.submit_many(request, best_of)
            else:
                handles = [generator.submit(request)]
            results = [await handle.result() for handle in handles]
            outputs[i] = results[0].token_ids
            timings[i] = RequestTiming(
                max(r.ttft_s or 0.0 for r in results),
                max(r.latency_s for r in results),
                sum(len(r.token_ids) for r in results),
            )
            if progress is not None:
                progress.advance()

    start = time.perf_counter()
    try:
        await asyncio.gather(*(channel(i) for i in range(concurrency)))
    finally:
        if progress is not None:
            progress.close()
    wall = time.perf_counter() - start
    done = [t for t in timings if t is not None]
    return summarise(done, wall), outputs


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(timings: list[RequestTiming], wall: float) -> dict[str, float]:
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft_s for t in timings]
    latency = [t.latency_s for t in timings]
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p95_s": _percentile(ttft, 95),
        "latency_p50_s": _percentile(latency, 50),
        "latency_p95_s": _percentile(latency, 95),
        "tokens": tokens,
        "wall_s": wall,
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bench_serve(
    config: ServeBenchConfig, *, device: str, json_path: Path | None = None
) -> dict[str, Any]:
    model_kind, concurrency, requests = config.model, config.concurrency, config.requests
    max_new_tokens, best_of, remote = config.max_new_tokens, config.best_of, config.remote
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("storyengine bench: --device cuda asked for, but CUDA is not available")
    torch.set_grad_enabled(False)
    print(f"loading {model_kind} on {device}…", file=sys.stderr)
    model = build_model(model_kind, device)
    workload = build_workload(model, requests, max_new_tokens)
    warmup = build_workload(model, 4, 4)

    results: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    scheduling = SchedulerConfig(max_batch_size=config.max_batch_size or concurrency)
    runs: list[tuple[str, Generator, int]] = [
        ("baseline", SequentialGenerator(model), 1),
        ("scheduler", BatchingGenerator(model, scheduling), 1),
    ]
    if best_of > 1:
        wide = SchedulerConfig(max_batch_size=scheduling.max_batch_size * best_of)
        runs.append(("best_of", BatchingGenerator(model, wide), best_of))
    cleanups: list[Any] = []
    if remote is not None:
        remote_generator, stop = await _remote(model, scheduling, remote)
        runs.append(("remote", remote_generator, 1))
        cleanups.append(stop)
        if remote != "local":  # another machine's service knows nothing of our adapters
            workload_for = {"remote": [_on_base(r) for r in workload]}
        else:
            workload_for = {}
    else:
        workload_for = {}
    for name, generator, n in runs:
        await run_workload(generator, warmup, 4, n)
        print(f"running {name}…", file=sys.stderr)
        results[name], outputs[name] = await run_workload(
            generator, workload_for.get(name, workload), concurrency, n, task=name
        )
        if isinstance(generator, BatchingGenerator):
            results[name]["prefilled_tokens"] = generator.prefilled_tokens
        await generator.close()
        if device == "cuda":
            torch.cuda.synchronize()
    for stop in cleanups:
        await stop()

    greedy = [i for i, r in enumerate(workload) if r.params.greedy]
    same = sum(outputs["baseline"][i] == outputs["scheduler"][i] for i in greedy)
    results["throughput_ratio"] = (
        results["scheduler"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    )
    if best_of > 1:
        best = results["best_of"]
        best["n"] = best_of
        best["latency_p95_ratio"] = best["latency_p95_s"] / results["scheduler"]["latency_p95_s"]
        sampled = [i for i, r in enumerate(workload) if not r.params.greedy]
        first = sum(outputs["best_of"][i] == outputs["scheduler"][i] for i in sampled)
        best["first_candidate_identical"] = f"{first}/{len(sampled)}"
    if remote is not None:
        served = results["remote"]
        served["url"] = remote
        served["throughput_ratio"] = served["tokens_per_s"] / results["scheduler"]["tokens_per_s"]
        same_remote = sum(outputs["remote"][i] == outputs["scheduler"][i] for i in greedy)
        served["greedy_identical"] = f"{same_remote}/{len(greedy)}"
    results["peak_rss_mb"] = _rss_mb()
    if device == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    results["greedy_identical"] = f"{same}/{len(greedy)}"
    results["setup"] = {
        "model": model.model_id,
        "device": device,
        "concurrency": concurrency,
        "requests": requests,
        "max_new_tokens": max_new_tokens,
        "prompt_lengths": list(PROMPT_LENGTHS),
        "adapters": list(ADAPTERS),
        "max_batch_size": scheduling.max_batch_size,
        "best_of": best_of,
        "torch_threads": torch.get_num_threads(),
    }
    print_table(results)
    if json_path is not None:
        text = json.dumps(results, indent=2) + "\n"
        await asyncio.to_thread(json_path.write_text, text, encoding="utf-8")
    return results


async def _remote(model: LoadedModel, config: SchedulerConfig, where: str) -> tuple[Any, Any]:
    """A `RemoteGenerator` on a service: one started here on `model` (`local`), or the
    one at `where`. Returns it and what stops what was started."""
    from ..serving.remote import RemoteGenerator, RemoteModelInfo
    from ..serving.service import CompletionService, serve

    served: BatchingGenerator | None = None
    task: asyncio.Task[None] | None = None
    if where == "local":
        served = BatchingGenerator(model, config)
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve(CompletionService(served), "127.0.0.1", 0, ready=port.set_result)
        )
        url = f"http://127.0.0.1:{await port}/v1"
    else:
        url = where.rstrip("/")
    info = RemoteModelInfo(model.model_id, model.context_window, model.tokenizer, url)
    generator = RemoteGenerator(info)

    async def stop() -> None:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if served is not None:
            await served.close()

    return generator, stop


def _on_base(request: GenerationRequest) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(request, adapter=None)


def print_table(results: dict[str, Any]) -> None:
    setup = results["setup"]
    print(
        f"model {setup['model']} on {setup['device']}: {setup['requests']} requests from "
        f"{setup['concurrency']} channels, {setup['max_new_tokens']} new tokens each, "
        f"prompts {setup['prompt_lengths']} tokens, adapters {setup['adapters']}"
    )
    header = (
        f"{'':10} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>9} {'lat p95':>9}"
    )
    print(header)
    for name in ("baseline", "scheduler", "best_of", "remote"):
        if name not in results:
            continue
        r = results[name]
        label = f"best-of-{r['n']}" if name == "best_of" else name
        label = "over HTTP" if name == "remote" else label
        print(
            f"{label:10} {r['tokens_per_s']:9.1f} {r['ttft_p50_s']:8.2f}s {r['ttft_p95_s']:8.2f}s "
            f"{r['latency_p50_s']:8.2f}s {r['latency_p95_s']:8.2f}s"
        )
    gpu = f" · peak GPU {results['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in results else ""
    print(
        f"throughput ratio {results['throughput_ratio']:.2f}x"
        f" · peak RSS {results['peak_rss_mb']:.0f} MB{gpu}"
        f" · greedy outputs identical {results['greedy_identical']}"
    )
    if "best_of" in results:
        best = results["best_of"]
        print(
            f"best-of-{best['n']}: latency p95 {best['latency_p95_ratio']:.2f}x the scheduler's"
            f" · prefilled tokens {best['prefilled_tokens']} (scheduler"
            f" {results['scheduler']['prefilled_tokens']})"
            f" · first candidate identical {best['first_candidate_identical']}"
        )
    if "remote" in results:
        served = results["remote"]
        print(
            f"over HTTP ({served['url']}): {served['throughput_ratio']:.2f}x the scheduler's"
            f" throughput · greedy outputs identical {served['greedy_identical']}"
        )
