"""A round that cannot run on the feedback there is says why in a sentence, records a
skipped run (not a failed one), and loads no model first."""

import asyncio
import os
import sqlite3
import sys

import pytest

from storyengine.config import Settings
from storyengine.learning.datasets import DatasetConfig, story_split
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.rounds import RoundConfig, run_round
from storyengine.learning.training import TrainConfig
from storyengine.storage.store import Store
from tests.helpers.crash_child import fake_adapter
from tests.helpers.models import record_text


async def rate(db, liked: int, disliked: int, *, heldout: tuple[int, int] = (2, 2)) -> None:
    """`liked` 👍 and `disliked` 👎 continuations of stories on the training side of the
    split, and `heldout` (liked, disliked) ones of held-out stories; one story each."""
    store = await Store(db).open()
    wanted = {
        "train": [1.0] * liked + [-1.0] * disliked,
        "heldout": [1.0] * heldout[0] + [-1.0] * heldout[1],
    }
    n = 0
    while wanted["train"] or wanted["heldout"]:
        n += 1
        story = await store.create_story(f"c{n}", "P.", genre=None, mode="solo", created_by="u")
        side = wanted[story_split(story.id, DatasetConfig())]
        if not side:
            continue
        value = side.pop()
        g = await record_text(store, story.id, f"Once, in story {n},", f"Continuation {n}.")
        await store.set_feedback(g, f"user{n}", "👍" if value > 0 else "👎", value)
    await store.close()


@pytest.fixture
def no_model(monkeypatch):
    """A round that loads a model fails the test."""

    def load_for_training(settings):
        pytest.fail("a model was loaded for a round that cannot run")

    monkeypatch.setattr("storyengine.serving.modeling.load_for_training", load_for_training)


async def skipped(tmp_path, config: RoundConfig | None = None) -> str:
    """Run a round that must be skipped; its run is recorded as done, with the reason."""
    settings = Settings(db_path=tmp_path / "s.db", adapter_dir=tmp_path / "adapters")
    result = await run_round(settings, config or RoundConfig(), say=pytest.fail)
    assert result.status == "skipped" and result.version is None
    with sqlite3.connect(tmp_path / "s.db") as conn:
        runs = conn.execute("SELECT status, error, version FROM training_runs").fetchall()
    assert runs == [("done", result.reason, None)]
    assert "{" not in result.reason  # a sentence, not a Python dict
    return result.reason


async def test_too_little_feedback(tmp_path, no_model):
    await rate(tmp_path / "s.db", 3, 2)
    reason = await skipped(tmp_path)
    assert reason == "not enough feedback yet: 5 training examples (a round needs 8), 4 held out"


@pytest.mark.parametrize(("liked", "disliked"), [(14, 0), (0, 9)])
async def test_feedback_that_goes_one_way_only(tmp_path, no_model, liked, disliked):
    """KTO learns from the difference between liked and disliked continuations: an
    audience that only ever gives 👍 (the common case early on) makes no round yet."""
    await rate(tmp_path / "s.db", liked, disliked)
    reason = await skipped(tmp_path)
    if liked:
        assert reason == (
            "all 14 rated continuations to learn from are liked (👍): the storyteller learns"
            " from the difference between liked and disliked continuations; wait for some 👎"
            " or companion choices"
        )
    else:
        assert reason.startswith("all 9 rated continuations to learn from are disliked (👎)")
        assert reason.endswith("wait for some 👍 or companion choices")


async def test_no_held_out_feedback(tmp_path, no_model):
    await rate(tmp_path / "s.db", 6, 6, heldout=(0, 0))
    reason = await skipped(tmp_path)
    assert reason.startswith(
        "no held-out feedback yet to judge a new adapter on: 12 training examples, none held out"
    )


async def test_dpo_asked_for_without_enough_pairs(tmp_path, no_model):
    await rate(tmp_path / "s.db", 6, 6)
    reason = await skipped(tmp_path, RoundConfig(method="dpo"))
    assert reason.startswith(
        "not enough feedback yet for DPO: 0 preference pairs (a round needs 8), 4 held out;"
    )


async def test_the_served_adapter_missing_on_disk(tmp_path, no_model):
    """Someone deleted the served adapter's files: the round cannot start from it."""
    import shutil

    await rate(tmp_path / "s.db", 6, 6)
    store = await Store(tmp_path / "s.db").open()
    registry = await AdapterRegistry(store, tmp_path / "adapters").open()
    served = await registry.promote((await registry.register(fake_adapter, method="kto")).version)
    await store.close()
    shutil.rmtree(served.path)
    reason = await skipped(tmp_path)
    assert reason.startswith(f"the served adapter v1 is missing on disk ({served.path})")


@pytest.mark.slow
async def test_a_served_adapter_that_does_not_fit_the_base_model(tmp_path):
    """STORY_BASE_MODEL changed since the served adapter was trained: the round says so
    (once the base model is loaded, it cannot know before) instead of failing with a
    traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers.models import make_tiny_model
    from tests.learning.test_adapters import lora_saver

    tiny = make_tiny_model()
    other = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny.tokenizer), n_embd=16, n_layer=1, n_head=2)
    )
    other.save_pretrained(tmp_path / "other-base")
    tiny.tokenizer.save_pretrained(tmp_path / "other-base")
    await rate(tmp_path / "s.db", 6, 6)
    store = await Store(tmp_path / "s.db").open()
    registry = await AdapterRegistry(store, tmp_path / "adapters").open()
    v1 = await registry.register(lora_saver(tiny.model, 1), method="kto")  # for n_embd 32
    await registry.promote(v1.version)
    await store.close()

    settings = Settings(
        db_path=tmp_path / "s.db",
        adapter_dir=tmp_path / "adapters",
        base_model=str(tmp_path / "other-base"),
        device="cpu",
    )
    said: list[str] = []
    result = await run_round(settings, RoundConfig(), say=said.append)
    # The reward model (which reads the base model only) is tried first; nothing trains.
    assert said == [
        "reward model skipped: too little held-out feedback to judge one: 4 held-out"
        " examples (a reward model needs 8)"
    ]
    assert result.status == "skipped", result
    assert result.reason.startswith(
        f"the served adapter v1 does not load on the base model {tmp_path / 'other-base'}"
        " (Error(s) in loading state_dict for PeftModel: size mismatch for"
    )
    assert result.reason.endswith(
        "serve another (`storyengine adapters rollback`), or set STORY_BASE_MODEL back to"
        " the model it was trained on"
    )
    with sqlite3.connect(tmp_path / "s.db") as conn:
        runs = conn.execute("SELECT status, error FROM training_runs").fetchall()
    assert runs == [("done", result.reason)]


async def test_train_round_prints_the_reason_and_exits_0(tmp_path):
    await rate(tmp_path / "s.db", 10, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyengine",
        "train",
        "round",
        "--db",
        str(tmp_path / "s.db"),
        "--dir",
        str(tmp_path / "adapters"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "skipped: all 10 rated continuations to learn from are liked (👍): the storyteller"
        " learns from the difference between liked and disliked continuations; wait for some"
        " 👎 or companion choices"
    ]
    assert "Traceback" not in err.decode()


def test_rounds_that_can_run_are_not_skipped_by_the_checks():
    """The checks let through what trains: two-sided KTO examples, enough DPO pairs."""
    from storyengine.learning.datasets import FeedbackDatasets, LabelledExample
    from storyengine.learning.rounds import plan_round, skip_reason

    def example(label: bool, split: str, n: int) -> LabelledExample:
        return LabelledExample("p", f"c{n}", label, 1.0 if label else -1.0, n, split, n)

    data = FeedbackDatasets(
        examples=[example(n % 2 == 0, "train", n) for n in range(8)] + [example(True, "heldout", 9)]
    )
    config = RoundConfig(train=TrainConfig(min_examples=8))
    assert skip_reason(config, plan_round(config, data)) is None


def test_each_round_may_use_a_share_of_the_perplexity_room_left():
    """The drift guard's limit: 60 % of the way from where the round starts to the
    gate's bound against the base model (5 %: 10.5 here), and at most 60 % of the bound
    against the served adapter. A first round that used 60 % of the base model's bound
    (10.3) used to leave the next one a limit of 10.3 itself: no room, every later
    round skipped."""
    from storyengine.learning.evaluation import GateConfig
    from storyengine.learning.rounds import drift_guard

    def limit(start: float) -> float:
        gate = GateConfig()
        return drift_guard(None, None, [], gate, 0.6, base_ppl=10.0, start_ppl=start).limit

    assert limit(10.0) == pytest.approx(10.3)  # the first round: as before
    assert limit(10.3) == pytest.approx(10.42)  # the second: room still
    assert limit(10.42) == pytest.approx(10.468)
    assert limit(10.6) < 10.6  # past the gate's bound already: none


def test_perplexities_of_the_same_files_are_measured_once(tmp_path):
    """The base model's and a served adapter's perplexity on the held-out stories are
    taken once a process (a pass over the stories each); an adapter's files replaced
    under the same name are measured again."""
    from types import SimpleNamespace

    from storyengine.learning.rounds import PerplexityMemo

    memo, texts = PerplexityMemo(), ["a"]
    loaded = SimpleNamespace(model_id="some/hub-model", device="cpu", model=None)
    measured: list[str] = []

    def measure(name: str, value: float):
        return lambda: measured.append(name) or value

    adapter = tmp_path / "v1"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert memo.get(loaded, None, texts, measure("base", 9.0)) == 9.0
    assert memo.get(loaded, None, texts, measure("base", 0.0)) == 9.0
    assert memo.get(loaded, adapter, texts, measure("v1", 9.5)) == 9.5
    assert memo.get(loaded, adapter, ["b"], measure("v1 on b", 9.6)) == 9.6
    (adapter / "adapter_model.safetensors").write_bytes(b"longer")
    assert memo.get(loaded, adapter, texts, measure("v1 again", 9.7)) == 9.7
    memo.remember(loaded, adapter, texts, 9.8)  # as the round measured it, trained
    assert memo.get(loaded, adapter, texts, measure("never", 0.0)) == 9.8
    assert memo.get(loaded, tmp_path / "gone", texts, measure("gone", 1.0)) == 1.0
    # A base model in a folder: its weights replaced, it is measured again.
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"x")
    local = SimpleNamespace(model_id=str(tmp_path / "base"), device="cpu", model=None)
    assert memo.get(local, None, texts, measure("local", 8.0)) == 8.0
    (tmp_path / "base" / "model.safetensors").write_bytes(b"other")
    assert memo.get(local, None, texts, measure("local again", 8.5)) == 8.5
    assert measured == ["base", "v1", "v1 on b", "v1 again", "gone", "local", "local again"]


def test_a_serving_base_copy_finds_the_perplexity_its_round_measured(bundled_model, tmp_path):
    """`bench learning` measures each adapter's perplexity on a private copy of the
    serving model: the figure the round remembered for the same weights file and
    stories is found there, not measured again."""
    from storyengine.config import Settings
    from storyengine.learning.best_of import base_copy
    from storyengine.learning.rounds import PerplexityMemo
    from storyengine.serving.modeling import load_for_training

    memo, texts = PerplexityMemo(), ["a story"]
    adapter = tmp_path / "v1"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    memo.remember(load_for_training(Settings(device="cpu")), adapter, texts, 9.4)
    copy = base_copy(bundled_model)
    assert memo.get(copy, adapter, texts, lambda: pytest.fail("measured again")) == 9.4


def test_logprob_tables_follow_the_weights_files(tmp_path):
    """The gate's log-likelihood tables: one per base model and adapter files, the same
    dict while the files stay, a fresh one when they are replaced or cannot be known,
    a bounded number kept."""
    from types import SimpleNamespace

    from storyengine.learning.rounds import LogprobMemo

    memo = LogprobMemo(tables=2, entries=3)
    loaded = SimpleNamespace(model_id="some/hub-model", device="cpu", model=None)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for folder in (v1, v2):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    memo.remember(loaded, v1, {("p", "a"): -3.0})
    assert memo.table(loaded, v1) == {("p", "a"): -3.0}
    memo.table(loaded, None)[("p", "a")] = -4.0
    assert memo.table(loaded, None) == {("p", "a"): -4.0}
    assert memo.table(loaded, tmp_path / "gone") == {}  # no weights file: not kept
    (v1 / "adapter_model.safetensors").write_bytes(b"retrained")
    assert memo.table(loaded, v1) == {}  # replaced under the same name
    memo.remember(loaded, v2, {("p", "b"): -1.0})  # a third table: the oldest goes
    assert memo.table(loaded, None) == {}
    memo.remember(loaded, v2, {(str(i), "x"): 0.0 for i in range(4)})  # past `entries`
    assert memo.table(loaded, v2) == {}


def test_implicit_rewards_take_what_the_tables_hold(monkeypatch):
    from storyengine.learning import training
    from storyengine.learning.evaluation import implicit_rewards

    asked: list[tuple[str | None, list]] = []

    def logprobs(model, tokenizer, items, *, adapter="default", batch_size=16):
        asked.append((adapter, list(items)))
        return [-1.0 if adapter is None else -0.5 for _ in items]

    monkeypatch.setattr(training, "completion_logprobs", logprobs)
    base, mine = {("p", "a"): -2.0}, {}
    rewards = implicit_rewards(None, None, "v1", [("p", "a"), ("p", "b")], base, mine)
    assert rewards == {("p", "a"): 1.5, ("p", "b"): 0.5}
    assert asked == [(None, [("p", "b")]), ("v1", [("p", "a"), ("p", "b")])]
    assert implicit_rewards(None, None, "v1", [("p", "b")], base, mine) == {("p", "b"): 0.5}
    assert len(asked) == 2  # nothing measured again
