"""Demo skill: extract a person described in one sentence into JSON with fixed keys.

Answer: `{"name": str, "age": int, "city": str, "job": str}`. The scorer parses the first
JSON object in the output and compares every field, so formatting differences that keep
the same object still count as correct.
"""
from __future__ import annotations

import json
import random

from skillpack_evals.skills.examples import Example

name = "json_extract"
max_new_tokens = 40

FIRST = ["Maria", "John", "Aiko", "Lars", "Fatima", "Pedro", "Chen", "Olga", "Kwame", "Nina",
         "Omar", "Sofia", "Ivan", "Leila", "Tom", "Priya", "Hugo", "Mei", "Paul", "Zara"]
LAST = ["Lopez", "Smith", "Tanaka", "Berg", "Khan", "Silva", "Wang", "Petrova", "Mensah", "Novak",
        "Haddad", "Rossi", "Kuznetsov", "Amini", "Baker", "Patel", "Martin", "Lin", "Dubois", "Ali"]
CITIES = ["Lyon", "Oslo", "Kyoto", "Lima", "Cairo", "Porto", "Denver", "Hanoi", "Accra", "Prague",
          "Quito", "Turin", "Dublin", "Perth", "Austin", "Seville"]
JOBS = ["nurse", "teacher", "pilot", "chef", "engineer", "baker", "lawyer", "dentist", "farmer",
        "architect", "plumber", "librarian"]
TEMPLATES = [
    "{name}, {age}, lives in {city} and works as a {job}.",
    "Meet {name}: a {age}-year-old {job} from {city}.",
    "{name} is a {job} in {city} and is {age} years old.",
    "At {age}, {name} works as a {job} and lives in {city}.",
    "The {job} {name} ({age}) is based in {city}.",
]


def generate(rng: random.Random) -> Example:
    person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**person)
    prompt = f"Extract name, age, city and job as JSON: {sentence}"
    return Example(prompt, json.dumps(person))


def first_json_object(text: str) -> dict | None:
    """The first `{...}` in `text` that parses as a JSON object, or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def score(output: str, example: Example) -> bool:
    return first_json_object(output) == json.loads(example.response)
