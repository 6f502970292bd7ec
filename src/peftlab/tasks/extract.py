"""extract: turn a generated sentence about an invoice or an event into one line of JSON.

peftlab makes this task itself, so the default ``peftlab train`` needs no data download and
finishes in minutes on a laptop CPU. A row looks like::

    prompt:   "To JSON: On Mar 5, 2024, Ana Diaz paid $1,250 to Blue Peak Labs."
    response: '{"type":"invoice","customer":"Ana Diaz","vendor":"Blue Peak Labs","amount":1250,"date":"2024-03-05"}'

The model has to pick the record type, copy names, cities and companies, and normalize values
(dates in four styles -> ISO ``YYYY-MM-DD``, amounts like ``USD 1,250`` -> ``1250``). An
instruction model does not produce this exact format unprompted (held-out exact match near 0),
and a LoRA learns it in about fifty steps of four rows.

Rows are deterministic given the seed. The held-out split draws every person's first and last
name and every company from pools the training split never uses (cities, months and event kinds
are closed lists both share), so exact match measures the format, the normalization rules and
copying of unseen names, not memorized rows.
"""
from __future__ import annotations

import json
import random

SYSTEM = "JSON only."
INSTRUCTION = "To JSON: "

FIRST = [
    "Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara",
    "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe", "Arjun", "Bea", "Carlos", "Dana",
    "Emma", "Fatima", "Gus", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nora",
    "Omar", "Priya", "Rafael", "Sofia", "Tom", "Ursula", "Victor", "Wanda", "Yara", "Adam",
    "Bruno", "Clara", "Diego", "Eva", "Felix", "Gina", "Hassan", "Irene", "Jack", "Karim",
    "Laura", "Mateo", "Nadia", "Oscar", "Paula", "Ruth", "Simon", "Tessa", "Uma", "Vikram",
    "Amir", "Beth", "Mei", "Dmitri", "Elif", "Frank", "Helen", "Igor", "Jade", "Leo",
]
LAST = [
    "Diaz", "Smith", "Khan", "Novak", "Rossi", "Tanaka", "Muller", "Silva", "Okafor", "Larsen",
    "Garcia", "Chen", "Ivanova", "Dubois", "Kowalski", "Haddad", "Nguyen", "Brown", "Moreau", "Sato",
    "Fischer", "Lopez", "Petrov", "Ali", "Jensen", "Costa", "Walsh", "Becker", "Mendes", "Park",
    "Wilson", "Schmidt", "Yilmaz", "Kim", "Santos", "Murphy", "Weber", "Ortiz", "Lindqvist", "Mensah",
    "Taylor", "Romano", "Hughes", "Suzuki", "Nowak", "Ferrari", "Clarke", "Lee", "Martin", "Reyes",
    "Baker", "Kaur", "Fontaine", "Gruber", "Bianchi", "Evans", "Jovanovic", "Cohen", "Adeyemi", "Hansen",
]
# Companies are a head and a kind ("Blue Peak" + "Labs"); the held-out split gets its own heads.
COMPANY_HEADS = [
    "Blue Peak", "Northwind", "Acme", "Redleaf", "Orbit", "Kestrel", "Pinecone", "Silverline", "Harbor", "Nimbus",
    "Copperfield", "Vertex", "Lumen", "Atlas", "Maple", "Quartz", "Summit", "Falcon", "Coral", "Ironwood",
    "Beacon", "Granite", "Sunrise", "Polar", "Zephyr", "Cedar", "Orchid", "Delta", "Echo", "Nova",
    "Willow", "Apex", "River", "Crystal", "Golden Gate", "Swift", "Elm Street", "Bright Path", "Oak Hill", "Metro",
    "Green Valley", "Lucky Star", "Pixel", "Harvest", "Solar", "Deep Ocean", "Red Fox", "Urban", "Stone Bridge",
    "Cloud Nine",
]
COMPANY_KINDS = ["Labs", "Media", "Foods", "Bank", "Tools", "Energy", "Freight", "Print", "Design", "Legal",
                 "Health", "Books", "Systems", "Studio", "Motors", "Travel", "Games", "Inc", "Ltd", "Group"]
# Cities are a closed list both splits share, like the event kinds and the months: a city name is
# mostly one token (" Zurich"), and writing it inside a JSON string means spelling that token out
# afresh ('Z','ur','ich'), which a 135M model cannot do for a word it never saw spelled that way.
# Names and companies (a few tokens each) are the open values the held-out split keeps unseen.
CITIES = [
    "Lyon", "Oslo", "Madrid", "Denver", "Osaka", "Cairo", "Lima", "Dublin", "Austin", "Porto",
    "Seoul", "Nairobi", "Quebec", "Perth", "Tunis", "Bergen", "Leeds", "Boston", "Hanoi", "Accra",
    "Zurich", "Chicago", "Sydney", "Toronto", "Berlin", "Bogota", "Manila", "Dakar", "Helsinki", "Glasgow",
]
EVENTS = ["meeting", "flight", "concert", "dinner", "interview", "workshop"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]

INVOICE_TEMPLATES = [
    "{seller} billed {buyer} {amount} on {date}.",
    "Invoice: {buyer} owes {seller} {amount}, dated {date}.",
    "On {date}, {buyer} paid {amount} to {seller}.",
    "{buyer} got an invoice of {amount} from {seller} ({date}).",
]
EVENT_TEMPLATES = [
    "{person} has {a_event} in {city} on {date}.",
    "On {date}, {person} attends {a_event} in {city}.",
    "{Event} in {city} for {person}, {date}.",
    "Reminder: {person}, {event}, {city}, {date}.",
]


def held_out_pool(pool: list, held_out: bool) -> list:
    """Every fifth value is reserved for the held-out split."""
    return [v for i, v in enumerate(pool) if (i % 5 == 0) == held_out]


def format_date(rng: random.Random, year: int, month: int, day: int) -> str:
    style = rng.randrange(4)
    name = MONTHS[month - 1]
    if style == 0:
        return f"{name} {day}, {year}"
    if style == 1:
        return f"{day} {name} {year}"
    if style == 2:
        return f"{name[:3]} {day}, {year}"
    return f"{year}/{month:02d}/{day:02d}"


def format_amount(rng: random.Random, amount: int) -> str:
    style = rng.randrange(4)
    if style == 0:
        return f"${amount:,}"
    if style == 1:
        return f"{amount} USD"
    if style == 2:
        return f"USD {amount:,}"
    return f"${amount}"


def to_json(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def make_row(rng: random.Random, held_out: bool = False) -> dict:
    """One ``{"prompt", "response"}`` row drawn from the train or held-out value pools."""
    first, last = held_out_pool(FIRST, held_out), held_out_pool(LAST, held_out)
    heads = held_out_pool(COMPANY_HEADS, held_out)

    def person() -> str:
        return f"{rng.choice(first)} {rng.choice(last)}"

    year, month = rng.randint(2019, 2026), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    date = format_date(rng, year, month, day)
    iso = f"{year:04d}-{month:02d}-{day:02d}"
    if rng.random() < 0.5:
        buyer, seller = person(), f"{rng.choice(heads)} {rng.choice(COMPANY_KINDS)}"
        amount = rng.choice([rng.randint(5, 999), rng.randint(1000, 99999)])
        sentence = rng.choice(INVOICE_TEMPLATES).format(seller=seller, buyer=buyer, amount=format_amount(rng, amount), date=date)
        record = {"type": "invoice", "customer": buyer, "vendor": seller, "amount": amount, "date": iso}
    else:
        who, event, city = person(), rng.choice(EVENTS), rng.choice(CITIES)
        sentence = rng.choice(EVENT_TEMPLATES).format(person=who, event=event, a_event=("an " if event[0] in "aeiou" else "a ") + event,
                                                       Event=event.capitalize(), city=city, date=date)
        record = {"type": "event", "who": who, "event": event, "city": city, "date": iso}
    return {"prompt": INSTRUCTION + sentence, "response": to_json(record)}


def make_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` distinct rows of ``split`` ("train" or "test"), the same for the same seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"peftlab-extract-{seed}-{split}")
    rows, seen = [], set()
    for _ in range(50 * n + 100):
        if len(rows) == n:
            break
        row = make_row(rng, held_out=split == "test")
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def make_splits(n_train: int = 2000, n_test: int = 64, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows)."""
    return make_rows(n_train, seed, "train"), make_rows(n_test, seed, "test")
