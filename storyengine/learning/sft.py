"""`storyengine train sft`: adapt a LoRA to a story corpus (domain fine-tuning).

The corpus is a text file or a folder of them. Stories separated by `<|endoftext|>`
lines stay whole; a file without separators is one long text (a book). A share of the
stories (or, for a single text, of its windows) is held out to measure perplexity.
Everything else is joined with the end-of-text token and cut into windows of
`max_length` tokens, the usual way to train a causal LM on a corpus, and trained with
TRL's SFTTrainer.

The result goes into the same adapter registry as the preference rounds, as a
candidate with its report (held-out perplexity on the corpus and on the shipped
held-out stories, before and after); `promote=True` promotes it when the corpus
perplexity improved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import InvalidInput
from ..options import check_options, option
from .evaluation import perplexity
from .rounds import heldout_stories
from .runs import TrainingRun, training_run
from .training import TrainConfig, prepare_policy, progress_callback, runs_on_cpu

log = logging.getLogger(__name__)

SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class CorpusTrainConfig:
    """`storyengine train sft`: its options are these fields (`options.add_options`)."""

    learning_rate: float = option(2e-4, flags=("--lr",), above=0, below=1, help="learning rate")
    epochs: float = option(1.0, above=0, help="passes over the corpus")
    max_steps: int | None = option(None, low=1, help="stop after this many steps (big corpora)")
    max_length: int = option(256, low=16, high=4096, help="tokens per training window")
    batch_size: int = option(8, low=1, help="training windows per step")
    heldout_fraction: float = option(
        0.05, above=0, below=1, help="share of the corpus held out to measure perplexity"
    )
    max_heldout: int = option(64, low=1, help="at most this many held-out texts are scored")
    from_promoted: bool = option(
        False, help="start from the promoted adapter (default: a fresh LoRA)"
    )
    promote: bool = option(
        False, help="serve the new adapter if its held-out corpus perplexity improved"
    )
    seed: int = option(0, help="changes the held-out split and the training order")

    def __post_init__(self) -> None:
        check_options(self)


def load_corpus(path: Path) -> list[str]:
    """The texts of a corpus file, or of every .txt file under a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise InvalidInput(f"{path}: no such file or folder")
    texts: list[str] = []
    for file in files:
        try:
            raw = file.read_text("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{file}: not UTF-8 text") from None
        texts.extend(t.strip() for t in raw.split(SEPARATOR) if t.strip())
    if not texts:
        raise InvalidInput(f"{path}: no text to train on (looked for .txt files)")
    return texts


def is_heldout(text: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return digest[0] / 256 < fraction


def windows(ids: Sequence[int], length: int) -> list[list[int]]:
    """Consecutive windows of `length` tokens (the last one may be shorter, but not
    shorter than a quarter window)."""
    out = [list(ids[i : i + length]) for i in range(0, len(ids), length)]
    if len(out) > 1 and len(out[-1]) < length // 4:
        out.pop()
    return out


def split_corpus(
    texts: list[str], tokenizer: Any, config: CorpusTrainConfig
) -> tuple[list[list[int]], list[str]]:
    """(training windows, held-out texts)."""
    eos = tokenizer.eos_token_id
    if len(texts) >= 20:  # stories: hold out whole ones
        train = [t for t in texts if not is_heldout(t, config.heldout_fraction, config.seed)]
        heldout = [t for t in texts if is_heldout(t, config.heldout_fraction, config.seed)]
        if not heldout or not train:
            train, heldout = texts[1:], texts[:1]
        ids: list[int] = []
        for text in train:
            ids += tokenizer(text)["input_ids"] + [eos]
        return windows(ids, config.max_length), heldout[: config.max_heldout]
    # A few long texts (books): hold out every k-th window.
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [eos]
    all_windows = windows(ids, config.max_length)
    every = max(2, round(1 / config.heldout_fraction))
    heldout_windows = all_windows[every - 1 :: every]
    train_windows = [w for i, w in enumerate(all_windows) if (i + 1) % every]
    heldout = [tokenizer.decode(w) for w in heldout_windows[: config.max_heldout]]
    return train_windows, heldout


def train_on_windows(
    policy: Any,
    tokenizer: Any,
    train: list[list[int]],
    config: CorpusTrainConfig,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer  # pyright: ignore[reportPrivateImportUsage]

    datasets.disable_progress_bars()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taleweaver-sft-") as scratch:
        args = SFTConfig(
            output_dir=scratch,
            learning_rate=config.learning_rate,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size,
            max_length=config.max_length,
            packing=False,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=runs_on_cpu(policy),
            report_to=[],
            save_strategy="no",
            logging_steps=10,
            seed=config.seed,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=policy,
            args=args,
            train_dataset=Dataset.from_list([{"input_ids": w} for w in train]),
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(progress_callback(progress))
        result = trainer.train()
    policy.eval()
    return {
        "method": "sft",
        "windows": len(train),
        "tokens": sum(len(w) for w in train),
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "seconds": time.perf_counter() - started,
    }


async def run_sft(
    settings: Settings,
    corpus: Path,
    config: CorpusTrainConfig,
    *,
    say: Callable[[str], None] = print,
) -> tuple[int, bool, dict[str, Any]]:
    """Train, evaluate and register a corpus adapter. Returns (version, promoted,
    report)."""
    texts = await asyncio.to_thread(load_corpus, corpus)
    async with training_run(settings) as run:
        return await _run_sft(settings, run, corpus, texts, config, say)


async def _run_sft(
    settings: Settings,
    run: TrainingRun,
    corpus: Path,
    texts: list[str],
    config: CorpusTrainConfig,
    say: Callable[[str], None],
) -> tuple[int, bool, dict[str, Any]]:
    from ..serving.modeling import load_for_training

    registry = run.registry
    start = await registry.promoted() if config.from_promoted else None
    loaded = await asyncio.to_thread(load_for_training, settings)
    tok = loaded.tokenizer
    train, heldout = await asyncio.to_thread(split_corpus, texts, tok, config)
    if not train:
        raise InvalidInput(f"{corpus}: too little text to train on")
    lora = TrainConfig(seed=config.seed)
    policy = prepare_policy(loaded.model, start.path if start else None, lora)
    stories = heldout_stories()
    await run.begin("sft")

    def before() -> dict[str, float]:
        return {
            "corpus_ppl_before": perplexity(policy, tok, "default", heldout),
            "stories_ppl_before": perplexity(policy, tok, "default", stories),
        }

    report: dict[str, Any] = await asyncio.to_thread(before)
    say(
        f"training on {len(train)} windows of up to {config.max_length} tokens from "
        f"{len(texts)} text(s) ({len(heldout)} held out), starting from "
        f"{start.name if start else 'a fresh adapter'}"
    )
    report["train"] = await asyncio.to_thread(train_on_windows, policy, tok, train, config, say)

    def after() -> dict[str, float]:
        return {
            "corpus_ppl": perplexity(policy, tok, "default", heldout),
            "stories_ppl": perplexity(policy, tok, "default", stories),
            "base_stories_ppl": perplexity(policy, tok, None, stories),
        }

    report.update(await asyncio.to_thread(after))
    say(
        f"held-out corpus perplexity {report['corpus_ppl_before']:.2f} → "
        f"{report['corpus_ppl']:.2f}; held-out stories {report['stories_ppl_before']:.2f}"
        f" → {report['stories_ppl']:.2f}"
    )
    improved = report["corpus_ppl"] < report["corpus_ppl_before"]
    report["passed"] = improved
    report["reasons"] = [] if improved else ["the corpus perplexity did not improve"]
    policy.set_adapter("default")
    version = await registry.register(
        lambda d: policy.save_pretrained(str(d), selected_adapters=["default"]),
        method="sft",
        parent_version=start.version if start else None,
        metrics=json.loads(json.dumps(report, default=str)),
        data_counts={"corpus": str(corpus), "texts": len(texts), "heldout": len(heldout)},
        recipe={"sft": asdict(config), "lora": asdict(lora), "base_model": settings.base_model},
    )
    await run.registered(version.version)
    promoted = False
    if config.promote and improved:
        await registry.promote(version.version)
        promoted = True
    run.end(version=version.version)
    return version.version, promoted, report
