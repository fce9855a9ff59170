"""Text like real memories for the write benches: short first-hand facts ("Adopted a beagle named
Toby from a shelter in Ballard"), every one distinct, over a vocabulary of tens of thousands of
words.

Real memories mix a few hundred common words with a long tail of names (people, pets, streets,
shops, products) that a given batch meets once. The tail is what an embedder's per-word cache
cannot hold, so a bench fed "note 123" with a dozen hobbies measures the cache, not the embedder.
Here templates are filled from word lists (a few thousand words) and from made-up names built from
syllables (tens of thousands), picked with a Zipf-like skew: common words repeat as they do in
real text, rare ones mostly do not.

Seeded: a fresh process's `MemoryText(seed)` gives the same texts in the same order. No text is
given twice in a process, whichever source gave it first.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterable
from functools import lru_cache


def _words(text: str) -> list[str]:
    return text.split()


# fmt: off
FIRST_NAMES = _words("""
Aaron Abigail Adam Adrian Aisha Alan Albert Alex Alice Amelia Amir Ana Andre Andrea Angela Anna
Anton Arjun Astrid Ava Beatriz Ben Bianca Boris Brian Bruno Camila Carlos Carmen Caroline Chen
Chloe Chris Clara Claude Colin Daniel Dara David Diego Dmitri Elena Eli Elif Ellen Emil Emma Erik
Esther Ethan Eva Fatima Felix Fiona Francesca Frank Freya Gabriel Gemma George Grace Greta Hana
Hannah Hassan Helen Henrik Hugo Ian Ibrahim Ines Ingrid Isaac Isabel Ivan Jack Jana Jasmine Javier
Jin Joanna Jonas Jorge Julia Kai Karim Kate Kenji Kira Lars Laura Leila Leo Liam Lina Lucas Lucia
Luis Maja Marco Maria Marta Mateo Maya Mei Mia Mikhail Mila Nadia Naomi Nina Noah Nora Olga Oliver
Omar Oscar Paolo Paula Pedro Petra Priya Rafael Rahul Rosa Ruth Sam Sara Sasha Sean Sofia Sven Tara
Theo Tomas Uma Valeria Victor Vera Wei Yara Yusuf Zara Zoe
""")
PETS = _words("""
beagle labrador poodle terrier spaniel dachshund collie husky corgi greyhound whippet pug boxer
tabby kitten parrot budgie hamster rabbit tortoise goldfish ferret gecko cockatiel canary
""")
PLACES = _words("""
Ballard Fremont Capitol Brooklyn Queens Harlem Soho Camden Hackney Brixton Islington Kreuzberg
Neukolln Prenzlauer Montmartre Marais Belleville Trastevere Monti Gracia Raval Alfama Chiado
Shibuya Shimokitazawa Koenji Itaewon Mission Castro Williamsburg Astoria Kensington Notting Leith
Stockbridge Vesterbro Norrebro Sodermalm Kallio Zizkov Vinohrady Jordaan Oud Ixelles Schaerbeek
Lisbon Porto Madrid Seville Valencia Barcelona Rome Milan Turin Naples Bologna Florence Venice
Paris Lyon Marseille Bordeaux Nantes Berlin Hamburg Munich Cologne Leipzig Dresden Vienna Zurich
Geneva Basel Prague Brno Krakow Warsaw Gdansk Budapest Bucharest Sofia Athens Thessaloniki
Istanbul Izmir Cairo Tunis Casablanca Nairobi Lagos Accra Kigali Dakar Johannesburg Durban Lima
Cusco Quito Bogota Medellin Santiago Valparaiso Montevideo Mendoza Toronto Montreal Vancouver
Calgary Halifax Boston Chicago Denver Austin Portland Seattle Oakland Phoenix Atlanta Miami
Nashville Detroit Minneapolis Tokyo Osaka Kyoto Sapporo Seoul Busan Taipei Hanoi Saigon Bangkok
Manila Jakarta Singapore Mumbai Pune Chennai Delhi Kolkata Dhaka Karachi Tbilisi Yerevan Baku
Oslo Bergen Stockholm Gothenburg Copenhagen Aarhus Helsinki Tampere Tallinn Riga Vilnius Dublin
Galway Cork Edinburgh Glasgow Manchester Leeds Bristol Cardiff Belfast Reykjavik Melbourne Sydney
Brisbane Perth Adelaide Auckland Wellington Christchurch Hobart
""")
FOODS = _words("""
ramen sushi tempura udon soba pho banh laksa rendang satay curry dal biryani paneer dosa samosa
falafel hummus shakshuka tagine couscous paella tapas gazpacho risotto lasagne gnocchi carbonara
pesto focaccia pizza burrito tacos enchiladas tamales ceviche empanadas arepas feijoada pierogi
goulash schnitzel pretzels sauerkraut borscht dumplings kimchi bibimbap bulgogi tteokbokki
croissants baguettes brioche quiche ratatouille bouillabaisse crepes souffle tiramisu gelato
baklava halva churros flan cheesecake brownies scones crumpets porridge granola pancakes waffles
bagels lox pastrami chowder gumbo jambalaya brisket cornbread biscuits grits kale quinoa lentils
chickpeas avocado mango papaya lychee durian persimmon figs pomegranate blueberries rhubarb
sourdough kombucha matcha espresso cortado chai rooibos oolong sencha mezcal tequila sake
riesling malbec rioja chianti prosecco porter stout cider
""")
ACTIVITIES = _words("""
bouldering climbing hiking trail running cycling bikepacking rowing kayaking canoeing sailing
surfing windsurfing kitesurfing snorkeling diving swimming skiing snowboarding skating curling
fencing archery judo karate aikido boxing wrestling tennis squash badminton pickleball volleyball
basketball handball rugby cricket baseball softball golf frisbee orienteering birdwatching
stargazing astronomy gardening beekeeping foraging fermenting baking pottery ceramics knitting
crochet quilting embroidery woodworking carpentry welding blacksmithing calligraphy origami
painting watercolour sketching printmaking photography filmmaking podcasting blogging journaling
poetry songwriting improv theatre ballet salsa tango flamenco swing choir piano violin cello
viola guitar ukulele banjo mandolin harp flute clarinet oboe saxophone trumpet trombone drums
chess go bridge poker crosswords sudoku jigsaws geocaching genealogy volunteering tutoring
coding robotics electronics aquariums terrariums bonsai composting meditation yoga pilates
""")
THINGS = _words("""
bicycle camera laptop tablet phone headphones speaker turntable record synthesizer keyboard
backpack tent sleeping bag kayak paddle surfboard skis snowboard helmet jacket boots sneakers
sandals raincoat umbrella scarf sweater blanket quilt lamp desk chair sofa bookshelf mattress
rug curtains plant fern cactus monstera orchid bonsai aquarium easel kiln loom sewing machine
espresso grinder kettle teapot wok skillet dutch oven blender mixer toaster thermos notebook
fountain pen typewriter telescope binoculars microscope drone scooter motorbike van car
""")
ADJECTIVES = _words("""
old new tiny huge bright dark quiet noisy cozy cramped sunny rainy windy foggy snowy vintage
modern rustic elegant shabby sturdy fragile cheap expensive handmade secondhand borrowed
restored broken favourite spare shared heavy light warm cold spicy sweet sour bitter smoky
fresh stale crispy creamy tangy mellow fancy humble weird lovely awful decent lucky
""")
JOBS = _words("""
nurse teacher engineer architect accountant lawyer paramedic pharmacist dentist surgeon
electrician plumber carpenter chef baker barista librarian journalist editor translator
designer illustrator photographer musician actor pilot mechanic firefighter researcher chemist
biologist physicist statistician economist analyst developer programmer consultant recruiter
therapist counsellor midwife vet farmer fisherman gardener florist tailor jeweller optician
""")
RELATIVES = _words("""
sister brother mother father aunt uncle cousin grandmother grandfather niece nephew daughter son
wife husband partner roommate neighbour colleague manager mentor friend
""")
MONTHS = _words("""
January February March April May June July August September October November December
""")
WEEKDAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
SHOPS = _words("""
bakery bookshop cafe deli market bar pub bistro diner gym studio library museum gallery cinema
pool park clinic garage hardware store florist pharmacy laundrette
""")
ALLERGIES = _words("""
peanuts shellfish gluten lactose pollen dust cats dogs penicillin sesame eggs soy latex bees
""")

# Syllables for made-up names (surnames, pets, streets, shops, products): the long tail.
_ONSETS = _words("b br c ch cl d dr f fl g gr h j k kl l m n p pl pr r s sh st t tr v w z")
_NUCLEI = _words("a e i o u ai ea ie ou oo")
_CODAS = ["", "", "n", "r", "l", "s", "m", "nd", "rk", "st", "th", "x", "ck", "ll"]
_SUFFIXES = ["", "", "a", "o", "er", "en", "ia", "ley", "ton", "wick", "more", "ford", "berg"]

TEMPLATES = [
    "Adopted a {pet} named {Name} from a shelter in {place}",
    "Has a {adj} {pet} called {Name} who hates the {thing}",
    "Lives on {Street} Street in {place} with their {relative}",
    "Moved to {place} in {month} {year} for a job as a {job}",
    "Works as a {job} at {Company} in {place}",
    "Started {activity} lessons with a coach named {first} {Surname} on {weekday}s",
    "Goes {activity} every {weekday} with {first} near {place}",
    "Is allergic to {allergy}, found out at Dr {Surname}'s clinic in {year}",
    "Favourite dish is the {food} at {Shop} in {place}",
    "Cooked {food} and {food2} for {first}'s birthday on {month} {day}",
    "Bought a {adj} {thing} from {Company} for {price} dollars",
    "Their {relative} {first} lives in {place} and works as a {job}",
    "Is learning {activity} from a book by {first} {Surname}",
    "Ran the {place} half marathon in {minutes} minutes in {year}",
    "Prefers {food} over {food2}, especially from {Shop}",
    "Visited {place} with {first} and stayed at the {Company} hotel",
    "Reads a chapter of {Title} by {first} {Surname} before bed",
    "Booked a table at {Shop} on {weekday} {month} {day} for {count} people",
    "Plays {activity} in a team called the {place} {Team}",
    "Their {pet} {Name} turns {count} on {month} {day}",
    "Keeps a {adj} {thing} in the spare room from their time in {place}",
    "Drinks {food} from {Shop} every morning and {food2} after dinner",
    "Wants to visit {place} and {place2} next {month}",
    "Studied {subject} with Professor {Surname} in {place} until {year}",
    "Meets {first} {Surname} for {food} at {Shop} on {weekday}s",
    "Sold their {adj} {thing} to a neighbour named {first}",
    "Grew up in {place} near {Street} Road and misses the {food} there",
    "Volunteers at the {place} {shop} every other {weekday}",
    "Gave up {food} in {month} after reading about {Surname} syndrome",
    "Is saving for a {thing} and a trip to {place} in {year}",
]
SUBJECTS = _words("""
history physics chemistry biology mathematics philosophy economics linguistics architecture
medicine law nursing music art design literature sociology psychology geology astronomy
""")
TEAMS = _words("Foxes Otters Ravens Herons Badgers Comets Rovers Wanderers Pirates Lions")
# fmt: on

# Every text given in this process, by any source: distinct across a bench's client threads.
_SEEN: set[str] = set()
_SEEN_LOCK = threading.Lock()
_SLOT = re.compile(r"\{(\w+)\}")
_TAIL_SLOTS = {"Name", "Surname", "Street", "Company", "Shop", "Title"}
_NUMBERS = {"year": (1985, 2026), "day": (1, 28), "count": (2, 12), "minutes": (85, 160),
            "price": (5, 2400)}  # fmt: skip
_LISTS = {
    "first": FIRST_NAMES, "pet": PETS, "place": PLACES, "place2": PLACES, "food": FOODS,
    "food2": FOODS, "activity": ACTIVITIES, "thing": THINGS, "adj": ADJECTIVES, "job": JOBS,
    "relative": RELATIVES, "month": MONTHS, "weekday": WEEKDAYS, "shop": SHOPS,
    "allergy": ALLERGIES, "subject": SUBJECTS, "Team": TEAMS,
}  # fmt: skip


@lru_cache(maxsize=4)
def _made_up_words(count: int) -> tuple[str, ...]:
    """`count` distinct pronounceable names ("Brantover", "Kelmira"), the same in every process:
    they are the language, not the text."""
    rng = random.Random("memory-text:names")
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3, 3, 4))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables)
        ) + rng.choice(_SUFFIXES)
        if word not in seen:
            seen.add(word)
            words.append(word.capitalize())
    return tuple(words)


class MemoryText:
    """A seeded source of distinct memory texts (see the module's opening comment)."""

    def __init__(self, seed: int | str, *, made_up: int = 40_000) -> None:
        self._rng = random.Random(f"memory-text:{seed}")
        self._tail = _made_up_words(made_up)

    def _zipf(self, words: tuple[str, ...]) -> str:
        # Log-uniform rank: frequency falls as 1/rank, as words do in text.
        rank = int(len(words) ** self._rng.random()) - 1
        return words[min(rank, len(words) - 1)]

    def _fill(self, slot: str) -> str:
        if slot in _TAIL_SLOTS:
            word = self._zipf(self._tail)
            return f"{word} {self._zipf(self._tail)}" if slot == "Title" else word
        if slot in _NUMBERS:
            low, high = _NUMBERS[slot]
            return str(self._rng.randint(low, high))
        return self._rng.choice(_LISTS[slot])

    def text(self) -> str:
        """One text never returned before in this process."""
        for _ in range(100):
            template = self._rng.choice(TEMPLATES)
            text = _SLOT.sub(lambda match: self._fill(match[1]), template)
            with _SEEN_LOCK:  # sources in other threads may have given it
                if text not in _SEEN:
                    _SEEN.add(text)
                    return text
        raise RuntimeError("no new text in 100 tries: the vocabulary is too small")

    def texts(self, count: int) -> list[str]:
        return [self.text() for _ in range(count)]


def vocabulary(texts: Iterable[str]) -> set[str]:
    """The distinct words (casefolded) of some texts."""
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"\w+", text.casefold()))
    return words
