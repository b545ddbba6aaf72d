"""Regenerate train.jsonl / test.jsonl of the embedded json-extraction dataset (deterministic: seeded).

    python finetune/datasets/json-extraction/make.py

Each row asks for a person's details as JSON; the sentence templates, names, cities and jobs of the test split
never appear in train, so the eval loss measures the format learned, not memorised rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Maria", "Tom", "Aiko", "Kwame", "Ingrid", "Rahul", "Lucia", "Omar", "Chen", "Sofia", "Pavel", "Amara",
         "Lars", "Fatima", "Diego", "Hana", "Jonas", "Zainab", "Mateo", "Yuki", "Elena", "Samuel", "Nadia", "Arjun",
         "Clara", "Tariq", "Freya", "Kofi", "Mei", "Anton", "Leila", "Hugo", "Priya", "Emil", "Noor", "Felix"]
LAST = ["Lopez", "Becker", "Tanaka", "Mensah", "Berg", "Sharma", "Rossi", "Haddad", "Wang", "Silva", "Novak",
        "Okafor", "Nilsen", "Rahman", "Castro", "Kim", "Weber", "Bello", "Ruiz", "Sato", "Petrova", "Adeyemi",
        "Farouk", "Iyer", "Moreau", "Aziz", "Larsen", "Boateng", "Chen", "Ivanov", "Karimi", "Dubois", "Nair",
        "Lund", "Saleh", "Fischer"]
CITIES = ["Porto", "Leeds", "Osaka", "Accra", "Bergen", "Pune", "Turin", "Beirut", "Chengdu", "Recife", "Brno",
          "Lagos", "Tromso", "Dhaka", "Cusco", "Busan", "Leipzig", "Kano", "Seville", "Sapporo", "Varna", "Ibadan",
          "Alexandria", "Mysore", "Lyon", "Tunis", "Aarhus", "Kumasi", "Xiamen", "Kazan", "Shiraz", "Nantes",
          "Kochi", "Uppsala", "Amman", "Graz"]
JOBS = ["nurse", "carpenter", "engineer", "teacher", "baker", "pilot", "chemist", "librarian", "architect",
        "farmer", "journalist", "dentist", "plumber", "translator", "photographer", "electrician", "pharmacist",
        "accountant", "gardener", "violinist", "mechanic", "lawyer", "chef", "geologist", "tailor", "optician",
        "surveyor", "potter", "cartographer", "beekeeper"]
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name} ({age}), a {job} who lives in {city}.",
    "Our new colleague, {name}, {age}, joins the {city} office as a {job}.",
    "At {age}, {name} still works as a {job} in {city}.",
    "{name}, a {job} based in {city}, turned {age} last week.",
    "Born {age} years ago, {name} now lives in {city} and works as a {job}.",
    "The {job} {name} ({age}) moved to {city} in the spring.",
    "In {city}, {name} has been a {job} for years; {name} is {age} now.",
    "{name} ({job}, {age}) wrote to us from {city}.",
    "Say hello to {name}: {age} years old, {job}, lives in {city}.",
    "Applicant: {name}. Age {age}. Current job: {job}. Home town: {city}.",
    "We spoke with {name}, a {age}-year-old {job}, at a cafe in {city}.",
    "{city} local {name} is {age} and makes a living as a {job}.",
    "After years abroad, {name} ({age}) is back in {city}, working as a {job}.",
    "A {job} aged {age}, {name} calls {city} home.",
    "Name: {name}; city: {city}; age: {age}; occupation: {job}.",
]
INSTRUCTIONS = ["Extract the person's name, age, city and job as JSON.",
                "Return a JSON object with the keys name, age, city and job for this person.",
                "Give me this person's details as JSON (name, age, city, job)."]


def rows(templates: list[str], first: list[str], last: list[str], cities: list[str], jobs: list[str], count: int,
         rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(count):
        person = {"name": f"{rng.choice(first)} {rng.choice(last)}", "age": rng.randint(19, 78),
                  "city": rng.choice(cities), "job": rng.choice(jobs)}
        sentence = rng.choice(templates).format(**person)
        article = "an" if person["job"][0] in "aeiou" else "a"
        sentence = sentence.replace(f"a {person['job']}", f"{article} {person['job']}")
        out.append({"prompt": f"{rng.choice(INSTRUCTIONS)}\n\n{sentence}", "response": json.dumps(person)})
    return out


def main() -> None:
    rng = random.Random(0)
    folder = Path(__file__).parent
    # Hold out whole templates, names, cities and jobs for test: it checks the format generalises.
    splits = {
        "train": rows(TEMPLATES[:13], FIRST[:30], LAST[:30], CITIES[:30], JOBS[:25], 320, rng),
        "test": rows(TEMPLATES[13:], FIRST[30:], LAST[30:], CITIES[30:], JOBS[25:], 48, rng),
    }
    for name, items in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


if __name__ == "__main__":
    main()
