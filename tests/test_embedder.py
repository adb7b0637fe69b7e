"""Template embeddings: the real all-MiniLM-L6-v2 (mean pooling), a tiny causal LM built here
(last-token pooling under left and right padding), and the store cache that embeds each template
once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import insert
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from aiops_plugin.config import EmbedderConfig, LogTemplatesConfig
from aiops_plugin.logs.embedder import (
    EmbedderError,
    TemplateEmbedder,
    embed_pending_templates,
    last_token_pool,
)
from aiops_plugin.logs.templates import LogTemplateMiner, template_texts, template_vectors
from aiops_plugin.store.models import LogRecordRow
from aiops_plugin.store.repo import Store

TEMPLATES = [
    "disk <*> is <NUM>% full",
    "filesystem on <PATH> is almost out of space",
    "user <*> logged in from <IP>",
    "connection from <IP> closed by peer",
    "kernel panic: not syncing: fatal exception",
    "cache warmed in <NUM> s",
    "request <UUID> finished with status <NUM> after <NUM> ms",
    "worker pool resized to <NUM> threads",
]
TRAINING_LINES = TEMPLATES + [
    "the quick brown fox jumps over the lazy dog",
    "log lines are short and repetitive",
]


@pytest.fixture(scope="module")
def minilm() -> TemplateEmbedder:
    return TemplateEmbedder(EmbedderConfig(model="all-MiniLM-L6-v2", device="cpu"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Two tiny causal LMs, a 2-layer Qwen2 (rotary positions) and a 2-layer GPT-2 (absolute
    positions), with a BPE tokenizer that has no pad token, each saved twice: padding on the
    right and on the left. Returns (architecture, padding side) -> model folder."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        TRAINING_LINES, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    )
    vocab, eos = bpe.get_vocab_size(), bpe.token_to_id("</s>")
    torch.manual_seed(0)
    lms = {
        "qwen2": Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=128,
            )
        ),
        "gpt2": GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=128,
                bos_token_id=eos,
                eos_token_id=eos,
            )
        ),
    }
    folders = {}
    for architecture, model in lms.items():
        for side in ("right", "left"):
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}-{side}")
            model.save_pretrained(folder)
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>", padding_side=side
            )
            tokenizer.save_pretrained(folder)
            folders[architecture, side] = folder
    return folders


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'aiops.db'}") as opened:
        yield opened


def mine(store: Store, miner: LogTemplateMiner, bodies: list[str]) -> None:
    """Insert records as the receiver does and mine them."""
    now = datetime(2024, 5, 1, tzinfo=UTC)
    with store.engine.begin() as connection:
        connection.execute(
            insert(LogRecordRow),
            [
                {
                    "received_at": now,
                    "observed_at": now,
                    "entity_group": "web",
                    "entity_key": "web-1",
                    "severity_number": 9,
                    "severity_text": "INFO",
                    "body": body,
                }
                for body in bodies
            ],
        )
    miner.mine_pending()


def test_minilm_gives_384_dim_unit_vectors_with_mean_pooling(minilm: TemplateEmbedder) -> None:
    vectors = minilm.embed(TEMPLATES)
    assert (minilm.dim, minilm.pooling) == (384, "mean")
    assert vectors.shape == (len(TEMPLATES), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_minilm_puts_similar_templates_closer_than_unrelated_ones(
    minilm: TemplateEmbedder,
) -> None:
    disk_full, out_of_space, login, panic = minilm.embed(
        [TEMPLATES[0], TEMPLATES[1], TEMPLATES[2], TEMPLATES[4]]
    )
    assert disk_full @ out_of_space > disk_full @ login
    assert disk_full @ out_of_space > disk_full @ panic


def test_minilm_batched_vectors_equal_one_by_one(minilm: TemplateEmbedder) -> None:
    batched = minilm.embed(TEMPLATES)
    single = np.vstack([minilm.embed([template]) for template in TEMPLATES])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_unknown_model_folder_is_refused_without_download(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="not a local model folder"):
        TemplateEmbedder(EmbedderConfig(model=str(tmp_path / "missing"), device="cpu"))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_causal_lm_pools_the_last_real_token_whatever_the_padding_side(
    tiny_lm: dict[tuple[str, str], Path], architecture: str, side: str
) -> None:
    folder = tiny_lm[architecture, side]
    embedder = TemplateEmbedder(EmbedderConfig(model=str(folder), device="cpu"))
    assert embedder.pooling == "last" and embedder.dim == 32

    batched = embedder.embed(TEMPLATES)
    single = np.vstack([embedder.embed([template]) for template in TEMPLATES])
    np.testing.assert_allclose(batched, single, atol=1e-5)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        for template, vector in zip(TEMPLATES, batched, strict=True):
            ids = tokenizer(template, return_tensors="pt")["input_ids"]
            last = model(input_ids=ids).last_hidden_state[0, -1]
            np.testing.assert_allclose(vector, (last / last.norm()).numpy(), atol=1e-5)


def test_last_token_pool_handles_left_and_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_each_template_is_embedded_once_and_again_only_when_generalised(
    store: Store, tiny_lm: dict[tuple[str, str], Path]
) -> None:
    miner = LogTemplateMiner(store, LogTemplatesConfig())
    embedder = TemplateEmbedder(EmbedderConfig(model=str(tiny_lm["qwen2", "right"]), device="cpu"))
    lines = [f"worker pool resized to small after {i} s" for i in range(30)]
    mine(store, miner, lines + ["replica lag is fine", "cache warmed"] * 10)

    first = embed_pending_templates(store, embedder)
    assert (first.templates, first.embedded, first.lines) == (3, 3, 50)
    assert first.line_hit_rate == pytest.approx(1 - 3 / 50)
    second = embed_pending_templates(store, embedder)
    assert (second.embedded, second.cache_hits, second.cache_hit_rate) == (0, 3, 1.0)

    mine(store, miner, ["worker pool resized to large after 3 s", "cache warmed"])
    third = embed_pending_templates(store, embedder)
    assert (third.embedded, third.cache_hits) == (1, 2)
    vectors = template_vectors(store, embedder.model_id)
    texts = template_texts(store)
    assert sorted(vectors) == sorted(texts)
    expected = embedder.embed(list(texts.values()))
    for (template_id, _text), vector in zip(texts.items(), expected, strict=True):
        np.testing.assert_allclose(vectors[template_id], vector, atol=1e-5)


def test_a_model_change_reembeds_every_template(
    store: Store, tiny_lm: dict[tuple[str, str], Path]
) -> None:
    mine(store, LogTemplateMiner(store, LogTemplatesConfig()), TEMPLATES)
    old = TemplateEmbedder(EmbedderConfig(model=str(tiny_lm["qwen2", "right"]), device="cpu"))
    new = TemplateEmbedder(EmbedderConfig(model=str(tiny_lm["gpt2", "right"]), device="cpu"))
    assert old.model_id != new.model_id
    assert embed_pending_templates(store, old).embedded == len(TEMPLATES)

    report = embed_pending_templates(store, new)
    assert (report.embedded, report.cache_hits) == (len(TEMPLATES), 0)
    assert template_vectors(store, old.model_id) == {}
    assert len(template_vectors(store, new.model_id)) == len(TEMPLATES)
    assert embed_pending_templates(store, new).embedded == 0


def test_two_jobs_loading_the_model_at_once_both_get_it() -> None:
    """At start the fit and the inference job both load the embedder; in a fresh interpreter
    (transformers not imported yet) four threads load it at the same moment."""
    code = """
import threading
from aiops_plugin.config import EmbedderConfig
from aiops_plugin.logs.embedder import TemplateEmbedder
barrier = threading.Barrier(4)
results = []
def load():
    barrier.wait()
    try:
        results.append(TemplateEmbedder(EmbedderConfig(device="cpu")).embed(["disk full"]).shape)
    except Exception as exc:
        results.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(results)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str([(1, 384)] * 4)
