"""Search latency and exactness at 10,000 memories over 100 users, through the API: p50/p90/p99 of
`POST /v1/memories/search` (limit 20) per mode (vector, hybrid, keyword), one client, one search
at a time after a warm-up, and whether vector mode returned each user's true top 20. Prints one
JSON object.

    .venv/bin/python bench/search.py [--servers as_shipped,shipped_web,harness] [--searches 400]
                                     [--breakdown] [--quick] [--max-seconds 900]

Memories: a seeded generator (topics x templates x a vocabulary of ~1,500 words) writes 100
distinct, everyday memories per user through `POST /v1/memories/batch`, each with `occurred_at`
spread over two years. Queries: natural questions about a user's own memories' topics, some
naming the thing ("Did I eat ramen?"), most paraphrasing it ("What food do I like?").

Servers, against the same loaded database, one after the other:
- `as_shipped`: `python -m memoryproject.run` (web as it starts uvicorn, workers, beat, event
  consumers), with its defaults: INFO json logs, the rate limiter on, Prometheus multiprocess
  metrics (in a temporary folder, never var/metrics).
- `shipped_web`: run.py's web command alone, with the same defaults, no other process: what
  the settings cost, apart from the stack's other processes taking CPU.
- `harness`: bench/common.py's web alone (uvicorn --workers 1, WARNING logs, no rate limit, no
  metrics folder, no workers or consumers).

Exactness: the API's top 20 (vector mode) against the exact top 20 of the user's live rows by
`embedding <=> query` computed here (every row's distance in SQL, sorted in Python: no index can
be involved), with the query vector from the service's own embedder built in-process
(memories.providers.wiring, the same settings). Ties at the 20th distance count either way.
Hybrid results carry `why.vector`: each must be the memory's exact rank.

`--breakdown` times, in this process against the same database, each part of a search by
calling the service's functions directly (input validation, rate limit, auth, query embedding,
the one statement that weighs the query's words, runs the legs, fuses them and reads the user
(`memories.search._ranked`, today's shape), the `search.performed` event, serialisation) and
`memories.search.memory_search` whole. A function renamed by a later change fails the breakdown
with its name.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import common

USERS = 100
MEMORIES_PER_USER = 100
LIMIT = 20
MODES = ("vector", "hybrid", "keyword")
SERVERS = ("as_shipped", "shipped_web", "harness")
BATCH = 1000  # BATCH_MAX_ITEMS
SEED = 20260101
WARMUP_SEARCHES = 40
TIE_EPSILON = 1e-6
TARGETS = {"vector_p50_ms": 5.0, "hybrid_p50_ms": 10.0, "p99_over_p50_below": 3.0}

# --- The corpus: everyday memories and questions about them ---------------------------------------


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


VOCAB: dict[str, list[str]] = {
    "name": _words(
        "Anna, Ben, Carla, Dmitri, Elena, Farid, Greta, Hugo, Ines, Jonas, Keiko, Luca, Maya, "
        "Nadia, Omar, Priya, Quentin, Rosa, Samir, Tessa, Umar, Vera, Wes, Ximena, Yusuf, Zoe, "
        "Aiko, Bruno, Chloe, Diego, Esther, Felix, Gwen, Hassan, Ingrid, Jamal, Kira, Leon, "
        "Marta, Nils, Olga, Pablo, Rhea, Sven, Tariq, Ulla, Viktor, Wanda, Yara, Zeno"
    ),
    "relation": _words(
        "sister, brother, mother, father, cousin, aunt, uncle, grandmother, grandfather, "
        "best friend, neighbour, colleague, partner, niece, nephew, roommate, godson, stepdad"
    ),
    "city": _words(
        "Lisbon, Porto, Seville, Valencia, Lyon, Marseille, Bordeaux, Munich, Hamburg, Leipzig, "
        "Vienna, Salzburg, Prague, Krakow, Budapest, Ljubljana, Zagreb, Split, Athens, Naples, "
        "Bologna, Turin, Florence, Copenhagen, Oslo, Bergen, Helsinki, Tallinn, Riga, Dublin, "
        "Galway, Edinburgh, Glasgow, Manchester, Bristol, Montreal, Toronto, Vancouver, Chicago, "
        "Denver, Seattle, Portland, Austin, Boston, Kyoto, Osaka, Sapporo, Seoul, Busan, Taipei, "
        "Hanoi, Bangkok, Chiang Mai, Melbourne, Hobart, Auckland, Wellington, Cape Town, Nairobi, "
        "Marrakesh, Istanbul, Tbilisi, Oaxaca, Lima, Cusco, Santiago, Valparaiso, Buenos Aires"
    ),
    "country": _words(
        "Portugal, Spain, Italy, Greece, Croatia, Slovenia, Norway, Iceland, Scotland, Ireland, "
        "Japan, Vietnam, Thailand, Georgia, Morocco, Kenya, Peru, Chile, Mexico, Canada, "
        "New Zealand, Tasmania, Sri Lanka, Jordan, Estonia, Finland, Patagonia, Sicily"
    ),
    "dish": _words(
        "ramen, pho, paella, risotto, lasagne, moussaka, falafel, shakshuka, tagine, biryani, "
        "dal, laksa, bibimbap, kimchi stew, sushi, tempura, okonomiyaki, dumplings, pierogi, "
        "goulash, schnitzel, fondue, raclette, ceviche, empanadas, tacos al pastor, mole, "
        "pad thai, green curry, massaman curry, banh mi, pulled pork, brisket, gumbo, jambalaya, "
        "clam chowder, fish and chips, shepherd's pie, ratatouille, bouillabaisse, crepes, "
        "gnocchi, carbonara, pesto pasta, arancini, burrata, halloumi, spanakopita, baklava, "
        "tiramisu, cheesecake, churros, mochi, lemon tart, pavlova, sourdough pizza, poke bowls"
    ),
    "ingredient": _words(
        "coriander, mushrooms, olives, anchovies, blue cheese, aubergine, beetroot, celery, "
        "liquorice, oysters, tofu, okra, fennel, capers, sardines, kale, coconut, raisins"
    ),
    "allergen": _words(
        "peanuts, shellfish, penicillin, cat hair, pollen, dust mites, lactose, gluten, "
        "sesame, bee stings, latex, tree nuts, soy, strawberries, kiwi"
    ),
    "job": _words(
        "nurse, data analyst, carpenter, architect, primary school teacher, pharmacist, "
        "software engineer, product designer, paramedic, accountant, translator, journalist, "
        "electrician, veterinarian, librarian, physiotherapist, urban planner, chef, "
        "marine biologist, pilot, lawyer, social worker, sound engineer, florist, baker"
    ),
    "company": _words(
        "a small bakery, a logistics startup, the city hospital, a law firm, a bike shop, "
        "a public library, an energy company, a game studio, a bank, a newspaper, a brewery, "
        "a design agency, a university lab, a shipping company, an insurance firm, a museum, "
        "a solar installer, a cooperative farm, a hotel chain, a theatre"
    ),
    "work_topic": _words(
        "the quarterly budget, a database migration, the new onboarding flow, supplier "
        "contracts, the annual report, a warehouse redesign, the staff rota, a grant proposal, "
        "the website relaunch, a safety audit, the customer survey, a pricing model"
    ),
    "pet": _words(
        "dog, cat, rabbit, parrot, tortoise, hamster, ferret, goldfish, guinea pig, gecko, "
        "cockatiel, border collie, labrador, dachshund, greyhound, maine coon, siamese cat"
    ),
    "pet_name": _words(
        "Biscuit, Pepper, Mochi, Luna, Ziggy, Pickle, Otis, Nala, Mango, Juniper, Pixel, "
        "Waffles, Clementine, Bowie, Frida, Chorizo, Maple, Noodle, Tofu, Pumpkin"
    ),
    "ailment": _words(
        "an ear infection, a limp, itchy skin, a sore tooth, a cough, a stomach bug, "
        "an eye infection, a twisted ankle, a rash, a fever, back pain, migraines"
    ),
    "instrument": _words(
        "piano, cello, violin, bass guitar, drums, saxophone, trumpet, ukulele, accordion, "
        "clarinet, banjo, harmonica, flute, mandolin, double bass, synthesizer"
    ),
    "band_kind": _words(
        "jazz trio, community orchestra, folk band, punk band, brass band, church choir, "
        "wedding band, blues quartet, samba group, string quartet"
    ),
    "language": _words(
        "Japanese, Portuguese, Italian, Korean, Arabic, Mandarin, Greek, Dutch, Swedish, "
        "Spanish, Turkish, Polish, Hindi, Vietnamese, Swahili, Finnish, Czech, Hebrew"
    ),
    "sport": _words(
        "tennis, squash, badminton, basketball, volleyball, football, rugby, climbing, "
        "swimming, rowing, cycling, table tennis, judo, fencing, golf, skiing, surfing, yoga"
    ),
    "outdoor": _words(
        "hiking, kayaking, bouldering, trail running, birdwatching, camping, mountain biking, "
        "sailing, foraging, stargazing, fishing, paddleboarding, wild swimming"
    ),
    "place": _words(
        "the Alps, the Dolomites, the Highlands, the Lake District, the Pyrenees, the coast, "
        "the national park, the river valley, the pine forest, the islands, the dunes, "
        "the canyon, the old quarry, the fjords, the moors"
    ),
    "weekday": _words("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday"),
    "month": _words(
        "January, February, March, April, May, June, July, August, September, October, "
        "November, December"
    ),
    "author": _words(
        "Ursula Le Guin, Haruki Murakami, Toni Morrison, Kazuo Ishiguro, Chimamanda Adichie, "
        "Italo Calvino, Zadie Smith, Terry Pratchett, Octavia Butler, Elena Ferrante, "
        "Jorge Luis Borges, Hilary Mantel, Olga Tokarczuk, Ted Chiang, Sally Rooney, "
        "Cormac McCarthy, Ali Smith, Jhumpa Lahiri, Ken Liu, Agatha Christie"
    ),
    "book_genre": _words(
        "a science fiction, a historical, a crime, a fantasy, a literary, a mystery, "
        "a graphic, a dystopian, a romance, a horror"
    ),
    "film": _words(
        "Spirited Away, Amelie, The Grand Budapest Hotel, Parasite, Paddington 2, Arrival, "
        "In the Mood for Love, Jaws, Casablanca, Alien, Whiplash, Moonlight, Heat, Up, "
        "Cinema Paradiso, The Princess Bride, Roma, Totoro, Fargo, Inception"
    ),
    "show_topic": _words(
        "deep sea creatures, a murder in a small town, competitive baking, a Viking dynasty, "
        "a hospital night shift, space exploration, restaurant kitchens, chess prodigies, "
        "a fashion house, climbing Everest, volcanoes, an undercover journalist"
    ),
    "home_kind": _words(
        "two-bedroom flat, terraced house, houseboat, studio apartment, cottage, loft, "
        "bungalow, top-floor flat, townhouse, converted barn"
    ),
    "neighborhood": _words(
        "the old town, the harbour district, the university quarter, a quiet suburb, "
        "the riverside, the hills above the centre, the market area, a village nearby"
    ),
    "room": _words("kitchen, bathroom, hallway, bedroom, living room, study, nursery, attic"),
    "color": _words(
        "sage green, terracotta, navy blue, mustard yellow, off-white, charcoal grey, "
        "dusty pink, teal, burgundy, lavender"
    ),
    "appliance": _words(
        "dishwasher, espresso machine, air fryer, bread maker, slow cooker, rice cooker, "
        "stand mixer, induction hob, juicer, pasta machine, chest freezer"
    ),
    "drink": _words(
        "black coffee, green tea, oat flat white, chai latte, sparkling water, kombucha, "
        "espresso, rooibos, hot chocolate, matcha, fresh orange juice, mint tea"
    ),
    "band": _words(
        "Radiohead, Fleetwood Mac, Bon Iver, Daft Punk, Nina Simone, The National, "
        "Caetano Veloso, Fela Kuti, Bjork, Arcade Fire, Khruangbin, Portishead, Rosalia, "
        "Sufjan Stevens, Massive Attack, Tinariwen"
    ),
    "purchase": _words(
        "new bike, used car, sailing dinghy, piano, deposit on a flat, trip to Japan, "
        "wedding, electric scooter, good camera, sabbatical, telescope, wood-fired oven"
    ),
    "subscription": _words(
        "streaming, gym, newspaper, meal kit, music, cloud storage, language app, "
        "wine club, audiobook, magazine"
    ),
    "device": _words(
        "tablet, e-reader, standing desk, mechanical keyboard, smartwatch, drawing tablet, "
        "noise-cancelling headphones, second monitor, film camera, 3D printer"
    ),
    "task": _words(
        "sketching, reading on the train, video calls, tracking runs, writing, editing "
        "photos, taking notes in meetings, practising music"
    ),
    "subject": _words(
        "pottery, accounting, life drawing, creative writing, welding, first aid, "
        "photography, woodworking, coding, bookbinding, sign language, astronomy"
    ),
    "car": _words(
        "hatchback, estate car, camper van, electric SUV, pickup truck, convertible, "
        "minivan, vintage Beetle, hybrid saloon"
    ),
    "gift": _words(
        "a scarf, a cookbook, concert tickets, a watch, a bottle of whisky, a board game, "
        "a houseplant, a framed print, a fountain pen, a spa voucher, a drone"
    ),
    "event_kind": _words("sold-out, open-air, rooftop, late-night, acoustic, festival, reunion"),
}


@dataclass(frozen=True)
class Topic:
    """One thing people remember, the ways it is said, and the questions that ask for it. A
    question with {slot} names the thing; one without paraphrases it."""

    name: str
    templates: tuple[str, ...]
    questions: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "food",
        (
            "Loves {dish}, especially the way {name} makes it",
            "Can't stand {ingredient} and picks it out of every dish",
            "Had {dish} at a tiny place in {city} with {relation} {name}",
            "Learned to cook {dish} in a class in {city}",
            "Orders {dish} every time the team eats out on {weekday}",
        ),
        (
            "What food do I like?",
            "Which dishes does the user enjoy eating?",
            "What does she refuse to eat?",
            "Where did I have {dish}?",
            "Does he know how to cook {dish}?",
            "Any favourite meals or cuisines?",
            "What did we eat in {city}?",
        ),
    ),
    Topic(
        "travel",
        (
            "Spent two weeks in {city} with {relation} {name} in {month}",
            "Is planning a trip to {country} next {month}",
            "Got food poisoning on a trip to {city}",
            "Wants to see {country} before turning forty",
            "Missed a connecting flight in {city} and slept at the airport",
        ),
        (
            "Where have I travelled recently?",
            "What holidays is the user planning?",
            "Which countries does she want to visit?",
            "Has he ever been to {city}?",
            "Any bad experiences while travelling?",
            "When is the trip to {country}?",
        ),
    ),
    Topic(
        "work",
        (
            "Works as a {job} at {company}",
            "Is leading {work_topic} at work this quarter",
            "Manager {name} praised the work on {work_topic}",
            "Is thinking about leaving {company} to retrain as a {job}",
            "Commutes to {company} by bike on {weekday}s",
        ),
        (
            "What is my job?",
            "Where does the user work?",
            "What is she working on at the moment?",
            "Who is his manager?",
            "Is she happy in her career?",
            "Does he want to become a {job}?",
        ),
    ),
    Topic(
        "pets",
        (
            "Has a {pet} named {pet_name}",
            "Took {pet_name} the {pet} to the vet for {ailment}",
            "Adopted a rescue {pet} from a shelter in {city}",
            "{pet_name} sleeps on the bed even though {relation} {name} hates it",
        ),
        (
            "Do I have any pets?",
            "What is the name of my {pet}?",
            "What animals does the user own?",
            "Was the pet ill recently?",
            "Who is {pet_name}?",
        ),
    ),
    Topic(
        "music",
        (
            "Plays the {instrument} in a {band_kind}",
            "Has been learning the {instrument} since {month}",
            "Saw {band} at a {event_kind} concert in {city}",
            "Listens to {band} when working late",
        ),
        (
            "What instrument do I play?",
            "What music does the user listen to?",
            "Which concerts has she been to?",
            "Is he in a band?",
            "Does she like {band}?",
        ),
    ),
    Topic(
        "languages",
        (
            "Is learning {language} for an upcoming move",
            "Speaks fluent {language} thanks to a year in {city}",
            "Takes {language} lessons with a tutor called {name} every {weekday}",
            "Gave up on {language} after three months",
        ),
        (
            "What languages do I speak?",
            "Which language is the user studying?",
            "Who teaches her {language}?",
            "Does he speak any foreign languages?",
        ),
    ),
    Topic(
        "sport",
        (
            "Plays {sport} with {relation} {name} every {weekday} evening",
            "Sprained a wrist playing {sport}",
            "Goes {outdoor} in {place} most weekends",
            "Joined a {sport} club in {month}",
            "Trains for a half marathon in {city}",
        ),
        (
            "What sports do I play?",
            "How does the user stay fit?",
            "What does she do at the weekend outdoors?",
            "Any sports injuries?",
            "Did he go {outdoor} recently?",
            "Who does she play {sport} with?",
        ),
    ),
    Topic(
        "health",
        (
            "Is allergic to {allergen}",
            "Sees a physiotherapist about {ailment}",
            "Stopped drinking {drink} after the doctor's advice",
            "Carries an inhaler since an asthma attack in {month}",
        ),
        (
            "Do I have any allergies?",
            "What medical issues does the user have?",
            "Is she allergic to {allergen}?",
            "What did the doctor tell him?",
            "Any health problems I should know about?",
        ),
    ),
    Topic(
        "family",
        (
            "{relation} {name} lives in {city}",
            "{relation} {name}'s birthday is in {month}",
            "Bought {gift} for {relation} {name}'s birthday",
            "Calls {relation} {name} every {weekday}",
            "{relation} {name} is getting married in {city} in {month}",
        ),
        (
            "Where does my {relation} live?",
            "When is {name}'s birthday?",
            "What gifts has the user bought for family?",
            "Who are the people in her family?",
            "Is anyone in his family getting married?",
            "What did I give {name}?",
        ),
    ),
    Topic(
        "books_films",
        (
            "Is reading {book_genre} novel by {author}",
            "Favourite film is {film}",
            "Binge-watched a series about {show_topic}",
            "Joined a book club that meets on {weekday}s to discuss {author}",
            "Cried at the end of {film}",
        ),
        (
            "What am I reading?",
            "Which authors does the user like?",
            "What is her favourite movie?",
            "What shows has he been watching?",
            "Has she read anything by {author}?",
        ),
    ),
    Topic(
        "home",
        (
            "Moved into a {home_kind} in {neighborhood} of {city}",
            "Is repainting the {room} {color}",
            "Bought a {appliance} and uses it daily",
            "The landlord still has not fixed the {room} ceiling",
            "Grows tomatoes and {ingredient} on the balcony",
        ),
        (
            "Where do I live?",
            "What is the user doing to the house?",
            "What colour is the {room}?",
            "Any problems with the flat?",
            "What kitchen gadgets does she own?",
        ),
    ),
    Topic(
        "habits",
        (
            "Drinks {drink} every morning before work",
            "Prefers {drink} to {drink2}",
            "Goes to bed by eleven on {weekday}s",
            "Meditates for ten minutes after {sport}",
            "Never answers the phone during dinner",
        ),
        (
            "How do I take my coffee?",
            "What does the user drink in the morning?",
            "What is her daily routine?",
            "Does he like {drink}?",
            "Any habits before bed?",
        ),
    ),
    Topic(
        "money",
        (
            "Is saving up for a {purchase}",
            "Cancelled the {subscription} subscription to save money",
            "Lent {relation} {name} money for a {purchase}",
            "Sold an old {device} online",
        ),
        (
            "What am I saving for?",
            "Which subscriptions did the user cancel?",
            "Does anyone owe her money?",
            "Is he trying to save money?",
        ),
    ),
    Topic(
        "tech",
        (
            "Uses a {device} for {task}",
            "Broke the {device} on a trip to {city}",
            "Wants a {device} for {task}",
        ),
        (
            "What gadgets do I use?",
            "What device does the user want?",
            "Did she break anything recently?",
            "What does he use for {task}?",
        ),
    ),
    Topic(
        "learning",
        (
            "Takes evening classes in {subject}",
            "Finished a weekend course in {subject} in {city}",
            "Wants to teach {subject} to {relation} {name}",
        ),
        (
            "What classes am I taking?",
            "Is the user learning anything new?",
            "What courses has she done?",
            "Does he know {subject}?",
        ),
    ),
    Topic(
        "car",
        (
            "Drives a {color} {car}",
            "The {car} failed its inspection in {month}",
            "Is thinking of swapping the {car} for a {car2}",
        ),
        (
            "What car do I drive?",
            "Does the user own a vehicle?",
            "Any trouble with her car?",
        ),
    ),
)


@dataclass
class Memory:
    user: int
    topic: Topic
    content: str
    slots: dict[str, str]
    occurred_at: datetime


def _filled(template: str, rng: random.Random, slots: dict[str, str] | None = None) -> str:
    """The template with each {slot} drawn from the vocabulary (or taken from `slots`)."""
    slots = {} if slots is None else slots
    out, rest = [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        key, _, rest = after.partition("}")
        # {drink2}: a second, independent draw from the same list.
        value = slots[key] if key in slots else rng.choice(VOCAB[key.rstrip("0123456789")])
        slots.setdefault(key, value)
        out += [before, value]
    out.append(rest)
    return "".join(out)


def make_memories(seed: int, users: int, per_user: int) -> list[Memory]:
    """`per_user` distinct memories for each user (distinct over the whole set too), each on a
    topic the user cares about (a few topics each, as people have), dated over two years."""
    rng = random.Random(seed)
    end = datetime(2026, 1, 1, 12, tzinfo=UTC)
    seen: set[str] = set()
    memories: list[Memory] = []
    for user in range(users):
        # Each person writes mostly about 5-8 topics, sometimes about the others.
        favourites = rng.sample(TOPICS, rng.randint(5, 8))
        made = 0
        for _ in range(per_user * 50):  # bounded: distinct texts are found long before this
            if made == per_user:
                break
            topic = rng.choice(favourites) if rng.random() < 0.8 else rng.choice(TOPICS)
            slots: dict[str, str] = {}
            content = _filled(rng.choice(topic.templates), rng, slots)
            if content in seen:
                continue
            seen.add(content)
            when = end - timedelta(seconds=rng.randrange(2 * 365 * 86_400))
            memories.append(Memory(user, topic, content, slots, when))
            made += 1
        if made < per_user:
            raise RuntimeError(f"the generator ran out of distinct memories for user {user}")
    return memories


@dataclass
class Query:
    user: int
    text: str
    names_the_thing: bool


def make_queries(memories: list[Memory], count: int, seed: int) -> list[Query]:
    """Questions about the users' own memories: a memory drawn at random, one of its topic's
    questions, its slots filled from that memory when the question names the thing."""
    rng = random.Random(seed + 1)
    queries = []
    for _ in range(count):
        memory = rng.choice(memories)
        question = rng.choice(memory.topic.questions)
        slots = dict(memory.slots)
        queries.append(Query(memory.user, _filled(question, rng, slots), "{" in question))
    return queries


# --- Loading -------------------------------------------------------------------------------------


def load(http: Any, memories: list[Memory], user_ids: list[str]) -> tuple[list[str], float]:
    """Write every memory through the batch API (1000 items a call); return their ids."""
    started = time.monotonic()
    ids: list[str] = []
    for start in range(0, len(memories), BATCH):
        items = [
            {
                "user_id": user_ids[m.user],
                "content": m.content,
                "type": "preference" if m.topic.name in ("food", "habits") else "fact",
                "metadata": {"topic": m.topic.name},
                "occurred_at": m.occurred_at.isoformat(),
            }
            for m in memories[start : start + BATCH]
        ]
        response = http.post("/v1/memories/batch", json={"items": items})
        if response.status_code != 200:
            raise RuntimeError(f"batch write: {response.status_code} {response.text[:300]}")
        for result in response.json()["results"]:
            if result["status"] != "ok":
                raise RuntimeError(f"batch item {start + result['index']}: {result.get('error')}")
            ids.append(str(result["id"]))
    return ids, time.monotonic() - started


# --- Exact answers --------------------------------------------------------------------------------

_EXACT_SQL = """
    SELECT id::text, embedding <=> %s::vector
    FROM memories_memory
    WHERE user_id = %s AND deleted_at IS NULL AND valid_to IS NULL AND embedding IS NOT NULL
"""


def exact_ranking(conn: Any, user_id: str, query_vector: list[float]) -> list[tuple[float, str]]:
    """Every live memory of the user with its cosine distance to the query, nearest first (ties
    by id, as the service orders them). All rows' distances are fetched and sorted here, so no
    index, approximate or not, can take part."""
    from memories.models import vector_text

    rows = conn.execute(_EXACT_SQL, [vector_text(query_vector), user_id]).fetchall()
    return sorted((float(distance), memory_id) for memory_id, distance in rows)


def has_true_top_k(returned: list[str], ranking: list[tuple[float, str]], k: int) -> dict:
    """Whether the returned ids are the user's true top k: `strict` as sets; `ties_allowed`
    when every memory nearer than the k-th distance is there and nothing returned is farther."""
    k = min(k, len(ranking))
    truth = {memory_id for _, memory_id in ranking[:k]}
    if not k:
        return {"strict": not returned, "ties_allowed": not returned, "missing": 0}
    kth = ranking[k - 1][0]
    distance = {memory_id: d for d, memory_id in ranking}
    must = {m for d, m in ranking if d < kth - TIE_EPSILON}
    got = set(returned)
    ties_allowed = (
        len(returned) == k
        and must <= got
        and all(distance.get(m, 9.0) <= kth + TIE_EPSILON for m in returned)
    )
    return {"strict": got == truth, "ties_allowed": ties_allowed, "missing": len(truth - got)}


def vector_ranks_exact(results: list[dict], ranking: list[tuple[float, str]]) -> bool:
    """Each hybrid result's `why.vector` rank is its exact rank (any rank among its ties)."""
    position = {memory_id: i for i, (_, memory_id) in enumerate(ranking, start=1)}
    distances = [d for d, _ in ranking]
    for result in results:
        rank = (result.get("why") or {}).get("vector")
        if rank is None:
            continue
        exact = position.get(result["id"])
        if exact is None:
            return False
        d = distances[exact - 1]
        tied = [i for i, other in enumerate(distances, start=1) if abs(other - d) <= TIE_EPSILON]
        if not tied[0] <= rank <= tied[-1]:
            return False
    return True


# --- Searching through the API -------------------------------------------------------------------


def search(http: Any, user_id: str, query: str, mode: str) -> list[dict[str, Any]]:
    body = {"user_id": user_id, "query": query, "limit": LIMIT, "mode": mode}
    response = http.post("/v1/memories/search", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"search ({mode}): {response.status_code} {response.text[:300]}")
    return response.json()["results"]


def run_searches(
    http: Any,
    *,
    queries: list[Query],
    user_ids: list[str],
    modes: list[str],
    conn: Any,
    deadline: float,
) -> dict[str, Any]:
    """Each mode in turn: warm-up searches, then every query once (one at a time), timed by the
    client; the exactness checks run after each timed search, outside its time."""
    from memories.providers.wiring import get_embedder

    embedder = get_embedder()
    floor = []
    for _ in range(200):  # the HTTP round trip with no work behind it: the client + uvicorn floor
        started = time.perf_counter()
        http.get("/healthz")
        floor.append(time.perf_counter() - started)
    report: dict[str, Any] = {"healthz_floor": common.latency_summary(floor), "modes": {}}
    for mode in modes:
        for query in queries[-WARMUP_SEARCHES:]:
            search(http, user_ids[query.user], query.text, mode)
        sessions_before = _sessions(conn)
        seconds: list[float] = []
        checks = {"strict": 0, "ties_allowed": 0, "missing_total": 0, "vector_ranks_exact": 0}
        empty = 0
        for query in queries:
            if time.monotonic() > deadline:
                common.log(f"{mode}: stopping early, time is up")
                break
            user_id = user_ids[query.user]
            started = time.perf_counter()
            results = search(http, user_id, query.text, mode)
            seconds.append(time.perf_counter() - started)
            empty += not results
            if mode == "keyword":
                continue
            ranking = exact_ranking(conn, user_id, embedder.embed([query.text])[0])
            if mode == "vector":
                verdict = has_true_top_k([r["id"] for r in results], ranking, LIMIT)
                checks["strict"] += verdict["strict"]
                checks["ties_allowed"] += verdict["ties_allowed"]
                checks["missing_total"] += verdict["missing"]
            else:
                checks["vector_ranks_exact"] += vector_ranks_exact(results, ranking)
        n = len(seconds)
        entry: dict[str, Any] = {"latency": common.latency_summary(seconds), "empty_results": empty}
        # Above 0: the service opens PostgreSQL connections per search instead of reusing them
        # (the bench's own connection is already open and counts nothing).
        entry["postgres_sessions_opened"] = _sessions(conn) - sessions_before
        if n and seconds:
            entry["mean_ms"] = round(statistics.fmean(seconds) * 1000, 2)
        if mode == "vector" and n:
            entry["all_true_top_k"] = round(checks["ties_allowed"] / n, 4)
            entry["all_true_top_k_strict_ids"] = round(checks["strict"] / n, 4)
            entry["true_top_k_missing_total"] = checks["missing_total"]
        if mode == "hybrid" and n:
            entry["vector_leg_ranks_exact"] = round(checks["vector_ranks_exact"] / n, 4)
        report["modes"][mode] = entry
        common.log(f"{mode}: {entry['latency']}")
    return report


def run_paired(
    http: Any,
    other: Any,
    *,
    queries: list[Query],
    user_ids: list[str],
    modes: list[str],
    deadline: float,
) -> dict[str, Any]:
    """This tree's server and the baseline tree's, both up, each query sent to both in turn
    (which goes first alternates): on a machine whose load drifts, both see the same load, so
    the ratio holds where the absolute figures do not."""
    report: dict[str, Any] = {}
    for mode in modes:
        for query in queries[-WARMUP_SEARCHES:]:
            search(http, user_ids[query.user], query.text, mode)
            search(other, user_ids[query.user], query.text, mode)
        mine: list[float] = []
        theirs: list[float] = []
        differing: list[str] = []
        for i, query in enumerate(queries):
            if time.monotonic() > deadline:
                break
            pair = [(http, mine), (other, theirs)]
            answers = []
            for client, seconds in pair if i % 2 else pair[::-1]:
                started = time.perf_counter()
                answers.append(search(client, user_ids[query.user], query.text, mode))
                seconds.append(time.perf_counter() - started)
            if answers[0] != answers[1]:  # the same JSON values (ids, order, scores, ...)
                differing.append(query.text)
        this, base = common.latency_summary(mine), common.latency_summary(theirs)
        report[mode] = {
            "this_tree": this,
            "baseline_tree": base,
            "answers_differing": len(differing),
            "answers_differing_sample": differing[:5],
            "p50_ratio": round(this["p50_ms"] / base["p50_ms"], 3) if mine else None,
            "median_of_per_query_ratios": round(
                statistics.median(a / b for a, b in zip(mine, theirs, strict=True)), 3
            )
            if mine
            else None,
        }
        common.log(f"paired {mode}: {report[mode]}")
    return report


def _sessions(conn: Any) -> int:
    time.sleep(0.6)  # backends flush their statistics at most once a second (PostgreSQL 15+)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(row[0] or 0)


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against one server's figures."""
    modes = report["modes"]
    out: dict[str, Any] = {}
    for mode, limit in (("vector", TARGETS["vector_p50_ms"]), ("hybrid", TARGETS["hybrid_p50_ms"])):
        if mode not in modes or not modes[mode]["latency"]["n"]:
            continue
        latency = modes[mode]["latency"]
        out[f"{mode}_p50_ms_at_most_{limit:g}"] = latency["p50_ms"] <= limit
        out[f"{mode}_p99_below_3x_p50"] = latency["p99_ms"] < 3 * latency["p50_ms"]
    if "vector" in modes and "all_true_top_k" in modes["vector"]:
        out["vector_all_true_top_k"] = modes["vector"]["all_true_top_k"] == 1.0
    if "hybrid" in modes and "vector_leg_ranks_exact" in modes["hybrid"]:
        out["hybrid_vector_leg_exact"] = modes["hybrid"]["vector_leg_ranks_exact"] == 1.0
    out["all"] = all(out.values()) if out else False
    return out


# --- Servers --------------------------------------------------------------------------------------


def _scratch_var_dir() -> str:
    """A var folder for a shipped server's metrics and beat schedule, removed at exit."""
    path = tempfile.mkdtemp(prefix="memory-bench-search-var-")
    atexit.register(shutil.rmtree, path, True)
    return path


def start_as_shipped(
    bench: common.BenchEnv, tree: Path | None = None
) -> tuple[common.WebServer, dict[str, Any]]:
    """`python -m memoryproject.run` on the bench database: web, a worker per lane, beat and the
    event consumers, with the service's own defaults for logs, rate limit and metrics. Its var
    folder (metrics, beat's schedule) is a temporary one, so `make run`'s is never touched."""
    import httpx

    var_dir = _scratch_var_dir()
    port = common.free_port()
    env = dict(bench.env)
    for name in ("LOG_LEVEL", "LOG_FORMAT", "RATE_LIMIT_PER_SECOND"):
        env.pop(name, None)  # the shipped defaults: INFO json logs, the rate limiter on
    env.update(MEMORY_VAR_DIR=var_dir, HOST="127.0.0.1", PORT=str(port))
    process = common.spawn("run", [sys.executable, "-m", "memoryproject.run"], env, cwd=tree)
    url = f"http://127.0.0.1:{port}/healthz"

    def healthy() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    common._wait_until(healthy, process, timeout=120)
    time.sleep(3)  # workers, beat and consumers finish starting: their start is not the search's
    common.log(f"memoryproject.run up on port {port}")
    config = {
        "command": "python -m memoryproject.run",
        "web": "uvicorn memoryproject.asgi:application --no-access-log (1 process), as run.py",
        "also_running": "worker per lane (high, default, batch), beat, consume_events",
        "logs": "LOG_LEVEL INFO, LOG_FORMAT json (defaults)",
        "rate_limit": "on (defaults)",
        "prometheus_multiproc_dir": "set (a temporary folder)",
    }
    return common.WebServer(process, port), config


def start_shipped_web(
    bench: common.BenchEnv, tree: Path | None = None
) -> tuple[common.WebServer, dict[str, Any]]:
    """The web process alone, exactly as run.py starts uvicorn and with its environment (logs,
    rate limit, metrics folder), but no workers or consumers: what the settings cost, apart
    from what the other processes of the stack take of the two cores."""
    import httpx

    var_dir = _scratch_var_dir()
    port = common.free_port()
    env = dict(bench.env)
    for name in ("LOG_LEVEL", "LOG_FORMAT", "RATE_LIMIT_PER_SECOND"):
        env.pop(name, None)
    env.update(MEMORY_VAR_DIR=var_dir, PROMETHEUS_MULTIPROC_DIR=var_dir)
    command = [sys.executable, "-m", "uvicorn", "memoryproject.asgi:application",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    process = common.spawn("shipped-web", command, env, cwd=tree)
    url = f"http://127.0.0.1:{port}/healthz"

    def healthy() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    common._wait_until(healthy, process, timeout=60)
    config = {
        "command": "uvicorn memoryproject.asgi:application --host 127.0.0.1 --port P "
        "--no-access-log (run.py's web command)",
        "also_running": "nothing",
        "logs": "LOG_LEVEL INFO, LOG_FORMAT json (defaults)",
        "rate_limit": "on (defaults)",
        "prometheus_multiproc_dir": "set (a temporary folder)",
    }
    return common.WebServer(process, port), config


def start_harness(
    bench: common.BenchEnv, tree: Path | None = None
) -> tuple[common.WebServer, dict[str, Any]]:
    web = common.start_web(bench, workers=1, cwd=tree)
    config = {
        "command": "uvicorn memoryproject.asgi:application --workers 1 --log-level warning",
        "also_running": "nothing",
        "logs": "LOG_LEVEL WARNING, plain",
        "rate_limit": "off (RATE_LIMIT_PER_SECOND=0)",
        "prometheus_multiproc_dir": "unset",
    }
    return web, config


# --- In-process breakdown -------------------------------------------------------------------------

BREAKDOWN_CALLS = (
    "memories.api.validated_input",
    "memories.api.MemorySearchApi",
    "memories.api.memory_output_of_row",
    "memories.auth.api_key_authenticate",
    "memories.backpressure.rate_limit",
    "memories.search.UnreadUser",
    "memories.search._plain_leg",
    "memories.search._ranked",
    "memories.signals.search_performed",
    "memories.search.memory_search",
    "memories.renderers.JSONRenderer",
    "memories.providers.wiring.get_embedder",
)


class BreakdownBroken(RuntimeError):
    """A function the breakdown calls is gone or changed shape: the message names it."""


def resolve(dotted: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise BreakdownBroken(
            f"{dotted} no longer exists (renamed or moved by a change to search?): the "
            f"breakdown calls it directly; update bench/search.py ({exc})"
        ) from exc


def call(dotted: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        raise BreakdownBroken(
            f"{dotted} no longer takes these arguments ({exc}): update bench/search.py"
        ) from exc


def breakdown(
    *, tenancy: common.Tenancy, queries: list[Query], modes: list[str], deadline: float
) -> dict[str, Any]:
    """Each part of a search timed alone (perf_counter), in this process, in the order the view
    runs them; then `memories.search.memory_search` whole, to compare with the parts' sum."""
    from django.conf import settings
    from django.db import connection
    from django.test import Client
    from django.test.utils import override_settings
    from django.utils import timezone

    f = {name: resolve(name) for name in BREAKDOWN_CALLS}
    from memories.models import Memory as MemoryRow

    embedder = call("get_embedder", f["memories.providers.wiring.get_embedder"])
    renderer = f["memories.renderers.JSONRenderer"]()
    input_serializer = f["memories.api.MemorySearchApi"].InputSerializer
    header = f"Bearer {tenancy.api_key}"
    tenant_id = str(tenancy.tenant.id)
    candidates = max(LIMIT, settings.SEARCH_CANDIDATES)
    result: dict[str, Any] = {
        "how": "each part called directly in this process (perf_counter), against the bench "
        "database; the rate limit with the shipped default (RATE_LIMIT_PER_SECOND=10000); "
        "auth with its key cache warm (API_KEY_CACHE_SECONDS: one read in that many seconds)",
        "search_candidates_per_leg_in_hybrid": candidates,
        "modes": {},
    }
    for mode in modes:
        parts: dict[str, list[float]] = {}

        def timed(part: str, dotted: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            value = call(dotted, fn, *args, **kw)
            parts.setdefault(part, []).append(time.perf_counter() - started)  # noqa: B023
            return value

        whole: list[float] = []
        warmup = queries[-WARMUP_SEARCHES:]
        for i, query in enumerate(warmup + queries):
            if i == len(warmup):  # the warm-up's samples are dropped
                for values in parts.values():
                    values.clear()
                whole.clear()
            if time.monotonic() > deadline:
                break
            user_id = tenancy.user_ids[query.user]
            body = {"user_id": user_id, "query": query.text, "limit": LIMIT, "mode": mode}
            data = timed("validate_input", "validated_input", f["memories.api.validated_input"],
                         input_serializer, body)  # fmt: skip
            with override_settings(RATE_LIMIT_PER_SECOND=10_000.0, RATE_LIMIT_BURST=20_000):
                timed("rate_limit", "memories.backpressure.rate_limit",
                      f["memories.backpressure.rate_limit"], tenant_id)  # fmt: skip
            principal = timed("auth", "memories.auth.api_key_authenticate",
                              f["memories.auth.api_key_authenticate"], header)  # fmt: skip
            # The user is read inside the fused statement (memories.search.UnreadUser).
            user = f["memories.search.UnreadUser"](tenant_id=principal.tenant.id,
                                                   id=data["user_id"])  # fmt: skip
            # The search as memories.search runs a plain one: each leg's SQL compiled once per
            # process (`_plain_leg`, the user and vector put in); the query's word weights, legs,
            # fusion, similarities and the cut are ONE statement (`_ranked`).
            limit = candidates if mode == "hybrid" else LIMIT
            legs: dict[str, Any] = {}
            vector = None
            if mode != "keyword":
                vector = timed("query_embedding", "embedder.embed", embedder.embed,
                               [query.text])[0]  # fmt: skip
            for name in ("vector", "keyword"):
                if mode in ("hybrid", name):
                    legs[name] = timed("leg_sql", "memories.search._plain_leg",
                                       f["memories.search._plain_leg"], name, limit, user.id,
                                       vector)  # fmt: skip
            words = (user.id, query.text) if "keyword" in legs else None
            found, _ = timed("sql_one_statement_words_legs_fused_user", "memories.search._ranked",
                             f["memories.search._ranked"], legs, query_vector=vector, limit=LIMIT,
                             threshold=None, min_score=None, recency=None, query_words=words,
                             user=user)  # fmt: skip
            shown = [entry.memory for entry in found]
            timed("search_performed_event", "memories.signals.search_performed.send",
                  f["memories.signals.search_performed"].send,
                  sender=MemoryRow, tenant_id=user.tenant_id, user_id=user.id, query=query.text,
                  results=len(shown), agent_id="", session_id="")  # fmt: skip

            def serialise(memories: list[Any]) -> bytes:
                zone = timezone.get_current_timezone()  # once per response, as the view does
                results = [
                    {**f["memories.api.memory_output_of_row"](m, zone=zone), "score": 0.5,
                     "similarity": 0.5, "why": {"vector": 1}}
                    for m in memories
                ]  # fmt: skip
                return renderer.render({"results": results})

            timed("serialisation", "memories.api.memory_output_of_row", serialise, shown)
            started = time.perf_counter()
            call("memories.search.memory_search", f["memories.search.memory_search"],
                 user=user, query=query.text, limit=LIMIT, filters={}, threshold=None,
                 embedder=embedder, mode=mode)  # fmt: skip
            whole.append(time.perf_counter() - started)
        # Outside the parts: the whole view through Django's handler in this process (middleware,
        # DRF, the parts above, the connection handed back to the pool at the end), and that
        # hand-back and checkout of a pooled connection alone.
        client = Client(headers={"authorization": header})
        view: list[float] = []
        checkout: list[float] = []
        for query in queries[: len(whole)]:
            body = {"user_id": tenancy.user_ids[query.user], "query": query.text,
                    "limit": LIMIT, "mode": mode}  # fmt: skip
            started = time.perf_counter()
            response = client.post("/v1/memories/search", body, content_type="application/json")
            view.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"in-process view: {response.status_code} {response.content!r}")
            started = time.perf_counter()
            connection.close()
            connection.ensure_connection()
            checkout.append(time.perf_counter() - started)
        connection.close()
        p50 = {part: statistics.median(values) * 1000 for part, values in parts.items() if values}
        result["modes"][mode] = {
            "searches": len(whole),
            "parts_p50_ms": {part: round(value, 3) for part, value in p50.items()},
            "parts_p99_ms": {
                part: round((common.percentile(values, 99) or 0) * 1000, 3)
                for part, values in parts.items()
                if values
            },
            "sum_of_parts_p50_ms": round(sum(p50.values()), 3),
            "service_memory_search_whole": common.latency_summary(whole),
            "django_view_in_process": common.latency_summary(view),
            "db_connection_back_to_pool_and_out": common.latency_summary(checkout),
        }
        common.log(f"breakdown {mode}: {result['modes'][mode]['parts_p50_ms']}")
    return result


# --- Main -----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help=",".join(SERVERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--searches", type=int, default=400, help="timed searches per mode")
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--per-user", type=int, default=MEMORIES_PER_USER)
    parser.add_argument("--breakdown", action="store_true", help="time each part in-process")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 searches a mode")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="another version's source tree (e.g. `git archive main | tar -x -C DIR`): each "
        "server also runs from it, beside this tree's, and every query goes to both in turn",
    )
    parser.add_argument("--rounds", type=int, default=1, help="each server this many times")
    args = parser.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.servers) - set(SERVERS):
        parser.error(f"--servers: choose from {', '.join(SERVERS)}")
    if set(args.modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.quick:
        args.searches = min(args.searches, 100)
    return args


def main() -> dict[str, Any]:
    args = parse_args()
    common.install_runtime_cap(args.max_seconds)
    began = time.monotonic()
    # Searches stop taking new work this long before the cap, so the report still gets out.
    deadline = began + args.max_seconds - 60
    machine = common.machine()
    bench = common.prepare()
    broken = None
    if args.breakdown:  # known now, not after the API runs, if a function has been renamed
        try:
            for dotted in BREAKDOWN_CALLS:
                resolve(dotted)
        except BreakdownBroken as exc:
            broken = str(exc)
            common.log(f"BREAKDOWN BROKEN: {broken}")
    memories = make_memories(args.seed, args.users, args.per_user)
    queries = make_queries(memories, args.searches + WARMUP_SEARCHES, args.seed)
    vocabulary = {w.lower() for m in memories for w in m.content.split()}
    tenancy = common.create_tenancy("search", args.users)
    result: dict[str, Any] = {
        "benchmark": "search",
        "machine": machine,
        "config": {
            "users": args.users,
            "memories": len(memories),
            "limit": LIMIT,
            "searches_per_mode": args.searches,
            "warmup_searches_per_mode": WARMUP_SEARCHES,
            "embedder": "offline (hashing), forced by the bench",
            "client": "one httpx client, one search at a time, keep-alive",
        },
        "dataset": {
            "distinct_contents": len({m.content for m in memories}),
            "distinct_words": len(vocabulary),
            "occurred_at_range": [
                min(m.occurred_at for m in memories).date().isoformat(),
                max(m.occurred_at for m in memories).date().isoformat(),
            ],
            "queries_naming_the_thing": round(
                sum(q.names_the_thing for q in queries) / len(queries), 3
            ),
            "sample_memories": [m.content for m in memories[:5]],
            "sample_queries": [q.text for q in queries[:5]],
        },
        "servers": {},
        "targets": TARGETS,
    }
    conn = common.raw_connection(bench)
    loaded = False
    runs = [
        (f"{name}#{turn + 1}" if args.rounds > 1 else name, name)
        for turn in range(args.rounds)
        for name in args.servers
    ]
    starters = {
        "as_shipped": start_as_shipped,
        "shipped_web": start_shipped_web,
        "harness": start_harness,
    }
    try:
        for label, name in runs:
            web, config = starters[name](bench)
            baseline = None
            if args.baseline_tree:
                baseline, _ = starters[name](bench, args.baseline_tree.resolve())
                config["baseline_tree"] = str(args.baseline_tree.resolve())
            try:
                with common.http_client(web.base_url, tenancy.headers, timeout=120) as http:
                    if not loaded:
                        _, seconds = load(http, memories, tenancy.user_ids)
                        loaded = True
                        result["load"] = {
                            "through": name,
                            "seconds": round(seconds, 2),
                            "memories_per_s": round(len(memories) / seconds),
                        }
                        common.log(f"loaded {len(memories)} memories in {seconds:.1f}s")
                        conn.execute("ANALYZE memories_memory")
                    common.log(f"--- {label}: searching")
                    if baseline is not None:
                        with common.http_client(
                            baseline.base_url, tenancy.headers, timeout=120
                        ) as other:
                            result.setdefault("paired_with_baseline", {})[label] = run_paired(
                                http, other, queries=queries, user_ids=tenancy.user_ids,
                                modes=args.modes, deadline=deadline,
                            )  # fmt: skip
                    report = run_searches(
                        http, queries=queries, user_ids=tenancy.user_ids, modes=args.modes,
                        conn=conn, deadline=deadline,
                    )  # fmt: skip
                    result["servers"][label] = {
                        "config": config,
                        **report,
                        "meets_targets": verdict(report),
                    }
            finally:
                web.process.stop()
                if baseline is not None:
                    baseline.process.stop()
        if args.breakdown and broken is None:
            common.log("--- in-process breakdown")
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            try:
                result["breakdown"] = breakdown(
                    tenancy=tenancy, queries=queries[: args.searches], modes=args.modes,
                    deadline=deadline,
                )  # fmt: skip
            except BreakdownBroken as exc:
                broken = str(exc)
                common.log(f"BREAKDOWN BROKEN: {broken}")
        if broken is not None:
            # The API's figures stand; the run still fails (run_all reports an `error`).
            result["breakdown"] = {"broken": broken}
            result["error"] = f"BreakdownBroken: {broken}"
    finally:
        conn.close()
        common.stop_all()
    result["summary"] = summary(result)
    if args.rounds > 1:
        result["medians"] = medians(result)
    if "modes" in result.get("breakdown", {}):
        result["breakdown"]["api_p50_minus_sum_of_parts_ms"] = unaccounted(result)
    result["total_seconds"] = round(time.monotonic() - began, 1)
    return result


def unaccounted(result: dict[str, Any]) -> dict[str, Any]:
    """Per server and mode, the API's p50 less the in-process parts' p50 sum: HTTP, ASGI, the
    view's plumbing (DRF, middleware, the embedding slot), logging, metrics and the client."""
    out: dict[str, Any] = {}
    for server, report in result["servers"].items():
        for mode, entry in report["modes"].items():
            parts = result["breakdown"]["modes"].get(mode)
            if parts and entry["latency"]["p50_ms"] is not None:
                gap = entry["latency"]["p50_ms"] - parts["sum_of_parts_p50_ms"]
                out.setdefault(server, {})[mode] = round(gap, 2)
    return out


def medians(result: dict[str, Any]) -> dict[str, Any]:
    """Per server and mode, the median over rounds of p50 and p99."""
    p50s: dict[tuple[str, str], list[float]] = {}
    p99s: dict[tuple[str, str], list[float]] = {}
    for label, report in result["servers"].items():
        server = label.split("#")[0]
        for mode, entry in report["modes"].items():
            if entry["latency"]["p50_ms"] is not None:
                p50s.setdefault((server, mode), []).append(entry["latency"]["p50_ms"])
                p99s.setdefault((server, mode), []).append(entry["latency"]["p99_ms"])
    out: dict[str, Any] = {}
    for (server, mode), values in p50s.items():
        row = {
            "rounds": len(values),
            "p50_ms_median": round(statistics.median(values), 2),
            "p99_ms_median": round(statistics.median(p99s[(server, mode)]), 2),
            "p50_ms_each": values,
        }
        out.setdefault(server, {})[mode] = row
    return out


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per server x mode: the figures to read first."""
    rows = []
    for server, report in result["servers"].items():
        for mode, entry in report["modes"].items():
            rows.append(
                {
                    "server": server,
                    "mode": mode,
                    "p50_ms": entry["latency"]["p50_ms"],
                    "p90_ms": entry["latency"]["p90_ms"],
                    "p99_ms": entry["latency"]["p99_ms"],
                    "all_true_top_k": entry.get("all_true_top_k"),
                    "vector_leg_ranks_exact": entry.get("vector_leg_ranks_exact"),
                }
            )
    return rows


if __name__ == "__main__":
    common.run_main("search", main)
