"""`train sft`: a LoRA adapted to a story corpus, registered like any other version."""

import pytest

from storyengine.config import Settings
from storyengine.errors import InvalidInput
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.sft import CorpusTrainConfig, load_corpus, run_sft, split_corpus, windows
from storyengine.storage.store import Store

FABLE = (
    "The {animal} said to the {other}: 'Slow and steady wins the race.' "
    "And so the {other} learned that pride goes before a fall. Moral: be humble."
)
ANIMALS = ["tortoise", "hare", "fox", "crow", "lion", "mouse", "ant", "grasshopper"]


def write_corpus(folder, n: int = 40) -> None:
    folder.mkdir()
    stories = [
        FABLE.format(animal=ANIMALS[i % 8], other=ANIMALS[(i * 3 + 1) % 8]) for i in range(n)
    ]
    half = n // 2
    (folder / "a.txt").write_text("\n<|endoftext|>\n".join(stories[:half]))
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("\n<|endoftext|>\n".join(stories[half:]))
    (folder / "notes.md").write_text("not a .txt file: ignored")


def test_load_corpus_reads_files_and_folders_and_says_what_is_wrong(tmp_path):
    write_corpus(tmp_path / "c")
    assert len(load_corpus(tmp_path / "c")) == 40
    assert len(load_corpus(tmp_path / "c" / "a.txt")) == 20
    with pytest.raises(InvalidInput, match="no such file"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no text to train on"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00story")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        load_corpus(tmp_path / "bin.txt")


def test_windows_and_the_held_out_split(bundled_model):
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 8) == [[0, 1, 2, 3, 4, 5, 6, 7]]  # a 1-token tail: dropped
    tok = bundled_model.tokenizer
    config = CorpusTrainConfig(max_length=32, heldout_fraction=0.2)
    stories = [f"Story number {i} is about a cat." for i in range(40)]
    train, heldout = split_corpus(stories, tok, config)
    assert heldout and all(h in stories for h in heldout)
    trained_text = tok.decode([t for w in train for t in w])
    assert not any(h in trained_text for h in heldout)  # held-out stories never trained on
    book = ["word " * 2000]  # one long text: every 5th window is held out
    train, heldout = split_corpus(book, tok, config)
    assert len(heldout) == len(windows(tok(book[0])["input_ids"] + [0], 32)) // 5


@pytest.mark.slow
async def test_sft_lowers_corpus_perplexity_and_registers_a_candidate(tmp_path):
    write_corpus(tmp_path / "corpus")
    settings = Settings(db_path=tmp_path / "s.db", adapter_dir=tmp_path / "adapters", device="cpu")
    store = await Store(settings.database).open()
    killed = await store.start_training_run("dpo")  # a round killed before this one
    await store.close()
    config = CorpusTrainConfig(
        learning_rate=1e-3, max_steps=12, max_length=64, batch_size=4, heldout_fraction=0.2
    )
    lines: list[str] = []
    version, promoted, report = await run_sft(
        settings, tmp_path / "corpus", config, say=lines.append
    )
    assert report["corpus_ppl"] < report["corpus_ppl_before"] * 0.8, report
    assert report["passed"] and not promoted
    assert any(line.startswith("step 10/12") for line in lines)
    store = await Store(settings.database).open()
    registry = await AdapterRegistry(store, settings.adapter_dir).open()
    v = await registry.get(version)
    assert v.status == "candidate" and v.method == "sft" and v.metrics["train"]["steps"] == 12
    assert (v.path / "adapter_model.safetensors").is_file()
    assert "corpus ppl" in v.summary()
    runs = await store.db.execute_fetchall(
        "SELECT id, method, status, version, error FROM training_runs ORDER BY id"
    )
    assert [tuple(r) for r in runs] == [
        (killed, "dpo", "failed", None, "interrupted"),
        (killed + 1, "sft", "done", version, None),
    ]
    await store.close()

    # --promote serves it, continuing from the promoted adapter.
    again = CorpusTrainConfig(
        learning_rate=1e-3, max_steps=4, max_length=64, batch_size=4, heldout_fraction=0.2,
        from_promoted=True, promote=True,
    )  # fmt: skip
    store = await Store(settings.database).open()
    registry = await AdapterRegistry(store, settings.adapter_dir).open()
    await registry.promote(version)
    await store.close()
    second, promoted, report = await run_sft(settings, tmp_path / "corpus", again, say=print)
    assert promoted and report["corpus_ppl_before"] == pytest.approx(report_ppl(v), rel=1e-4)
    store = await Store(settings.database).open()
    registry = await AdapterRegistry(store, settings.adapter_dir).open()
    current = await registry.promoted()
    assert current.version == second and current.parent_version == version
    await store.close()


def report_ppl(version) -> float:
    return version.metrics["corpus_ppl"]
