"""Writes the verifiable-instruction task (jaxalign/data/instructions/*.jsonl).

Each prompt is a short open request (describe, explain, advise, write a poem or a note,
...) followed by one to three checkable constraints (`jaxalign.instructions`): a word
or sentence limit, words to include or avoid, a format (bullet points, a title, a
postscript), letter case, a fixed start or ending. The gold score of a response is the
fraction of its prompt's constraints it satisfies, so any response can be judged, and
DPO on gold labels has something to learn that a small chat model only partly does.

The prompts are drawn with a fixed seed, deduplicated, and split at random into
disjoint `train` (SPA's seed pairs and self-annotated rounds, and the DPO baselines),
`dev` (for choosing options) and `eval` (held out for the reported benchmark) files.
Run from the repository root:

    python scripts/make_instruction_data.py            # the shipped files
    python scripts/make_instruction_data.py --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

from jaxalign import instructions

OUT = pathlib.Path(__file__).resolve().parents[1] / "jaxalign" / "data" / "instructions"
SPLITS = (("train", 1600), ("dev", 240), ("eval", 320))
SEED = 20261201

TOPICS = [
    "the ocean",
    "a rainy day",
    "the moon",
    "autumn",
    "a mountain village",
    "the desert",
    "a busy city street",
    "a quiet library",
    "the night sky",
    "a summer garden",
    "winter",
    "a river",
    "a forest",
    "an old bridge",
    "the first day of school",
    "a train journey",
    "a lighthouse",
    "a farmers market",
    "the sunrise",
    "a thunderstorm",
    "a small bakery",
    "an island",
    "a snowy morning",
    "a football match",
    "a birthday party",
    "the beach",
    "a museum",
    "a coffee shop",
    "a camping trip",
    "the harvest",
    "a volcano",
    "a waterfall",
    "a hot air balloon",
    "a music festival",
    "a kitchen",
    "a playground",
    "a castle",
    "the wind",
    "a bicycle ride",
    "the stars",
]
ANIMALS = [
    "cats",
    "dogs",
    "elephants",
    "owls",
    "dolphins",
    "bees",
    "penguins",
    "horses",
    "foxes",
    "turtles",
    "rabbits",
    "eagles",
    "whales",
    "ants",
    "frogs",
    "parrots",
    "lions",
    "bears",
    "butterflies",
    "wolves",
]
SKILLS = [
    "learning a new language",
    "saving money",
    "sleeping well",
    "cooking at home",
    "staying focused",
    "making friends",
    "running a first race",
    "keeping a plant alive",
    "writing a good email",
    "studying for an exam",
    "starting a garden",
    "learning to swim",
    "planning a trip",
    "drinking more water",
    "reading more books",
    "keeping a journal",
    "being on time",
    "working from home",
    "learning to draw",
    "cleaning a room quickly",
]
THINGS = [
    "a bicycle",
    "a rainbow",
    "a computer",
    "the internet",
    "a refrigerator",
    "a telescope",
    "a compass",
    "a map",
    "a clock",
    "an umbrella",
    "a library card",
    "a bridge",
    "bread",
    "a battery",
    "the sun",
    "a seed",
    "a camera",
    "a piano",
    "a kite",
    "a thermometer",
]
PRODUCTS = [
    "a water bottle",
    "a backpack",
    "a desk lamp",
    "a pair of running shoes",
    "a notebook",
    "a wool scarf",
    "a tea kettle",
    "a phone case",
    "a reading chair",
    "a travel mug",
    "a board game",
    "a set of colored pencils",
    "a sun hat",
    "a pillow",
    "a lunch box",
]
PEOPLE = [
    "a friend",
    "a neighbor",
    "a teacher",
    "your grandmother",
    "a new colleague",
    "a classmate",
    "your sister",
    "a coach",
]
EVENTS = [
    "a picnic next weekend",
    "a cancelled meeting",
    "a new puppy",
    "a trip to the zoo",
    "a school play",
    "moving to a new town",
    "a bake sale",
    "a lost umbrella",
    "a concert",
    "a surprise party",
]

REQUESTS = [
    ("Write a short description of {topic}.", "topic"),
    ("Describe {topic} to someone who has never seen it.", "topic"),
    ("Write a short poem about {topic}.", "topic"),
    ("Tell me three interesting things about {animal}.", "animal"),
    ("Write a short paragraph about {animal}.", "animal"),
    ("Give some advice on {skill}.", "skill"),
    ("What are some tips for {skill}?", "skill"),
    ("Explain how {thing} works.", "thing"),
    ("Explain {thing} to a five-year-old.", "thing"),
    ("Write a product description for {product}.", "product"),
    ("Write a short note to {person} about {event}.", "note"),
    ("Tell a very short story about {topic}.", "topic"),
]
FILLERS = {
    "topic": TOPICS,
    "animal": ANIMALS,
    "skill": SKILLS,
    "thing": THINGS,
    "product": PRODUCTS,
}
EXTRA_WORDS = [
    "happy",
    "green",
    "simple",
    "light",
    "friend",
    "water",
    "morning",
    "gentle",
    "bright",
    "home",
    "music",
    "quiet",
    "warm",
    "small",
    "color",
    "time",
    "magic",
    "dream",
]
COMMON_WORDS = ["very", "beautiful", "also", "really", "great", "many", "important", "and"]
END_PHRASES = [
    "Is there anything else I can help with?",
    "That is all.",
    "Thank you for reading.",
    "Have a nice day.",
    "I hope this helps.",
]
START_WORDS = ["Yes", "Sure", "Well", "Today", "First", "Imagine"]

# Constraint types and how often they are drawn; the rarest formats stay rare because a
# 135M model almost never meets them, which would only add noise to the benchmark.
WEIGHTS = {
    "max_words": 6,
    "max_sentences": 4,
    "min_words": 2,
    "include_keywords": 5,
    "forbidden_words": 4,
    "keyword_frequency": 2,
    "no_comma": 3,
    "lowercase": 2,
    "uppercase": 1,
    "end_phrase": 3,
    "start_word": 3,
    "title": 2,
    "bullet_points": 3,
    "postscript": 2,
    "quotation": 1,
    "placeholders": 1,
    "highlighted_sections": 1,
    "ends_with_question": 2,
}
CONFLICTS = [
    {"max_words", "min_words"},
    {"min_words", "max_sentences"},
    {"lowercase", "uppercase"},
    {"lowercase", "start_word"},
    {"lowercase", "end_phrase"},
    {"lowercase", "postscript"},
    {"uppercase", "forbidden_words"},
    {"end_phrase", "postscript"},
    {"end_phrase", "ends_with_question"},
    {"postscript", "ends_with_question"},
    {"quotation", "end_phrase"},
    {"quotation", "postscript"},
    {"quotation", "start_word"},
    {"quotation", "title"},
    {"quotation", "ends_with_question"},
    {"quotation", "bullet_points"},
    {"bullet_points", "max_sentences"},
    {"title", "start_word"},
]


def _subject_words(filled: dict[str, str]) -> list[str]:
    """Content words of the request's subject: what a response will likely repeat."""
    stop = {"a", "an", "the", "of", "to", "on", "at", "your", "for", "new", "first", "old"}
    words = []
    for value in filled.values():
        words += [w for w in value.replace("-", " ").split() if w.lower() not in stop]
    return words


def _params(kind: str, rng: random.Random, subject: list[str]) -> dict:
    if kind == "max_words":
        return {"n": rng.choice([15, 20, 25, 30, 40])}
    if kind == "min_words":
        return {"n": rng.choice([10, 15, 20])}
    if kind == "max_sentences":
        return {"n": rng.choice([1, 2, 3])}
    if kind == "include_keywords":
        return {"keywords": rng.sample(EXTRA_WORDS, rng.choice([1, 2]))}
    if kind == "forbidden_words":
        pool = subject + COMMON_WORDS
        return {"words": rng.sample(pool, min(len(pool), rng.choice([1, 2])))}
    if kind == "keyword_frequency":
        return {"keyword": rng.choice(subject or EXTRA_WORDS), "n": rng.choice([2, 3])}
    if kind == "end_phrase":
        return {"phrase": rng.choice(END_PHRASES)}
    if kind == "start_word":
        return {"word": rng.choice(START_WORDS)}
    if kind == "bullet_points":
        return {"n": rng.choice([2, 3, 4])}
    if kind == "placeholders":
        return {"n": rng.choice([1, 2])}
    if kind == "highlighted_sections":
        return {"n": rng.choice([1, 2])}
    return {}


def _constraints(rng: random.Random, subject: list[str]) -> list[dict]:
    count = rng.choices([1, 2, 3], weights=[3, 4, 3])[0]
    kinds: list[str] = []
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    while len(kinds) < count:
        kind = rng.choices(names, weights=weights)[0]
        if kind in kinds or any({kind, k} in CONFLICTS for k in kinds):
            continue
        kinds.append(kind)
    return [{"type": k, **_params(k, rng, subject)} for k in kinds]


def make_prompt(rng: random.Random) -> dict:
    template, slot = rng.choice(REQUESTS)
    if slot == "note":
        filled = {"person": rng.choice(PEOPLE), "event": rng.choice(EVENTS)}
    else:
        filled = {slot: rng.choice(FILLERS[slot])}
    request = template.format(**filled)
    constraints = _constraints(rng, _subject_words(filled))
    text = " ".join([request] + [instructions.describe(c) for c in constraints])
    return {"prompt": text, "constraints": constraints}


def make_splits(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    total = sum(n for _, n in SPLITS)
    seen, prompts = set(), []
    while len(prompts) < total:
        record = make_prompt(rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            prompts.append(record)
    rng.shuffle(prompts)
    splits, start = {}, 0
    for name, n in SPLITS:
        splits[name] = [
            {"id": f"{name}-{i:04d}", **record}
            for i, record in enumerate(prompts[start : start + n])
        ]
        start += n
    return splits


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, records in make_splits().items():
        path = OUT / f"{name}.jsonl"
        text = render(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {len(records)} prompts to {path}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
