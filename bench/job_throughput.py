"""Memory-job throughput of the service as shipped: jobs/s, POST-to-success latency and CPU per job
of every process tree, with an OpenAI-compatible model that answers after a set delay. Prints one
JSON object.

    .venv/bin/python bench/job_throughput.py                     # the issue's three reference rows
    .venv/bin/python bench/job_throughput.py --quick             # a smoke run, about a minute
    .venv/bin/python bench/job_throughput.py --llm-delay-ms 0,300,1000 --mode burst --users 100
    .venv/bin/python bench/job_throughput.py --pool threads --concurrency 64 --llm-delay-ms 300 \\
        --mode burst --clients 16                                 # a tuned run

The stack is `python -m memoryproject.run` itself (what `make run` starts: uvicorn, one Celery
worker per lane, beat, the event consumers), on a free loopback port, against the scratch database
`memory_bench` and Redis db 15, with LLM_PROVIDER=openai pointed at tests/fake_openai.py run as its
own process (`--delay`: every chat call, extraction and decision alike, answers after it; two
calls per job). The embedder is the offline one unless `--embedder openai` (then the fake serves
embeddings too, with no delay). As shipped, every setting the runner reads (WORKER_POOL, the
lanes' concurrency, WEB_CONCURRENCY, LOG_LEVEL...) is left at its default; `--pool`,
`--concurrency`, `--web-workers` and `--set KEY=VALUE` make a tuned run, and say so in the JSON.

Each job is a short conversation of first-person statements from a seeded generator (cities,
employers, tastes, pets, sports...): 1 to 3 facts a job, and a user's later jobs repeat, reword,
change or retract what it said before, so the decider answers ADD, UPDATE, NONE and DELETE as it
would with real users.

Modes: `closed-loop`: each client thread POSTs a job, polls GET /v1/requests/{id} every
`--poll-ms` until success, then posts the next; `burst`: the client threads POST every job as fast
as they can, then the bench waits for all of them (reading PostgreSQL, not the API).
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import logging
import os
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import common  # first: it puts the project on sys.path

from memories.providers.offline import RuleBasedLLM

# --- The workload: varied first-person statements -----------------------------------------------

CITIES = [
    "Lisbon", "Porto", "Berlin", "Hamburg", "Munich", "Vienna", "Zurich", "Geneva", "Lyon",
    "Marseille", "Barcelona", "Valencia", "Seville", "Bologna", "Turin", "Naples", "Krakow",
    "Prague", "Budapest", "Ljubljana", "Oslo", "Bergen", "Stockholm", "Uppsala", "Helsinki",
    "Tallinn", "Riga", "Dublin", "Galway", "Edinburgh", "Leeds", "Bristol", "Montreal",
    "Toronto", "Vancouver", "Seattle", "Portland", "Denver", "Austin", "Boston", "Kyoto",
    "Osaka", "Melbourne", "Wellington", "Cape Town", "Nairobi", "Santiago", "Lima",
]  # fmt: skip
EMPLOYERS = [
    "Siemens", "Bosch", "Philips", "Nokia", "Ericsson", "Spotify", "Zalando", "Adyen",
    "Booking", "Shopify", "Atlassian", "Canonical", "Mozilla", "Red Hat", "Airbus", "Lego",
    "Ikea", "Maersk", "Novartis", "Roche", "Unilever", "Danone", "Heineken", "Decathlon",
    "Michelin", "Renault", "Volvo", "Scania", "Vestas", "Orsted", "the city council",
    "a small bakery", "a law firm", "a bike shop", "the public library", "a local newspaper",
]  # fmt: skip
OCCUPATIONS = [
    "a nurse", "an architect", "a carpenter", "a data analyst", "a teacher", "a pharmacist",
    "a translator", "a plumber", "an electrician", "a software engineer", "a paramedic",
    "a librarian", "a chef", "a physiotherapist", "an accountant", "a journalist", "a pilot",
    "a dentist", "a photographer", "a gardener", "a baker", "a veterinarian", "a lawyer",
]  # fmt: skip
FAVOURITES = {
    "colour": ["teal", "crimson", "ochre", "navy blue", "olive green", "lavender", "amber"],
    "season": ["spring", "autumn", "winter", "summer"],
    "book": ["Dune", "Middlemarch", "The Hobbit", "Beloved", "Stoner", "Solaris", "Emma"],
    "film": ["Alien", "Amelie", "Heat", "Paprika", "Jaws", "Arrival", "Vertigo", "Ran"],
    "band": ["Radiohead", "Abba", "Portishead", "Queen", "Blur", "Kraftwerk", "Daft Punk"],
    "cuisine": ["Ethiopian", "Georgian", "Peruvian", "Korean", "Lebanese", "Sichuan"],
}
FOODS = [
    "ramen", "sourdough bread", "dark chocolate", "pickled herring", "spicy curries",
    "fresh figs", "blue cheese", "grilled sardines", "mushroom risotto", "falafel", "kimchi",
    "pumpkin soup", "lemon tart", "oysters", "dumplings", "goat cheese", "roasted chestnuts",
    "black olives", "tacos al pastor", "miso soup", "apple strudel", "pad thai", "baklava",
]  # fmt: skip
HOBBIES = [
    "hiking in the mountains", "baking bread on Sundays", "birdwatching", "restoring old radios",
    "growing tomatoes", "building model trains", "playing board games", "wild swimming",
    "writing short stories", "pottery", "rock climbing", "sailing", "knitting scarves",
    "fly fishing", "stargazing", "woodworking", "salsa dancing", "urban sketching",
    "brewing beer", "solving crosswords", "geocaching", "foraging mushrooms", "kayaking",
]  # fmt: skip
SPORTS = [
    "tennis", "squash", "badminton", "volleyball", "football", "basketball", "handball",
    "table tennis", "golf", "rugby", "cricket", "padel", "water polo", "hockey", "chess",
]  # fmt: skip
SPORT_TIMES = [
    "every Monday", "every Tuesday evening", "on weekends", "twice a week", "every Friday",
    "with my colleagues", "at the local club", "every Sunday morning", "with my brother",
]  # fmt: skip
INSTRUMENTS = ["piano", "violin", "cello", "guitar", "drums", "trumpet", "flute", "banjo"]
LANGUAGES = [
    "Portuguese", "German", "Japanese", "Italian", "Swahili", "Finnish", "Korean", "Dutch",
    "Polish", "Greek", "Arabic", "Turkish", "Hungarian", "Catalan", "Icelandic", "Hindi",
]  # fmt: skip
DRINKS = [
    "green tea", "black coffee", "oat milk lattes", "mint tea", "espresso", "matcha",
    "hot chocolate", "rooibos", "kombucha", "orange juice",
]  # fmt: skip
PETS = ["dog", "cat", "parrot", "rabbit", "tortoise", "hamster", "goldfish", "ferret"]
NAMES = [
    "Biscuit", "Pepper", "Luna", "Oscar", "Mochi", "Ziggy", "Nala", "Bruno", "Olive", "Pixel",
    "Tofu", "Marble", "Juno", "Rocket", "Clementine", "Waffles", "Basil", "Koda", "Saffron",
]  # fmt: skip
ALLERGIES = ["peanuts", "shellfish", "cats", "pollen", "penicillin", "gluten", "bee stings"]
OPENERS = ["", "", "", "Hi! ", "Hey, ", "So, ", "Oh, and ", "By the way, ", "Well, ", "Okay. "]
ASIDES = [
    "Can you suggest a good recipe for tonight?",
    "What should I read next?",
    "Thanks!",
    "That sounds great.",
    "Could you help me plan a weekend trip?",
    "Any tips for sleeping better?",
    "Is it going to rain tomorrow?",
]
ASSISTANT_LINES = [
    "Nice to meet you! Tell me more about yourself.",
    "Got it. Anything else I should know?",
    "Thanks for sharing. How can I help today?",
    "Noted! What would you like to do next?",
]


# The fake model extracts with these same rules: the generator uses them to keep a job's
# statements apart.
_RULES = RuleBasedLLM()


def _as_user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class Persona:
    """What one user has said so far and still holds true, so that later jobs can repeat,
    change or retract it.

    `said` maps a slot ("city", "employer", a favourite thing, "sport:tennis", or the statement
    itself) to the latest statement that filled it; `touched` is the slots of the current job, so
    one job never both says and changes (or retracts) the same thing.
    """

    rng: random.Random
    said: dict[str, str] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)

    def _say(self, slot: str, statement: str) -> str:
        self.said[slot] = statement
        self.touched.add(slot)
        return statement

    def _known(self, prefix: str) -> list[str]:
        return [s for s in self.said if s.startswith(prefix) and s not in self.touched]

    def fresh(self) -> str:
        """A statement of something not said before (the decider's ADD)."""
        makers = [self._new_like, self._new_hobby, self._new_sport, self._new_pet]
        makers += [self._new_language, self._new_drink, self._new_instrument, self._new_allergy]
        if "city" not in self.said:
            makers += [self._new_city] * 3
        if "employer" not in self.said:
            makers += [self._new_employer] * 2
        if "occupation" not in self.said:
            makers.append(self._new_occupation)
        if any(thing not in self.said for thing in FAVOURITES):
            makers += [self._new_favourite] * 2
        return self.rng.choice(makers)()

    def later(self) -> str:
        """A statement for a later job: new, repeated or reworded (NONE), changed or detailed
        (UPDATE), or retracted (DELETE), in proportions a chatty user might show."""
        options: list[tuple[float, Any]] = [(0.35, self.fresh)]
        if [slot for slot in self.said if slot not in self.touched]:
            options.append((0.12, self._repeat))
        if self._known("city") or self._known("employer"):
            options.append((0.10, self._reword))
        if self._changeable():
            options.append((0.20, self._change))
        if self._known("sport:"):
            options.append((0.13, self._detail))
        if self._known("sport:") or self._known("drink:"):
            options.append((0.07, self._retract))
        weights, makers = zip(*options, strict=True)
        return self.rng.choices(makers, weights=weights)[0]()

    # Fresh statements.
    def _new_city(self) -> str:
        form = self.rng.choice(["I live in {}.", "I am based in {}.", "I live in {} now."])
        return self._say("city", form.format(self.rng.choice(CITIES)))

    def _new_employer(self) -> str:
        preposition, employer = self.rng.choice(["at", "for"]), self.rng.choice(EMPLOYERS)
        return self._say("employer", f"I work {preposition} {employer}.")

    def _new_occupation(self) -> str:
        return self._say("occupation", f"I work as {self.rng.choice(OCCUPATIONS)}.")

    def _new_favourite(self) -> str:
        thing = self.rng.choice([t for t in FAVOURITES if t not in self.said])
        spelled = thing if self.rng.random() < 0.5 else thing.replace("colour", "color")
        value = self.rng.choice(FAVOURITES[thing])
        return self._say(thing, f"My favourite {spelled} is {value}.")

    def _new_like(self) -> str:
        verb = self.rng.choice(["like", "love", "really like", "adore"])
        return self._plain(f"I {verb} {self.rng.choice(FOODS)}.")

    def _new_hobby(self) -> str:
        verb = self.rng.choice(["enjoy", "love", "am into"])
        return self._plain(f"I {verb} {self.rng.choice(HOBBIES)}.")

    def _new_sport(self) -> str:
        sport = self.rng.choice(SPORTS)
        if f"sport:{sport}" in self.said:
            return self._new_like()
        return self._say(f"sport:{sport}", f"I play {sport}.")

    def _new_pet(self) -> str:
        pet, name = self.rng.choice(PETS), self.rng.choice(NAMES)
        return self._plain(f"I have a {pet} {self.rng.choice(['called', 'named'])} {name}.")

    def _new_language(self) -> str:
        form = self.rng.choice(["I speak {}.", "I am learning {}.", "I speak some {}."])
        return self._plain(form.format(self.rng.choice(LANGUAGES)))

    def _new_drink(self) -> str:
        drink = self.rng.choice(DRINKS)
        if f"drink:{drink}" in self.said:
            return self._new_hobby()
        when = self.rng.choice(["every morning", "after lunch", "daily"])
        return self._say(f"drink:{drink}", f"I drink {drink} {when}.")

    def _new_instrument(self) -> str:
        return self._plain(f"I play the {self.rng.choice(INSTRUMENTS)}.")

    def _new_allergy(self) -> str:
        return self._plain(f"I am allergic to {self.rng.choice(ALLERGIES)}.")

    def _plain(self, statement: str) -> str:
        return self._say(statement, statement)

    # What later jobs add.
    def _repeat(self) -> str:
        """Something said before, word for word: NONE."""
        slot = self.rng.choice([slot for slot in self.said if slot not in self.touched])
        self.touched.add(slot)
        return self.said[slot]

    def _reword(self) -> str:
        """The same fact in other words: stored as it is, so NONE."""
        slot = self.rng.choice(self._known("city") + self._known("employer"))
        self.touched.add(slot)
        fact = _RULES.extract_facts(_as_user(self.said[slot]))[0]  # "Lives in Lima"
        value = fact.split(" ", 2)[2]
        if slot == "city":
            return self.rng.choice(["I am living in {}.", "I am based in {}."]).format(value)
        return f"I work {self.rng.choice(['at', 'for'])} {value}."

    def _changeable(self) -> list[str]:
        """The one-value slots known and not yet set in this job."""
        return [s for s in ["city", "employer", *FAVOURITES] if s in self.said]

    def _change(self) -> str:
        """A one-value attribute gets a new value: UPDATE of the stored one."""
        slot = self.rng.choice([s for s in self._changeable() if s not in self.touched] or [""])
        if not slot:
            return self.fresh()
        if slot == "city":
            city = self.rng.choice([c for c in CITIES if c not in self.said["city"]])
            form = self.rng.choice(["I moved to {}.", "I have moved to {}.", "I live in {} now."])
            return self._say("city", form.format(city))
        if slot == "employer":
            employer = self.rng.choice([e for e in EMPLOYERS if e not in self.said["employer"]])
            return self._say("employer", f"I got a new job at {employer}.")
        value = self.rng.choice([v for v in FAVOURITES[slot] if v not in self.said[slot]])
        return self._say(slot, f"Actually, my favourite {slot} is {value} now.")

    def _detail(self) -> str:
        """A known fact with more words: UPDATE."""
        slot = self.rng.choice(self._known("sport:"))
        return self._say(slot, f"I play {slot[6:]} {self.rng.choice(SPORT_TIMES)}.")

    def _retract(self) -> str:
        """Something stopped being true: DELETE (the memory is closed)."""
        slot = self.rng.choice(self._known("sport:") + self._known("drink:"))
        del self.said[slot]
        self.touched.add(slot)
        kind, thing = slot.split(":", 1)
        if kind == "sport":
            return f"I no longer play {thing}."
        return f"I stopped drinking {thing}."


def _conversation(persona: Persona, first: bool) -> list[dict[str, str]]:
    rng = persona.rng
    count = rng.choices([1, 2, 3], weights=[0.35, 0.4, 0.25])[0]
    statements: list[str] = []
    facts: set[str] = set()
    persona.touched.clear()
    for _ in range(count * 3):  # bounded: a repeat may come up twice
        before = dict(persona.said)
        statement = persona.fresh() if first else persona.later()
        # One statement a fact: "I live in Lima. I am based in Lima." is no way to talk.
        said = {fact.casefold() for fact in _RULES.extract_facts(_as_user(statement))}
        if said and not said & facts:
            statements.append(statement)
            facts |= said
        else:
            persona.said = before  # not said after all
        if len(statements) == count:
            break
    joinable = len(statements) >= 2 and statements[1].startswith("I ")
    if joinable and rng.random() < 0.3:  # "I live in X and I work at Y."
        first_clause, second = statements[0].rstrip("."), statements[1]
        statements[:2] = [f"{first_clause} and {second}"]
    if not statements[0].startswith("Actually"):
        statements[0] = rng.choice(OPENERS) + statements[0]
    if rng.random() < 0.4:
        statements.insert(rng.randrange(1, len(statements) + 1), rng.choice(ASIDES))
    if len(statements) >= 2 and rng.random() < 0.3:  # two user turns with a reply between
        cut = rng.randrange(1, len(statements))
        return [
            {"role": "user", "content": " ".join(statements[:cut])},
            {"role": "assistant", "content": rng.choice(ASSISTANT_LINES)},
            {"role": "user", "content": " ".join(statements[cut:])},
        ]
    return [{"role": "user", "content": " ".join(statements)}]


def user_conversations(seed: str, user_index: int, jobs: int) -> list[list[dict[str, str]]]:
    """The `jobs` conversations of one user, in the order they are sent. Deterministic per
    (seed, user_index); no two of a user's jobs are the same (the service refuses a duplicate
    with 409)."""
    persona = Persona(random.Random(f"{seed}:{user_index}"))
    conversations: list[list[dict[str, str]]] = []
    seen: set[str] = set()
    for n in range(jobs):
        for _ in range(10):
            messages = _conversation(persona, first=n == 0)
            key = repr(messages)
            if key not in seen:
                break
        seen.add(key)
        conversations.append(messages)
    return conversations


def workload(seed: str, users: int, jobs_per_user: int) -> list[tuple[int, list[dict[str, str]]]]:
    """(user index, messages) for every job, round by round: every user's first job, then every
    user's second... so a user's later job usually meets what its earlier job stored."""
    per_user = [user_conversations(seed, u, jobs_per_user) for u in range(users)]
    return [(u, per_user[u][r]) for r in range(jobs_per_user) for u in range(users)]


# --- The stack: memoryproject.run, the fake model -----------------------------------------------

# What the runner and the settings read to size and shape the service: unset for an as-shipped run.
TUNING_SETTINGS = (
    "WORKER_POOL",
    "HIGH_WORKER_CONCURRENCY",
    "WORKER_CONCURRENCY",
    "BATCH_WORKER_CONCURRENCY",
    "WEB_CONCURRENCY",
    "EMBEDDING_BATCH_WINDOW_MS",
    "LLM_REQUEST_TIMEOUT_SECONDS",
    "LLM_CLIENT_MAX_RETRIES",
    "LLM_MODEL",
    "EMBEDDING_MODEL",
    "EMBEDDING_DIMENSIONS",
    "MEMORY_NEIGHBOURS_PER_FACT",
    "MEMORY_JOB_LEASE_SECONDS",
    "MEMORY_SWEEP_INTERVAL_SECONDS",
    "CONN_MAX_AGE",
)


LANES = ("high", "default", "batch")


@dataclass
class Stack:
    fake: common.ManagedProcess
    runner: common.ManagedProcess
    web: common.WebServer
    roles: dict[str, int]  # process tree name -> pid


def start_fake(env: dict[str, str], delay_ms: float) -> tuple[common.ManagedProcess, str]:
    """tests/fake_openai.py as its own process (its CPU is its own tree); returns its base URL."""
    command = [sys.executable, "-m", "tests.fake_openai", "--port", "0"]
    command += ["--delay", str(delay_ms / 1000)]
    process = common.spawn(f"fake-llm-{delay_ms:g}ms", command, env)
    deadline = time.monotonic() + 30
    while True:
        first = process.log_tail(1).strip()
        if first.startswith("http://"):
            return process, first
        if not process.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the fake model did not start:\n{process.log_tail()}")
        time.sleep(0.05)


def _roles(runner_pid: int) -> dict[str, int]:
    """The runner's children by what they are (as named in memoryproject/run.py)."""
    import psutil

    roles: dict[str, int] = {}
    for child in psutil.Process(runner_pid).children():
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "uvicorn" in command:
            roles["web"] = child.pid
        elif "worker" in command and "-Q" in command:
            roles[f"worker_{command[command.index('-Q') + 1]}"] = child.pid
        elif "beat" in command:
            roles["beat"] = child.pid
        elif "consume_events" in command:
            roles["consumers"] = child.pid
    return roles


def _lanes_ready(runner: common.ManagedProcess) -> bool:
    """Each lane's worker logged "<lane>@<host> ready." (at INFO, as the runner starts them)."""
    try:
        text = runner.log_path.read_text(errors="replace")
    except OSError:
        return False
    return all(re.search(rf"\b{lane}@\S+ ready\.", text) for lane in LANES)


def start_stack(env: dict[str, str], var_dir: str) -> tuple[common.ManagedProcess, int, dict]:
    """`python -m memoryproject.run` on a free port; returns it, the port and its children once
    /healthz answers and every child is up."""
    import httpx

    port = common.free_port()
    runner_env = {**env, "HOST": "127.0.0.1", "PORT": str(port), "MEMORY_VAR_DIR": var_dir}
    command = [sys.executable, "-m", "memoryproject.run"]
    runner = common.spawn("memoryproject-run", command, runner_env)
    url = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + 120
    roles: dict[str, int] = {}
    up_since = 0.0
    expected = {"web", "beat", "consumers", *(f"worker_{lane}" for lane in LANES)}
    while True:
        if not runner.alive():
            raise RuntimeError(f"memoryproject.run exited:\n{runner.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"memoryproject.run not ready in 120s:\n{runner.log_tail()}")
        try:
            healthy = httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            healthy = False
        roles = _roles(runner.pid) if healthy else {}
        if healthy and expected <= roles.keys():
            up_since = up_since or time.monotonic()
            # Below INFO (`--set LOG_LEVEL=WARNING`) there is no line: the warm-up jobs tell.
            if _lanes_ready(runner) or time.monotonic() - up_since > 30:
                return runner, port, roles
        time.sleep(0.2)


# --- Running a scenario ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    llm_delay_ms: float
    mode: str  # closed-loop | burst
    clients: int
    users: int
    jobs_per_user: int

    @property
    def name(self) -> str:
        return (
            f"llm {self.llm_delay_ms:g} ms, {self.mode}, {self.clients} client(s), "
            f"{self.users} users x {self.jobs_per_user}"
        )


@dataclass
class Outcome:
    request_ids: list[str] = field(default_factory=list)
    post_started: dict[str, float] = field(default_factory=dict)  # id -> time.time()
    seen_latency: list[float] = field(default_factory=list)  # POST start -> success seen
    post_latency: list[float] = field(default_factory=list)
    polls: int = 0
    refused: Counter = field(default_factory=Counter)  # non-202 status -> count
    failed_seen: int = 0
    timed_out: int = 0
    last_seen: float = 0.0  # monotonic
    transport_errors: list[str] = field(default_factory=list)  # a client stops at its first


def _post(
    http: Any,
    user_id: str,
    messages: list,
    outcome: Outcome,
    lock: threading.Lock,
    wait_seconds: float = 0,
) -> tuple[str, str]:
    """POST the job (with `"wait"` when given: then a 200 brings its finished status); its
    request id and the status the answer gave ("" when refused)."""
    wall, started = time.time(), time.monotonic()
    body: dict[str, Any] = {"user_id": user_id, "messages": messages}
    if wait_seconds:
        body["wait"] = wait_seconds
    response = http.post("/v1/memories", json=body, timeout=wait_seconds + 30)
    elapsed = time.monotonic() - started
    with lock:
        outcome.post_latency.append(elapsed)
        if response.status_code not in (200, 202):
            outcome.refused[str(response.status_code)] += 1
            common.log(f"POST {response.status_code}: {response.text[:200]}")
            return "", ""
        answer = response.json()
        request_id = answer["request_id"]
        outcome.request_ids.append(request_id)
        outcome.post_started[request_id] = wall
        return request_id, answer.get("status", "")


def run_clients(
    *,
    base_url: str,
    tenancy: common.Tenancy,
    jobs: list[tuple[int, list[dict[str, str]]]],
    clients: int,
    closed_loop: bool,
    poll_seconds: float,
    poll_max_seconds: float,
    job_timeout: float,
    deadline: float,
    wait_seconds: float = 0,
) -> Outcome:
    """The client threads: each takes the next job; closed-loop ones poll it to the end. No job is
    sent, and no poll made, after `deadline` (monotonic): the runtime cap must leave time to read
    the figures and stop."""
    outcome = Outcome()
    lock = threading.Lock()
    todo: queue.SimpleQueue[tuple[int, list[dict[str, str]]]] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)

    def client() -> None:
        import httpx

        with common.http_client(base_url, tenancy.headers) as http:
            while time.monotonic() < deadline:
                try:
                    user_index, messages = todo.get_nowait()
                except queue.Empty:
                    return
                started = time.monotonic()
                try:
                    request_id, status = _post(
                        http, tenancy.user_ids[user_index], messages, outcome, lock, wait_seconds
                    )
                    if closed_loop and request_id:
                        _poll(http, request_id, started, status)
                except httpx.HTTPError as exc:  # on loopback: the service is gone
                    with lock:
                        outcome.transport_errors.append(f"{type(exc).__name__}: {exc}")
                    return

    def _poll(http: Any, request_id: str, started: float, status: str) -> None:
        """Poll until the job ends, unless the POST's own answer (a wait) already said so."""
        interval, polls = poll_seconds, 0
        give_up = min(started + job_timeout, deadline)
        while status not in ("success", "failure") and time.monotonic() < give_up:
            time.sleep(interval)
            interval = min(interval * 1.5, poll_max_seconds)
            polls += 1
            response = http.get(f"/v1/requests/{request_id}")
            status = response.json().get("status", "") if response.status_code == 200 else ""
            if status in ("success", "failure"):
                break
        seen = time.monotonic()
        with lock:
            outcome.polls += polls
            if status == "success":
                outcome.seen_latency.append(seen - started)
                outcome.last_seen = max(outcome.last_seen, seen)
            elif status == "failure":
                outcome.failed_seen += 1
            else:
                outcome.timed_out += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0) + 60)
    return outcome


def _ledger(bench: common.BenchEnv, request_ids: list[str]) -> dict[str, Any]:
    """What PostgreSQL says about the scenario's requests: statuses, attempts, times, events."""
    with common.raw_connection(bench) as conn:
        rows = conn.execute(
            """SELECT id::text, status, attempts, extract(epoch FROM created_at),
                      extract(epoch FROM finished_at)
               FROM memories_memoryrequest WHERE id = ANY(%s::uuid[])""",
            [request_ids],
        ).fetchall()
        events = conn.execute(
            """SELECT e->>'event', count(*) FROM memories_memoryrequest r,
                      jsonb_array_elements(CASE WHEN jsonb_typeof(r.result) = 'array'
                                                THEN r.result ELSE '[]'::jsonb END) e
               WHERE r.id = ANY(%s::uuid[]) GROUP BY 1""",
            [request_ids],
        ).fetchall()
    return {"rows": rows, "events": {str(kind): int(n) for kind, n in events}}


def _wait_all(bench: common.BenchEnv, request_ids: list[str], timeout: float) -> int:
    """Wait (reading PostgreSQL every 50 ms) until every request is finished; returns reads made."""
    reads = 0
    deadline = time.monotonic() + timeout
    with common.raw_connection(bench) as conn:
        while time.monotonic() < deadline:
            reads += 1
            (pending,) = conn.execute(
                """SELECT count(*) FROM memories_memoryrequest
                   WHERE id = ANY(%s::uuid[]) AND status NOT IN ('success', 'failure')""",
                [request_ids],
            ).fetchone()
            if not pending:
                break
            time.sleep(0.05)
    return reads


def run_scenario(
    *,
    bench: common.BenchEnv,
    stack: Stack,
    scenario: Scenario,
    seed: str,
    args: argparse.Namespace,
    deadline: float,
) -> dict[str, Any]:
    tenancy = common.create_tenancy("bench-jobs", scenario.users)
    jobs = workload(seed, scenario.users, scenario.jobs_per_user)
    facts = sum(len(_RULES.extract_facts(messages)) for _, messages in jobs)
    pids = {**stack.roles, "fake_llm": stack.fake.pid, **common.server_pids(bench)}
    pids["bench_client"] = os.getpid()
    load_start = [round(x, 2) for x in os.getloadavg()]
    closed_loop = scenario.mode == "closed-loop"
    cpu_before = common.cpu_snapshot(pids)
    first_post_wall, first_post = time.time(), time.monotonic()
    outcome = run_clients(
        base_url=stack.web.base_url,
        tenancy=tenancy,
        jobs=jobs,
        clients=scenario.clients,
        closed_loop=closed_loop,
        poll_seconds=args.poll_ms / 1000,
        poll_max_seconds=max(args.poll_max_ms, args.poll_ms) / 1000,
        job_timeout=args.job_timeout,
        deadline=deadline,
        wait_seconds=args.wait_seconds if closed_loop else 0,
    )
    posted = time.monotonic()
    if not stack.runner.alive():
        raise RuntimeError(
            f"memoryproject.run stopped during {scenario.name!r} (exit code "
            f"{stack.runner.popen.returncode}; a signal from outside?):\n{stack.runner.log_tail()}"
        )
    db_reads = 0
    if not closed_loop:
        db_reads = _wait_all(bench, outcome.request_ids, max(deadline - time.monotonic(), 1))
    cpu = common.cpu_delta(cpu_before, common.cpu_snapshot(pids))
    ledger = _ledger(bench, outcome.request_ids)
    load_end = [round(x, 2) for x in os.getloadavg()]

    statuses = Counter(status for _, status, *_ in ledger["rows"])
    success = statuses.get("success", 0)
    finished = [row for row in ledger["rows"] if row[1] == "success" and row[4] is not None]
    server_latency = [float(done) - float(created) for _, _, _, created, done in finished]
    to_finished = [float(done) - outcome.post_started[rid] for rid, _, _, _, done in finished]
    if closed_loop:
        elapsed = (outcome.last_seen or time.monotonic()) - first_post
        post_to_success = outcome.seen_latency
    else:
        last = max((float(row[4]) for row in finished), default=time.time())
        elapsed = last - first_post_wall
        post_to_success = to_finished
    attempts = [int(row[2]) for row in ledger["rows"]]
    per_job = {name: round(s * 1000 / max(success, 1), 2) for name, s in cpu.items()}
    service = [n for n in cpu if n not in ("bench_client", "fake_llm")]
    per_job["service_total"] = round(sum(cpu[n] for n in service) * 1000 / max(success, 1), 2)
    changes = sum(ledger["events"].values())
    return {
        "scenario": scenario.name,
        "llm_delay_ms": scenario.llm_delay_ms,
        "mode": scenario.mode,
        "clients": scenario.clients,
        "users": scenario.users,
        "jobs_per_user": scenario.jobs_per_user,
        "jobs": len(jobs),
        "jobs_per_s": round(success / elapsed, 2) if elapsed > 0 else None,
        "seconds_first_post_to_last_success": round(elapsed, 2),
        "post_to_success": common.latency_summary(post_to_success),
        "post_to_success_measured_by": (
            "the client's poll that saw success" if closed_loop else "finished_at in PostgreSQL"
        ),
        "post_to_finished_at": common.latency_summary(to_finished),
        "created_to_finished_at": common.latency_summary(server_latency),
        "post_latency": common.latency_summary(outcome.post_latency),
        "post_rate_per_s": round(len(outcome.post_latency) / max(posted - first_post, 1e-9), 1),
        "status_polls": {
            "http_get_requests": outcome.polls,
            "per_job": round(outcome.polls / max(len(outcome.request_ids), 1), 2),
            "per_s": round(outcome.polls / max(posted - first_post, 1e-9), 1),
            "postgres_reads_by_the_bench": db_reads,
        },
        "cpu_ms_per_job": per_job,
        "cpu_cores_used": {name: round(s / max(elapsed, 1e-9), 2) for name, s in cpu.items()},
        "outcomes": {
            "not_sent_runtime_cap": len(jobs) - len(outcome.post_latency),
            "accepted": len(outcome.request_ids),
            "refused_by_status": dict(outcome.refused),
            "success": success,
            "failure": statuses.get("failure", 0),
            "not_finished": len(outcome.request_ids) - success - statuses.get("failure", 0),
            "client_timed_out": outcome.timed_out,
            "transport_errors": outcome.transport_errors[:5],
            "duplicate_deliveries_attempts_gt_1": sum(1 for a in attempts if a > 1),
            "max_attempts": max(attempts, default=0),
        },
        "decisions": {
            "facts_extracted": facts,
            "changes_by_event": ledger["events"],
            "none_or_ignored": facts - changes,
        },
        "load_avg": {"start": load_start, "end": load_end},
    }


def status_poll_cost(
    stack: Stack, tenancy: common.Tenancy, request_ids: list[str], gets: int = 300
) -> dict[str, Any]:
    """What one `GET /v1/requests/{id}` costs the web tree, alone: one client reads finished
    requests back to back, with nothing else in flight."""
    if not request_ids:
        return {}
    web = stack.roles["web"]
    latencies = []
    with common.http_client(stack.web.base_url, tenancy.headers) as http:
        before = common.tree_cpu_seconds(web)
        for n in range(gets):
            started = time.monotonic()
            http.get(f"/v1/requests/{request_ids[n % len(request_ids)]}").raise_for_status()
            latencies.append(time.monotonic() - started)
        cpu = common.tree_cpu_seconds(web) - before
    return {
        "gets": gets,
        "web_cpu_ms_per_get": round(cpu * 1000 / gets, 2),
        "latency": common.latency_summary(latencies),
    }


# --- Scenarios, stacks, main -------------------------------------------------------------------

REFERENCE = [  # the rows
    Scenario(0, "closed-loop", 1, 200, 2),
    Scenario(0, "closed-loop", 4, 200, 2),
    Scenario(300, "burst", 16, 200, 2),
]
QUICK = [
    Scenario(0, "closed-loop", 1, 30, 2),
    Scenario(0, "closed-loop", 4, 30, 2),
    Scenario(0, "burst", 8, 30, 2),
]


def _numbers(text: str, kind: type = float) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def scenarios_from(args: argparse.Namespace) -> list[Scenario]:
    explicit = args.llm_delay_ms is not None or args.clients is not None or args.mode is not None
    users, per_user = args.users, args.jobs_per_user
    if not explicit:
        preset = QUICK if args.quick else REFERENCE
        return [
            Scenario(
                s.llm_delay_ms, s.mode, s.clients, users or s.users, per_user or s.jobs_per_user
            )
            for s in preset
        ]
    delays = _numbers(args.llm_delay_ms or "0")
    clients = _numbers(args.clients or "1", int)
    modes = [m for m in (args.mode or "closed-loop").split(",") if m]
    for mode in modes:
        if mode not in ("closed-loop", "burst"):
            raise SystemExit(f"--mode: closed-loop or burst, not {mode!r}")
    default_users = 30 if args.quick else 200
    return [
        Scenario(delay, mode, count, users or default_users, per_user or 2)
        for delay, mode, count in itertools.product(delays, modes, clients)
    ]


def _tuning(args: argparse.Namespace) -> dict[str, str]:
    tuning = {}
    if args.pool:
        tuning["WORKER_POOL"] = args.pool
    if args.concurrency:
        tuning["WORKER_CONCURRENCY"] = str(args.concurrency)
    if args.web_workers:
        tuning["WEB_CONCURRENCY"] = str(args.web_workers)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, not {item!r}")
        tuning[key] = value
    return tuning


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-delay-ms", help="comma-separated delays of each chat call")
    parser.add_argument("--mode", help="closed-loop, burst, or both comma-separated")
    parser.add_argument("--clients", help="comma-separated client thread counts")
    parser.add_argument("--users", type=int, help="users per scenario (default 200, quick 30)")
    parser.add_argument("--jobs-per-user", type=int, help="jobs per user (default 2)")
    parser.add_argument("--embedder", choices=("offline", "openai", "local"), default="offline")
    parser.add_argument("--as-shipped", action="store_true", help="the default: no tuning")
    parser.add_argument("--pool", choices=("prefork", "threads", "solo"), help="WORKER_POOL")
    parser.add_argument("--concurrency", type=int, help="WORKER_CONCURRENCY (`default` lane)")
    parser.add_argument("--web-workers", type=int, help="WEB_CONCURRENCY (uvicorn --workers)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting"
    )
    parser.add_argument("--poll-ms", type=float, default=20, help="closed-loop poll interval")
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=0,
        help='closed-loop: POST with "wait" (at most 20): the answer is the finished job',
    )
    parser.add_argument("--poll-max-ms", type=float, default=0, help="backoff cap (x1.5 a poll)")
    parser.add_argument("--job-timeout", type=float, default=300, help="seconds, per job")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured jobs a stack (min 1)")
    parser.add_argument("--seed", default="jobs")
    parser.add_argument("--quick", action="store_true", help="30 users x 2, instant LLM only")
    parser.add_argument("--max-seconds", type=float, help="total runtime cap (default 1500)")
    args = parser.parse_args()
    tuning = _tuning(args)
    if args.as_shipped and tuning:
        raise SystemExit("--as-shipped takes no --pool/--concurrency/--web-workers/--set")
    scenarios = scenarios_from(args)
    cap = args.max_seconds or (300 if args.quick else 1500)
    common.install_runtime_cap(cap)
    started = time.monotonic()
    load_at_start = common.machine()
    var_dir = tempfile.mkdtemp(prefix="memory-bench-run-")
    atexit.register(shutil.rmtree, var_dir, True)
    # As shipped: the settings' own defaults, logging and rate limiting included.
    shipped: dict[str, Any] = dict.fromkeys(TUNING_SETTINGS)
    shipped.update(LOG_LEVEL=None, LOG_FORMAT=None, RATE_LIMIT_PER_SECOND=None)
    results = []
    poll_costs: dict[str, Any] = {}
    skipped: list[str] = []  # no time left under the runtime cap
    try:
        bench = common.prepare(shipped)
        # This process logs at the shipped INFO too: keep its HTTP client quiet.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        for delay in dict.fromkeys(s.llm_delay_ms for s in scenarios):
            # What is left of the cap, less time to read the figures and stop.
            deadline = started + cap - 45
            group = [s for s in scenarios if s.llm_delay_ms == delay]
            if deadline - time.monotonic() < 40:  # no time for a stack start and a scenario
                skipped += [s.name for s in group]
                continue
            fake, base_url = start_fake(bench.env, delay)
            common.log(f"fake model at {base_url}, {delay:g} ms a chat call")
            model = {
                "LLM_PROVIDER": "openai",
                "EMBEDDING_PROVIDER": args.embedder,
                "OPENAI_BASE_URL": base_url,
                "OPENAI_API_KEY": "bench-fake-key",
            }
            runner, port, roles = start_stack({**bench.env, **model, **tuning}, var_dir)
            stack = Stack(fake, runner, common.WebServer(runner, port), roles)
            common.log(f"memoryproject.run up on port {port}: {', '.join(sorted(roles))}")
            # Unmeasured jobs: imports, connections and caches warm up; their requests are
            # then what the status-poll probe reads.
            warmup = max(args.warmup, 1)
            warm = common.create_tenancy("bench-warmup", warmup)
            warmed = run_clients(
                base_url=stack.web.base_url,
                tenancy=warm,
                jobs=workload(f"{args.seed}-warmup", warmup, 1),
                clients=2,
                closed_loop=True,
                poll_seconds=0.02,
                poll_max_seconds=0.02,
                job_timeout=120,
                deadline=min(time.monotonic() + 120, deadline),
            )
            for scenario in group:
                if deadline - time.monotonic() < 10:
                    skipped.append(scenario.name)
                    continue
                common.log(scenario.name)
                result = run_scenario(
                    bench=bench,
                    stack=stack,
                    scenario=scenario,
                    seed=f"{args.seed}-{len(results)}",
                    args=args,
                    deadline=deadline,
                )
                results.append(result)
                common.log(
                    f"  {result['jobs_per_s']} jobs/s, p50 {result['post_to_success']['p50_ms']}"
                    f" ms, p99 {result['post_to_success']['p99_ms']} ms, service "
                    f"{result['cpu_ms_per_job']['service_total']} ms CPU/job"
                )
            poll_costs[f"{delay:g}"] = status_poll_cost(stack, warm, warmed.request_ids)
            runner.stop(timeout=30)
            fake.stop()
    finally:
        common.stop_all()
    return {
        "benchmark": "job_throughput",
        "machine": load_at_start,
        "config": {
            "stack": "python -m memoryproject.run (web, a worker per lane, beat, consumers)",
            "run": "tuned" if tuning else "as shipped",
            "settings_changed": tuning,
            "llm": "tests/fake_openai.py in its own process, rule-based answers after the delay",
            "llm_calls_per_job": "2 chat calls (extract, decide), each after llm_delay_ms",
            "embedder": args.embedder,
            "poll_ms": args.poll_ms,
            "wait_seconds": args.wait_seconds,
            "poll_max_ms": max(args.poll_max_ms, args.poll_ms),
            "warmup_jobs_per_stack": args.warmup,
        },
        "table": [
            {
                "scenario": r["scenario"],
                "jobs_per_s": r["jobs_per_s"],
                "p50_ms": r["post_to_success"]["p50_ms"],
                "p99_ms": r["post_to_success"]["p99_ms"],
                "service_cpu_ms_per_job": r["cpu_ms_per_job"]["service_total"],
                "polls_per_job": r["status_polls"]["per_job"],
                "failed_or_unfinished": r["outcomes"]["failure"] + r["outcomes"]["not_finished"],
                "load_avg_1m": r["load_avg"]["start"][0],
            }
            for r in results
        ],
        "scenarios": results,
        "status_poll_cost_by_llm_delay_ms": poll_costs,
        "skipped_for_runtime_cap": skipped,
        "total_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    common.run_main("job_throughput", main)
