"""Providers that need no network and no key: a rule-based extractor/decider and a hashing embedder.

They make the service usable (and testable end to end) without a model. The rules cover plain
first-person statements only; anything else is left alone rather than guessed at.

Change is expressed in the facts themselves, so the decider can compare them with what it stored:
"I stopped smoking" becomes "No longer smokes", "I used to live in Rome" "Used to live in Rome",
"I moved from Paris to Berlin" "Lives in Berlin". The decider then reads each fact as a claim (does
it hold now, no longer, or in the past; what does it say, in stemmed content words; which
one-value attribute does it set) and matches claims by meaning, not by spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

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
    (re.compile(r"\bname's\b", re.I), "name is"),  # not every "'s": "my brother's car" is no "is"
]
# A sentence ends at . ! ? ; followed by space (so "3.5" stays whole), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
# "I live in Paris and I work at Acme" holds two statements; "with my wife and my kids" holds one.
_CLAUSE_BREAK = re.compile(r"\s*(?:,\s*(?:and|but)?|\s(?:and|but))\s+(?=i\b)", re.I)
# Words that open a clause without being part of its fact. Corrections ("actually", "I changed
# my mind") belong here too: the fact after them is simply the new truth, and the decider replaces
# the old value by comparing facts, so the marker itself needs no meaning.
_OPENERS = [
    r"hi|hello|hey|well|so|also|and|but|oh|ok|okay|anyway|yes|yeah|no|btw|by the way",
    r"actually|in fact|correction|sorry|wait|now|to be honest|on second thoughts?|scratch that",
    r"i (?:have )?changed my mind(?: about [^,:;]+)?|i meant?",
]
_LEADING_FILLER = re.compile(
    r"^(?:(?:" + "|".join(_OPENERS) + r")\b[\s,!.:;-]*)+",
    re.I,
)
# Dropped after "I": they add nothing to the fact ("I also like tea" -> "Likes tea").
_DROPPED_ADVERBS = {"also", "really", "just", "recently", "now", "currently", "still", "actually"}
# Dropped at the end: "I work for Globex now" states the same fact as "I work for Globex", and the
# stored fact should read the same whenever it was said.
_TRAILING_TIME = re.compile(
    r"(?:\s+(?:now|right now|for now|again|these days|nowadays|at the moment|currently|too))+$",
    re.I,
)
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
# A verb alone is no fact ("I do", "I don't know anymore"), except for habits: "I smoke", "I stopped
# smoking" and "I don't drink" say something lasting.
_HABIT_VERBS = {
    "smoke",
    "vape",
    "drink",
    "gamble",
    "run",
    "swim",
    "cook",
    "knit",
    "paint",
    "draw",
    "dance",
    "sing",
    "ski",
    "surf",
    "climb",
    "meditate",
    "travel",
}
# "quit": "I quit X" nearly always reports the past, so it is not conjugated ("Quit their job").
_UNCHANGED_VERBS = {"can", "cannot", "could", "used", "quit"}
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


class _Rewrite(NamedTuple):
    """A way of saying that something changed, and the plain first-person statement it makes.

    `template` is filled from the pattern's groups; a group named `ing` ("smoking") is turned into
    its base verb ("smoke") first. `negated`: the statement no longer holds.
    """

    pattern: re.Pattern[str]
    negated: bool
    template: str


def _rewrite(pattern: str, template: str, *, negated: bool) -> _Rewrite:
    return _Rewrite(re.compile(pattern, re.I), negated, template)


# Matched, in order, against what follows "I". First match wins, so longer phrasings come first.
_CHANGES = [
    # "not ... anymore" and "no longer": the statement stopped holding.
    _rewrite(r"do not (?P<p>.+?) (?:anymore|any more|any longer)", "{p}", negated=True),
    _rewrite(r"am not (?P<p>.+?) (?:anymore|any more|any longer)", "am {p}", negated=True),
    _rewrite(r"am no longer (?P<p>.+)", "am {p}", negated=True),
    _rewrite(r"no longer (?P<p>.+)", "{p}", negated=True),
    # Leaving a job names the employer it ends; without one it stays "Quit their job", which
    # the decider reads as ending whatever employer it knows.
    _rewrite(r"(?:quit|left|lost) my job (?:at|with) (?P<x>.+)", "work at {x}", negated=True),
    # Giving up an activity: "stopped eating meat" -> "eat meat", negated.
    _rewrite(
        r"(?:stopped|quit|gave up|given up) (?P<ing>\w+ing)\b(?P<rest>.*)",
        "{ing}{rest}",
        negated=True,
    ),
    _rewrite(r"started (?P<ing>\w+ing)\b(?P<rest>.*)", "{ing}{rest}", negated=False),
    _rewrite(r"got a (?:new )?job (?:at|with) (?P<x>.+)", "work at {x}", negated=False),
    # Moving: the place moved to is home now; the place moved from alone is home no longer.
    # "moved to a new flat" names no place, so it is left alone.
    _rewrite(r"(?:moved|relocated) from .+? to (?P<y>.+)", "live in {y}", negated=False),
    _rewrite(
        r"(?:moved|relocated) to (?!(?:an?|my|new|another)\b)(?P<y>.+?)(?: from .+)?",
        "live in {y}",
        negated=False,
    ),
    _rewrite(r"moved (?:away from|out of|from) (?P<x>.+)", "live in {x}", negated=True),
    # The progressive says the same as the simple present for where one lives and works.
    _rewrite(r"am (?:living|based) in (?P<x>.+)", "live in {x}", negated=False),
    _rewrite(r"am working (?P<x>(?:at|for|as) .+)", "work {x}", negated=False),
]
# "I have moved" says what "I moved" says; the rewrites above expect the simple past.
_PERFECT = re.compile(
    r"^have (?=(?:moved|relocated|stopped|quit|given up|started|left|lost|got)\b)", re.I
)


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


def _plain_statement(predicate: str) -> tuple[bool, str]:
    """(negated, predicate): a change phrasing turned into the statement it makes."""
    predicate = _PERFECT.sub("", predicate)
    for rewrite in _CHANGES:
        match = rewrite.pattern.fullmatch(predicate)
        if match:
            groups = {name: value or "" for name, value in match.groupdict().items()}
            if "ing" in groups:
                groups["ing"] = _base_of_gerund(groups["ing"].lower())
            return rewrite.negated, rewrite.template.format(**groups).strip()
    return False, predicate


def _fact_from_clause(clause: str) -> str | None:
    """The canonical third-person fact stated by one clause, or None if it states none."""
    mine = re.fullmatch(r"my\s+(.+?)\s+(is|are)\s+(.+)", clause, re.I)
    if mine:
        attribute, verb, value = mine.groups()
        value = _TRAILING_TIME.sub("", value)
        return _capitalise(f"{attribute.lower()} {verb.lower()} {value}")

    subject = re.fullmatch(r"i\s+(.+)", clause, re.I)
    if not subject or re.search(r"\byou\b", clause, re.I):  # "you": about the chat, not the user
        return None
    words = subject.group(1).split()
    while words and words[0].lower() in _DROPPED_ADVERBS:
        words.pop(0)
    negated, predicate = _plain_statement(_TRAILING_TIME.sub("", " ".join(words)))
    words = predicate.split()
    if not words:
        return None

    denied = [w.lower() for w in words[:2]] == ["do", "not"]  # "I do not eat meat"
    if denied:
        words = words[2:]
    kept = []
    while words and words[0].lower() in _KEPT_ADVERBS:
        kept.append(words.pop(0).lower())
    if not words:
        return None
    verb, rest = words[0].lower(), [w.lower() for w in words[1:] if w.lower() != "not"]
    if verb in _IGNORED_VERBS or (len(words) < 2 and verb not in _HABIT_VERBS):
        return None
    if verb == "am" and rest and rest[0] in _IGNORED_AFTER_AM:
        return None
    objects = _third_person_objects(words[1:])
    if denied:
        return _capitalise(" ".join(["does", "not", *kept, words[0], *objects]))
    if negated and verb == "am":  # "Is no longer a smoker" reads better than "No longer is ..."
        return _capitalise(" ".join(["is", "no", "longer", *objects]))
    fact = " ".join([*kept, third_person(verb), *objects])
    return _capitalise(f"no longer {fact}" if negated else fact)


def _sentences(text: str) -> list[str]:
    text = text.replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".!")


# --- Reading a fact as a claim ----------------------------------------------------------------

Holds = Literal["now", "no longer", "in the past"]


class _Negation(NamedTuple):
    """A way a fact says that another no longer holds (or held only in the past).

    `template` rebuilds the positive statement from the groups (a `verb` group is conjugated).
    `any_verb`: the statement names only what was given up ("Gave up coffee"), so it matches a
    stored fact by its words whatever its verb ("Drinks coffee").
    `ends`: the statement is no sentence but the value of an attribute, of the family named
    (see _ATTRIBUTE_FAMILIES); empty, any value.
    """

    pattern: re.Pattern[str]
    holds: Holds
    template: str
    any_verb: bool = False
    ends: str | None = None


def _negation(
    pattern: str,
    template: str,
    *,
    holds: Holds = "no longer",
    any_verb: bool = False,
    ends: str | None = None,
) -> _Negation:
    return _Negation(re.compile(pattern, re.I), holds, template, any_verb, ends)


# Matched against a whole fact, in order; these are the shapes the extractor writes.
_NEGATIONS = [
    _negation(r"no longer (?P<rest>.+)", "{rest}"),
    _negation(r"never (?P<rest>.+)", "{rest}"),
    _negation(r"(?P<head>is|has) (?:no longer|not) (?P<rest>.+)", "{head} {rest}"),
    _negation(r"does not (?P<verb>\w+)(?P<rest>.*)", "{verb}{rest}"),
    _negation(r"used to (?P<verb>\w+)(?P<rest>.*)", "{verb}{rest}", holds="in the past"),
    # Leaving a job with no employer named ends whatever job is known.
    _negation(r"(?:quit|left|lost) their job", "", ends="job"),
    # "Left Acme", "Left Paris": left what the user worked at or lived in. Not by words: "Left
    # their keys at home" leaves nothing.
    _negation(r"left (?P<rest>.+)", "{rest}", ends="left"),
    _negation(r"(?:quit|gave up|given up) (?P<rest>.+)", "{rest}", any_verb=True),
]
# Attribute keys a retraction ends together: leaving "the job" ends the employer and the role.
_ATTRIBUTE_FAMILIES = {"job": {"employer", "occupation"}, "left": {"city", "employer", "partner"}}


class _Attribute(NamedTuple):
    """A fact that holds one value at a time: a new value replaces the old one.

    `key` may name groups of the pattern ("favorite {thing}"); `value` fixes the value when the
    pattern has no group for it; `names_only`: the value must look like a name ("Wife is Anna"
    names the partner, "Wife is a teacher" describes her).
    """

    key: str
    pattern: re.Pattern[str]
    names_only: bool = False
    value: str | None = None


def _attribute(key: str, pattern: str, *, names_only: bool = False, value: str = "") -> _Attribute:
    return _Attribute(key, re.compile(pattern, re.I), names_only, value or None)


_PARTNERS = r"wife|husband|partner|spouse|girlfriend|boyfriend|fianc[eé]e?"
_DIETS = r"vegetarian|vegan|pescatarian|pescetarian|flexitarian|omnivore|carnivore"
_ATTRIBUTES = [
    _attribute("city", r"lives in (?P<value>.+)"),
    _attribute("employer", r"works (?:at|for) (?P<value>.+)"),
    _attribute("occupation", r"works as (?:an? )?(?P<value>.+)"),
    _attribute("hometown", r"is from (?P<value>.+)"),
    _attribute("age", r"(?:age is |is )(?P<value>\d+)(?: years? old)?"),
    _attribute("favorite {thing}", r"favorite (?P<thing>.+?) is (?P<value>.+)"),
    _attribute(
        "{thing}", r"(?P<thing>name|birthday|email|email address|phone number) is (?P<value>.+)"
    ),
    _attribute("partner", rf"(?:{_PARTNERS}) is (?P<value>.+)", names_only=True),
    _attribute("partner", r"is (?:married to|engaged to|dating) (?P<value>.+)", names_only=True),
    _attribute("diet", rf"is (?:an? )?(?P<value>{_DIETS})"),
    # Eating meat is a diet too: "I am vegan" replaces "Eats meat every day".
    _attribute("diet", r"eats meat", value="meat eater"),
    # States that are the absence of a value, yet a value worth keeping: "Is retired" replaces
    # "Works at Acme", "Is divorced" replaces "Wife is Anna".
    _attribute("employer", r"is (?:unemployed|retired|jobless|out of work)", value="none"),
    _attribute("partner", r"is (?:single|divorced|separated|widowed)", value="none"),
]
# Said about when or how often, not what: "Eats meat every day" and "Eats meat" make one claim.
_TIME_PHRASES = re.compile(
    r"\b(?:"
    r"(?:every|each) (?:single )?(?:day|morning|evening|night|week|weekend|month|year|\w+day)"
    r"|(?:on|at|during) (?:the )?(?:weekends?|weekdays?|\w+days)"  # "on weekends", "on mondays"
    r"|(?:once|twice|\w+ times|an? \w+) (?:a|per) (?:day|week|month|year)"  # "a pack a day"
    r"|a lot|a little|a bit|lots|daily|weekly|monthly|regularly|often|usually|sometimes|always"
    r"|rarely|occasionally|frequently|now|again|anymore|any more|any longer|these days"
    r"|nowadays|currently|still|at the moment"
    r")\b",
    re.I,
)
# Words that carry no meaning of their own in a fact: "works at" and "works for" agree.
_FILLER_WORDS = {"a", "an", "the", "their", "them", "theirs", "to", "at", "for", "in", "of", "on"}
_IRREGULAR_STEMS = {
    **dict.fromkeys(["am", "is", "are", "was", "were", "been", "be", "being"], "be"),
    **dict.fromkeys(["has", "have", "had", "having"], "have"),
    **dict.fromkeys(["does", "do", "did", "doing"], "do"),
    **dict.fromkeys(["goes", "go", "went", "going"], "go"),
}
# British and American spellings of the same word must meet: "favourite colour" = "favorite color".
_SPELLINGS = {
    "favourite": "favorite",
    "colour": "color",
    "flavour": "flavor",
    "grey": "gray",
    "theatre": "theater",
    "neighbour": "neighbor",
    "centre": "center",
}
_SPELLING = re.compile(r"\b(?:" + "|".join(_SPELLINGS) + r")\b", re.I)


def _stem(word: str) -> str:
    """A crude stem that makes a verb's forms meet: lives/living/live -> liv, eats/eating -> eat."""
    if word in _IRREGULAR_STEMS:
        return _IRREGULAR_STEMS[word]
    if len(word) > 3:
        if word.endswith("ies"):
            word = word[:-3] + "y"
        elif word.endswith("ing") and len(word) > 5:
            word = _base_of_gerund(word)
        elif word.endswith("es") and word[:-2].endswith(("s", "sh", "ch", "x", "z", "o")):
            word = word[:-2]
        elif word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
    return word.rstrip("e") or word


def _meaning(text: str) -> tuple[str, ...]:
    """The stemmed content words of a text, in order."""
    words = re.findall(r"\w+", text.casefold())
    return tuple(_stem(w) for w in words if w not in _FILLER_WORDS)


@dataclass(frozen=True)
class _Claim:
    """What a fact says: a statement (`core`, in stemmed content words without time phrases) and
    whether it holds now, no longer, or held in the past."""

    holds: Holds
    core: tuple[str, ...]
    detail: frozenset[str]  # every content word, time phrases included
    attribute: tuple[str, str | None] | None  # (key, value); value None: any value
    any_verb: bool = False


def _read_attribute(statement: str) -> tuple[str, str | None] | None:
    for attribute in _ATTRIBUTES:
        match = attribute.pattern.fullmatch(statement)
        if not match:
            continue
        groups = match.groupdict()
        value = attribute.value or groups["value"]
        if attribute.names_only and (
            not value[:1].isupper() or value.split()[0] in ("A", "An", "The")
        ):
            continue
        return attribute.key.format(**groups).casefold(), value.casefold()
    return None


def _claim(fact: str) -> _Claim:
    text = _SPELLING.sub(lambda m: _SPELLINGS[m[0].lower()], " ".join(fact.split()))
    text = text.rstrip(".!")
    holds: Holds = "now"
    statement, any_verb = text, False
    for negation in _NEGATIONS:
        match = negation.pattern.fullmatch(text)
        if match:
            groups = {name: value or "" for name, value in match.groupdict().items()}
            if groups.get("verb"):
                groups["verb"] = third_person(groups["verb"])
            holds, any_verb = negation.holds, negation.any_verb
            statement = negation.template.format(**groups)
            if negation.ends:
                return _Claim(holds, (), frozenset(), (negation.ends, statement.casefold() or None))
            break
    timeless = " ".join(_TIME_PHRASES.sub(" ", statement).split())
    attribute = _read_attribute(timeless)
    return _Claim(holds, _meaning(timeless), frozenset(_meaning(statement)), attribute, any_verb)


# --- Deciding ---------------------------------------------------------------------------------


def _same(fact: _Claim, memory: _Claim) -> bool:
    """Both say the same thing, in the same sense (possibly in other words or with other times)."""
    if fact.holds != memory.holds:
        return False
    if fact.core and fact.core == memory.core and fact.any_verb == memory.any_verb:
        return True
    return fact.attribute is not None and fact.attribute == memory.attribute


def _retracts(negation: _Claim, positive: _Claim) -> bool:
    """Whether `negation` ("No longer eats meat") says that `positive` ("Eats meat every day")
    no longer holds. By attribute ("No longer works at Acme" ends "Works for Acme"), else by words:
    the same verb, and every object word of the negation found in the positive. A bare verb ("Does
    not drink") only retracts a bare verb ("Drinks"), not "Drinks coffee every morning"; a
    negation that names a time only retracts that time ("Does not play chess every day" leaves
    "Plays chess")."""
    if not negation.detail - set(negation.core) <= positive.detail:
        return False
    ended, held = negation.attribute, positive.attribute
    if ended and held:
        keys = _ATTRIBUTE_FAMILIES.get(ended[0], {ended[0]})
        if held[0] in keys and ended[1] in (None, held[1]):
            return True
    if not negation.core or not positive.core:
        return False
    if negation.any_verb:
        return set(negation.core) <= set(positive.core)
    verb, *objects = negation.core
    positive_verb, *positive_objects = positive.core
    return (
        verb == positive_verb
        and set(objects) <= set(positive_objects)
        and (bool(objects) or not positive_objects)
    )


def _decide_one(fact: str, memories: list[ExistingMemory]) -> Decision:
    """The rules, in order; the first memory a rule holds for is the one decided on."""
    claim = _claim(fact)
    claims = [(memory, _claim(memory.text)) for memory in memories]
    for memory, _ in claims:
        if _normalise(memory.text) == _normalise(fact):
            return Decision("NONE", memory_id=memory.id)
    for memory, other in claims:  # known already; UPDATE only when the fact adds words
        if _same(claim, other):
            if claim.detail <= other.detail:
                return Decision("NONE", memory_id=memory.id)
            return Decision("UPDATE", text=fact, memory_id=memory.id)
    for memory, other in claims:
        if claim.holds != "now" and other.holds == "now" and _retracts(claim, other):
            if claim.holds == "in the past":  # "Used to live in Rome" is still worth knowing
                return Decision("UPDATE", text=fact, memory_id=memory.id)
            return Decision("DELETE", memory_id=memory.id)
        if claim.holds == "now" and other.holds == "no longer" and _retracts(other, claim):
            return Decision("UPDATE", text=fact, memory_id=memory.id)  # took it back
    if claim.holds == "now" and claim.attribute is not None:
        for memory, other in claims:
            if (
                other.holds == "now"
                and other.attribute
                and other.attribute[0] == claim.attribute[0]
            ):
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

        - NONE: the fact is known already (same claim, perhaps in other words: "Eats meat" when
          "Eats meat every day" is stored). UPDATE instead when the fact adds words to it.
        - DELETE: the fact says a stored one no longer holds ("No longer eats meat", "Does not
          eat meat", "Gave up meat", "Quit their job"). The retraction itself is not kept: the
          stored fact is closed, with its history.
        - UPDATE: a past fact turns a present one into history ("Used to live in Rome"); a
          positive fact takes back a stored retraction; a new value replaces the old value of a
          one-value attribute (city, employer, name, partner, diet, a favourite thing...).
        - ADD: anything else, including a retraction with nothing to retract ("Does not eat
          meat" is worth knowing on its own).

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
#
# A text's vector is the sum of its words' features, each hashed to a signed bucket: the word
# itself (weight 1) and its character trigrams ("#pa", "par", ..., "is#"; weight 0.5 each), then
# L2-normalised. A batch is computed with numpy: each distinct word of the batch is hashed once,
# every feature of every word at once, and the features are summed into the texts' rows by one
# bincount. No cache: a batch of new words (names, places) costs what a batch of common ones does.
#
# The hash is a fixed arithmetic one on the characters' code points (uint64 arithmetic wraps the
# same way everywhere), not Python's hash(), which is salted per process: vectors are stored by one
# process and compared with those another computes.

_WORD = re.compile(r"\w+")
_U64 = np.uint64
# Mixing constants: splitmix64's finaliser, and a salt for each kind of feature.
_MIX_1, _MIX_2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_SALT_WORD, _SALT_TRIGRAM = _U64(0x9E3779B97F4A7C15), _U64(0xD1B54A32D192ED03)
_TRIGRAM_WEIGHT = 0.5


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise: every input bit moves about half the output bits."""
    values = (values ^ (values >> _U64(30))) * _MIX_1
    values = (values ^ (values >> _U64(27))) * _MIX_2
    return values ^ (values >> _U64(31))


def _stemmed(word: str) -> str:
    # "likes" and "like" should meet.
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class _Features:
    """The signed buckets of some distinct words, laid out word by word: word `w`'s features are
    `bucket[start[w] : start[w] + count[w]]` (the word itself, then its trigrams)."""

    def __init__(self, words: list[str], dimensions: int) -> None:
        stems = [_stemmed(w) for w in words]
        text = "".join(f"#{stem}#" for stem in stems)
        padded_lengths = np.fromiter((len(s) + 2 for s in stems), dtype=np.int64, count=len(stems))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        ends = np.cumsum(padded_lengths)
        starts = ends - padded_lengths
        # The whole word: a position-tagged sum of its characters (so "ab" and "ba" differ).
        position = np.arange(codes.size, dtype=np.int64) - np.repeat(starts, padded_lengths)
        tagged = _mix(codes ^ (position.astype(np.uint64) << _U64(32)) ^ _SALT_WORD)
        word_hashes = _mix(np.add.reduceat(tagged, starts) + padded_lengths.astype(np.uint64))
        # Every trigram: three 21-bit code points side by side, one key each.
        in_trigram = np.ones(codes.size, dtype=bool)
        in_trigram[ends - 1] = False
        in_trigram[ends - 2] = False
        first = np.flatnonzero(in_trigram)
        keys = (codes[first] << _U64(42)) | (codes[first + 1] << _U64(21)) | codes[first + 2]
        trigram_hashes = _mix(keys ^ _SALT_TRIGRAM)
        # Lay out: each word's own feature, then its trigrams (padded length - 2 of them).
        self.count = padded_lengths - 1
        self.start = np.cumsum(self.count) - self.count
        is_word = np.zeros(int(self.count.sum()), dtype=bool)
        is_word[self.start] = True
        hashes = np.empty(is_word.size, dtype=np.uint64)
        hashes[is_word] = word_hashes
        hashes[~is_word] = trigram_hashes
        self.bucket = (hashes % _U64(dimensions)).astype(np.int64)
        weight = np.where(is_word, 1.0, _TRIGRAM_WEIGHT)
        self.value = np.where(hashes >> _U64(63) == 1, weight, -weight)


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
        vectors: list[list[float]] = self._unit_rows(texts).tolist()
        return vectors

    def embed_array(self, texts: list[str]) -> np.ndarray:
        """The vectors of `texts` as one float32 array, a row per text: what bulk writers pack
        straight into the database's binary format (float32 is what pgvector stores)."""
        return self._unit_rows(texts).astype(np.float32)

    def _unit_rows(self, texts: list[str]) -> np.ndarray:
        dimensions = self.dimensions
        tokens: list[str] = []
        tokens_per_text: list[int] = []
        for text in texts:
            words = _WORD.findall(text.casefold())
            tokens_per_text.append(len(words))
            tokens += words
        if tokens:
            distinct = {word: number for number, word in enumerate(dict.fromkeys(tokens))}
            features = _Features(list(distinct), dimensions)
            word_of_token = np.fromiter(map(distinct.__getitem__, tokens), np.int64, len(tokens))
            text_of_token = np.repeat(np.arange(len(texts)), tokens_per_text)
            # Each token's features, gathered from its word's: counts, then positions.
            counts = features.count[word_of_token]
            first_of_token = np.cumsum(counts) - counts
            positions = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(
                features.start[word_of_token] - first_of_token, counts
            )
            cells = np.repeat(text_of_token, counts) * dimensions + features.bucket[positions]
            rows = np.bincount(
                cells, weights=features.value[positions], minlength=len(texts) * dimensions
            ).reshape(len(texts), dimensions)
        else:
            rows = np.zeros((len(texts), dimensions), dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        empty = norms == 0.0
        rows[empty, 0] = 1.0  # no words: still a unit vector, so cosine distance stays defined
        norms[empty] = 1.0
        unit: np.ndarray = rows / norms[:, None]
        return unit
