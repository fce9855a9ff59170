"""Providers that need no network and no key: a rule-based extractor/decider and a hashing embedder.

They make the service usable (and testable end to end) without a model. The rules cover plain
first-person statements only; anything else is left alone rather than guessed at.
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache

from memories.providers.base import Decision, ExistingMemory

# --- Extraction -------------------------------------------------------------------------------

_CONTRACTIONS = [
    (re.compile(r"\bi'm\b", re.I), "I am"),
    (re.compile(r"\bi've\b", re.I), "I have"),
    (re.compile(r"\bi'd\b", re.I), "I would"),
    (re.compile(r"\bi'll\b", re.I), "I will"),
    (re.compile(r"\bdon't\b", re.I), "do not"),
    (re.compile(r"\bdidn't\b", re.I), "did not"),
    (re.compile(r"\bcan't\b", re.I), "cannot"),
    (re.compile(r"\bwon't\b", re.I), "will not"),
]
# A sentence ends at . ! ? ; followed by space (so "3.5" stays whole), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
# "I live in Paris and I work at Acme" holds two statements; "with my wife and my kids" holds one.
_CLAUSE_BREAK = re.compile(r"\s*(?:,\s*(?:and|but)?|\s(?:and|but))\s+(?=i\b)", re.I)
_LEADING_FILLER = re.compile(
    r"^(?:(?:hi|hello|hey|well|so|also|and|but|oh|ok|okay|actually|anyway|yes|yeah|no|btw|"
    r"by the way)\b[\s,!.:-]*)+",
    re.I,
)
# Dropped after "I": they add nothing to the fact ("I also like tea" -> "Likes tea").
_DROPPED_ADVERBS = {"also", "really", "just", "recently", "now", "currently", "still", "actually"}
# Kept in front of the verb: they change its meaning.
_KEPT_ADVERBS = {"never", "always", "usually", "often", "sometimes", "rarely"}
# Verbs that announce an opinion, a request or a passing state rather than a durable fact.
_IGNORED_VERBS = {
    "think",
    "guess",
    "suppose",
    "wonder",
    "mean",
    "bet",
    "hope",
    "need",
    "see",
    "agree",
    "understand",
    "believe",
    "feel",
    "would",
    "will",
    "should",
    "could",
    "might",
    "may",
    "must",
    "shall",
    "did",
}
# "I am ..." followed by these is small talk, not a fact about the person.
_IGNORED_AFTER_AM = {
    "sorry",
    "sure",
    "fine",
    "ok",
    "okay",
    "glad",
    "here",
    "back",
    "wondering",
    "curious",
    "thinking",
    "going",
    "trying",
    "looking",
    "asking",
}
_UNCHANGED_VERBS = {"can", "cannot", "could", "used"}
_IRREGULAR_PAST = {
    "became",
    "began",
    "bought",
    "came",
    "found",
    "gave",
    "got",
    "grew",
    "had",
    "knew",
    "left",
    "lost",
    "made",
    "met",
    "ran",
    "said",
    "sold",
    "spent",
    "taught",
    "took",
    "told",
    "was",
    "went",
    "were",
    "won",
    "wrote",
}
_IRREGULAR_THIRD_PERSON = {"am": "is", "be": "is", "have": "has", "do": "does", "go": "goes"}
_PRONOUNS = {"my": "their", "me": "them", "myself": "themselves", "mine": "theirs"}


def third_person(verb: str) -> str:
    """Conjugate a base verb for he/she: go -> goes, study -> studies, watch -> watches."""
    lower = verb.lower()
    if lower in _IRREGULAR_THIRD_PERSON:
        return _IRREGULAR_THIRD_PERSON[lower]
    if lower in _UNCHANGED_VERBS or lower in _IRREGULAR_PAST or _is_regular_past(lower):
        return verb
    if re.search(r"[^aeiou]y$", lower):
        return verb[:-1] + "ies"
    if lower.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    return verb + "s"


def _is_regular_past(word: str) -> bool:
    return word.endswith("ed") and not word.endswith("eed")


def _base_of_gerund(word: str) -> str:
    """Crude inverse of -ing: eating -> eat, running -> run, smoking -> smoke, living -> live."""
    stem = word[:-3]
    if len(stem) >= 2 and stem[-1] == stem[-2] and stem[-1] not in "aeioulsz":
        return stem[:-1]
    if stem.endswith(("v", "c")) or (
        len(stem) <= 4 and re.search(r"(?:^|[^aeiou])[aeiou][^aeiouwxy]$", stem)
    ):
        return stem + "e"
    return stem


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _third_person_objects(words: list[str]) -> list[str]:
    return [_PRONOUNS.get(w.lower(), w) for w in words]


def _fact_from_clause(clause: str) -> str | None:
    """The canonical third-person fact stated by one clause, or None if it states none."""
    mine = re.fullmatch(r"my\s+(.+?)\s+(is|are)\s+(.+)", clause, re.I)
    if mine:
        attribute, verb, value = mine.groups()
        return _capitalise(f"{attribute.lower()} {verb.lower()} {value}")

    subject = re.fullmatch(r"i\s+(.+)", clause, re.I)
    if not subject or re.search(r"\byou\b", clause, re.I):  # "you": about the chat, not the user
        return None
    words = subject.group(1).split()
    while words and words[0].lower() in _DROPPED_ADVERBS:
        words.pop(0)
    if not words:
        return None

    lowered = [w.lower() for w in words]
    negated = False
    if lowered[:2] == ["no", "longer"]:
        negated, words = True, words[2:]
    elif lowered[:2] == ["do", "not"]:
        if lowered[-1] == "anymore" or lowered[-2:] == ["any", "more"]:
            negated = True
            words = words[2 : -1 if lowered[-1] == "anymore" else -2]
        else:
            return _capitalise(" ".join(["does", "not", *_third_person_objects(words[2:])]))
    elif lowered[0] in ("stopped", "quit") and len(words) > 1 and lowered[1].endswith("ing"):
        negated, words = True, [_base_of_gerund(lowered[1]), *words[2:]]
    elif lowered[:2] == ["moved", "to"]:
        words = ["live", "in", *words[2:]]
    if not words:
        return None

    kept = []
    while words and words[0].lower() in _KEPT_ADVERBS:
        kept.append(words.pop(0).lower())
    if not words:
        return None
    verb, rest = words[0].lower(), [w.lower() for w in words[1:] if w.lower() != "not"]
    # A bare verb is a fact only when retracted: "I quit smoking" yes, "I do" no.
    if verb in _IGNORED_VERBS or (len(words) < 2 and not negated):
        return None
    if verb == "am" and rest and rest[0] in _IGNORED_AFTER_AM:
        return None
    fact = " ".join([*kept, third_person(verb), *_third_person_objects(words[1:])])
    return _capitalise(f"no longer {fact}" if negated else fact)


def _sentences(text: str) -> list[str]:
    text = text.replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!")


# --- Deciding ---------------------------------------------------------------------------------

# Facts that hold one value at a time: a new value replaces the old one instead of joining it.
# Each pattern names its predicate in `key` (or `attr`) and the value in `obj`.
_SINGLE_VALUED = [
    ("lives in", re.compile(r"lives in (?P<obj>.+)")),
    ("works at", re.compile(r"works (?:at|for) (?P<obj>.+)")),
    ("works as", re.compile(r"works as (?P<obj>.+)")),
    ("is from", re.compile(r"is from (?P<obj>.+)")),
    ("age", re.compile(r"(?:age is |is )(?P<obj>\d+)(?: years? old)?")),
    ("favorite", re.compile(r"favou?rite (?P<attr>.+?) is (?P<obj>.+)")),
    ("", re.compile(r"(?P<attr>name|birthday|email|email address|phone number) is (?P<obj>.+)")),
]
# A negated fact and the positive fact it retracts: "no longer eats meat" retracts "eats meat".
_NEGATIONS = [
    re.compile(r"no longer (?P<rest>.+)"),
    re.compile(r"never (?P<rest>.+)"),
    re.compile(r"(?P<is>is) (?:no longer|not) (?P<rest>.+)"),
    re.compile(r"does not (?P<verb>\w+)(?P<rest>.*)"),
]


def _predicate(normalised: str) -> tuple[str, str] | None:
    """(predicate, value) when the fact is single-valued, e.g. ("lives in", "paris")."""
    for key, pattern in _SINGLE_VALUED:
        match = pattern.fullmatch(normalised)
        if match:
            attribute = match.groupdict().get("attr") or ""
            return f"{key} {attribute}".strip(), match["obj"]
    return None


def _positive(normalised: str) -> str | None:
    """The positive fact a negated one retracts, normalised; None if the fact is not negated."""
    for pattern in _NEGATIONS:
        match = pattern.fullmatch(normalised)
        if match:
            parts = match.groupdict()
            if parts.get("verb"):
                return f"{third_person(parts['verb'])}{parts['rest']}"
            return f"{parts['is']} {parts['rest']}" if parts.get("is") else parts["rest"]
    return None


def _decide_one(fact: str, memories: list[ExistingMemory]) -> Decision:
    key = _normalise(fact)
    positive = _positive(key)
    predicate = _predicate(key)
    for memory in memories:
        if _normalise(memory.text) == key:
            return Decision("NONE", memory_id=memory.id)
    for memory in memories:
        if positive is not None and _normalise(memory.text) == positive:
            return Decision("DELETE", memory_id=memory.id)
        if _positive(_normalise(memory.text)) == key:  # the user took back an earlier "no longer"
            return Decision("UPDATE", text=fact, memory_id=memory.id)
    if predicate is not None:
        for memory in memories:
            other = _predicate(_normalise(memory.text))
            if other is not None and other[0] == predicate[0]:
                return Decision("UPDATE", text=fact, memory_id=memory.id)
    return Decision("ADD", text=fact)


class RuleBasedLLM:
    """An LLMProvider made of rules: plain first-person statements in, canonical facts out.

    Facts are short third-person sentences ("Lives in Paris", "No longer eats meat") so that
    `decide` can compare them with the memories it produced earlier.
    """

    def extract_facts(self, messages: list[dict[str, str]]) -> list[str]:
        facts: dict[str, str] = {}  # normalised -> fact, keeps the first spelling and the order
        for message in messages:
            if message.get("role") != "user" or not isinstance(message.get("content"), str):
                continue
            for sentence in _sentences(message["content"]):
                if sentence.endswith("?"):
                    continue
                for clause in _CLAUSE_BREAK.split(sentence):
                    clause = _LEADING_FILLER.sub("", clause).strip().rstrip(".!;:,").strip()
                    fact = _fact_from_clause(clause) if clause else None
                    if fact:
                        facts.setdefault(_normalise(fact), fact)
        return list(facts.values())

    def decide(self, facts: list[str], memories: list[ExistingMemory]) -> list[Decision]:
        """One Decision per fact, in order.

        A memory is decided at most once per call: once a fact has targeted it, later facts are
        judged against the remaining memories only, and so usually become ADD (no statement is
        silently lost). A fact repeated within the call is NONE with no memory id.
        """
        decisions: list[Decision] = []
        targeted: set[int] = set()
        seen: set[str] = set()
        for fact in facts:
            key = _normalise(fact)
            if key in seen:
                decisions.append(Decision("NONE"))
                continue
            seen.add(key)
            decision = _decide_one(fact, [m for m in memories if m.id not in targeted])
            if decision.memory_id is not None:
                targeted.add(decision.memory_id)
            decisions.append(decision)
        return decisions


# --- Embedding --------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


# Both caches are sized with memory in mind: full, they hold ~17 MB per process (measured; a
# word's entry keeps a pair per trigram). At 65k entries each, a flood of new words kept a
# worker growing for minutes.
@lru_cache(maxsize=16384)
def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    # blake2b, not hash(): hash() is salted per process, and vectors are stored across processes.
    value = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
    return value % dimensions, (1.0 if value >> 63 else -1.0)


@lru_cache(maxsize=8192)
def _word_slots(word: str, dimensions: int) -> tuple[tuple[int, float], ...]:
    """The signed buckets one word adds (the word itself and its character trigrams), cached:
    vocabularies repeat, so most words of a batch were hashed before."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]  # "likes" and "like" should meet
    padded = f"#{word}#"
    features = [(f"w:{word}", 1.0)]
    features += [(f"t:{padded[i : i + 3]}", 0.5) for i in range(len(padded) - 2)]
    slots = []
    for feature, weight in features:
        bucket, sign = _slot(feature, dimensions)
        slots.append((bucket, sign * weight))
    return tuple(slots)


class HashingEmbedder:
    """A deterministic Embedder: hashed words and character trigrams, L2-normalised.

    Texts that share words or word pieces point the same way; no model, no download. Good enough
    for tests and offline use, not for semantic search across synonyms.
    """

    def __init__(self, dimensions: int = 384) -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be positive")
        self.dimensions = dimensions

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._embed_one(text) for text in texts]

    def _embed_one(self, text: str) -> list[float]:
        # A short text touches a few dozen of the buckets: sum and normalise those alone, then
        # lay them out densely (the sums per bucket are the same as in a dense loop).
        sums: dict[int, float] = {}
        for word in _WORD.findall(text.casefold()):
            for bucket, value in _word_slots(word, self.dimensions):
                sums[bucket] = sums.get(bucket, 0.0) + value
        norm = math.hypot(*sums.values())
        vector = [0.0] * self.dimensions
        if norm == 0.0:  # empty text: still a unit vector, so cosine distance stays defined
            vector[0] = 1.0
            return vector
        scale = 1.0 / norm
        for bucket, value in sums.items():
            vector[bucket] = value * scale
        return vector
