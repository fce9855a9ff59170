"""The offline hashing embedder, computed a batch at a time with numpy: the same vectors in every
process, unit length, 384 dimensions by default, closer for texts that share words, and the same
for a text whether it is embedded alone or in a batch of new words."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memories.providers.offline import HashingEmbedder

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Adopted a beagle named Toby from a shelter in Ballard",
    "Lives on Brantover Street in Kreuzberg with their sister",
    "Café crème at Zürich's Bäckerei, 東京 next spring",
    "",
    "?!",
]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_vectors_are_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json, sys; from memories.providers.offline import HashingEmbedder; "
        "print(json.dumps(HashingEmbedder().embed(json.loads(sys.argv[1]))))"
    )
    # A different hash seed: a vector built on Python's salted hash() would change.
    for seed in ("1", "987654"):
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(TEXTS)],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == HashingEmbedder().embed(TEXTS)


def test_vectors_are_384_dimensional_and_unit_length() -> None:
    vectors = HashingEmbedder().embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    for vector in vectors:
        assert len(vector) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0)


def test_a_text_without_words_is_still_a_unit_vector() -> None:
    for vector in HashingEmbedder().embed(["", "?!", "  ...  "]):
        assert vector[0] == 1.0 and not any(vector[1:])


def test_a_text_has_the_same_vector_alone_and_in_a_batch() -> None:
    embedder = HashingEmbedder()
    batch = embedder.embed(TEXTS)
    for text, vector in zip(TEXTS, batch, strict=True):
        assert embedder.embed([text])[0] == pytest.approx(vector, abs=1e-12)


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    pet, pet_again, job, unrelated = HashingEmbedder().embed(
        [
            "Adopted a beagle named Toby from a shelter",
            "Their beagle Toby came from the shelter",
            "Works as a nurse at the hospital in Leeds",
            "Favourite dish is the ramen at Nevouford",
        ]
    )
    assert cosine(pet, pet_again) > 0.4
    assert cosine(pet, pet_again) > cosine(pet, job) + 0.2
    assert cosine(pet, pet_again) > cosine(pet, unrelated) + 0.2


def test_plural_and_singular_meet() -> None:
    likes, like, hates = HashingEmbedder().embed(["likes", "like", "hates"])
    assert cosine(likes, like) == pytest.approx(1.0)
    assert cosine(likes, hates) < 0.9


def test_the_array_form_is_the_list_form_in_float32() -> None:
    embedder = HashingEmbedder(64)
    array = embedder.embed_array(TEXTS)
    assert array.dtype == np.float32 and array.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(array, np.array(embedder.embed(TEXTS)), atol=1e-6)
    assert embedder.embed_array([]).shape == (0, 64)


def test_word_order_and_repetition_count() -> None:
    a, b, twice = HashingEmbedder().embed(["dog bites man", "man bites dog", "dog dog"])
    assert cosine(a, b) == pytest.approx(1.0)  # a bag of words: order does not matter
    (dog,) = HashingEmbedder().embed(["dog"])
    assert cosine(twice, dog) == pytest.approx(1.0)  # the same direction, counted twice
