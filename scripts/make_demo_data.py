"""Writes the embedded demo data (jaxalign/data/demo/*.jsonl) from small fact tables.

The demo teaches one objectively checkable preference: a short, correct, complete
answer beats the same answer followed by a rambling run-on (the habit of small
chat models), and beats a wrong one. Every prompt carries its
accepted answers, so the demo's rule judge can score any response, and the demo
can report whether alignment improved. Prompts are split into disjoint seed,
round and evaluation sets. Run from the repository root:

    python scripts/make_demo_data.py
"""

import json
import pathlib
import random

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("Kenya", "Nairobi"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("the Czech Republic", "Prague"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("New Zealand", "Wellington"),
    ("England", "London"),
    ("Scotland", "Edinburgh"),
    ("Switzerland", "Bern"),
    ("Colombia", "Bogota"),
]
SYMBOLS = [
    ("gold", "Au"),
    ("silver", "Ag"),
    ("iron", "Fe"),
    ("oxygen", "O"),
    ("hydrogen", "H"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("sodium", "Na"),
    ("potassium", "K"),
    ("helium", "He"),
    ("copper", "Cu"),
    ("lead", "Pb"),
    ("calcium", "Ca"),
    ("neon", "Ne"),
    ("zinc", "Zn"),
    ("mercury", "Hg"),
    ("tin", "Sn"),
    ("sulfur", "S"),
    ("chlorine", "Cl"),
    ("uranium", "U"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("early", "late"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("full", "empty"),
    ("high", "low"),
    ("loud", "quiet"),
    ("long", "short"),
    ("thick", "thin"),
    ("true", "false"),
    ("open", "closed"),
    ("push", "pull"),
    ("win", "lose"),
    ("buy", "sell"),
    ("day", "night"),
]
COUNTS = [
    ("days are in a week", "7", "seven"),
    ("months are in a year", "12", "twelve"),
    ("legs does a spider have", "8", "eight"),
    ("legs does an insect have", "6", "six"),
    ("sides does a triangle have", "3", "three"),
    ("sides does a square have", "4", "four"),
    ("hours are in a day", "24", "twenty-four"),
    ("minutes are in an hour", "60", "sixty"),
    ("continents are there on Earth", "7", "seven"),
    ("planets are in the Solar System", "8", "eight"),
    ("players does a soccer team have on the field", "11", "eleven"),
    ("wheels does a bicycle have", "2", "two"),
    ("colors are in a rainbow", "7", "seven"),
    ("strings does a standard guitar have", "6", "six"),
    ("sides does a hexagon have", "6", "six"),
]
COLORS = [
    ("a clear daytime sky", "blue"),
    ("fresh grass", "green"),
    ("a ripe banana", "yellow"),
    ("fresh snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("a carrot", "orange"),
    ("a ripe lemon", "yellow"),
    ("a polar bear's fur", "white"),
    ("a crow", "black"),
]

RAMBLE_CLOSERS = [
    "I hope this helps, and let me know if you have any other questions!",
    "There is much more to learn about this topic if you are curious, so feel free to ask more.",
    "It is always good to learn new facts like this one, and I am glad you asked.",
    "If you want, I can also tell you more background and history about it.",
]


def facts():
    out = []
    for country, city in CAPITALS:
        out.append(
            dict(
                kind="capital",
                answer=[city],
                questions=[
                    f"What is the capital of {country}?",
                    f"Which city is the capital of {country}?",
                    f"Name the capital city of {country}.",
                ],
                short=f"The capital of {country} is {city}.",
                context=f"{country[0].upper() + country[1:]} is a country with a long history, "
                "many interesting places and a rich culture that attracts many visitors.",
                wrong=lambda rng, c=city: (
                    f"The capital is {rng.choice([x for _, x in CAPITALS if x != c])}."
                ),
            )
        )
    for element, sym in SYMBOLS:
        out.append(
            dict(
                kind="symbol",
                answer=[sym],
                questions=[
                    f"What is the chemical symbol for {element}?",
                    f"Which symbol is used for {element} in the periodic table?",
                ],
                short=f"The chemical symbol for {element} is {sym}.",
                context=f"{element.capitalize()} is a chemical element, and every element in the "
                "periodic table has a short symbol of one or two letters.",
                wrong=lambda rng, s=sym: (
                    f"The symbol is {rng.choice([x for _, x in SYMBOLS if x != s])}."
                ),
            )
        )
    for word, opp in OPPOSITES:
        out.append(
            dict(
                kind="opposite",
                answer=[opp],
                questions=[
                    f"What is the opposite of '{word}'?",
                    f"Give the opposite of the word '{word}'.",
                ],
                short=f"The opposite of '{word}' is '{opp}'.",
                context="Opposites, also called antonyms, are pairs of words with contrary "
                "meanings, and they are very useful when learning a language.",
                wrong=lambda rng, o=opp: (
                    f"The opposite is '{rng.choice([x for _, x in OPPOSITES if x != o])}'."
                ),
            )
        )
    for what, num, word in COUNTS:
        out.append(
            dict(
                kind="count",
                answer=[num, word],
                questions=[f"How many {what}?", f"Quick question: how many {what}?"],
                short=f"There are {num}.",
                context="Counting things like this is a common question, and the number is "
                "something that most people learn at school.",
                wrong=lambda rng, n=num: f"There are {int(n) + rng.choice([1, 2, 3])}.",
            )
        )
    for thing, color in COLORS:
        out.append(
            dict(
                kind="color",
                answer=[color],
                questions=[f"What color is {thing}?", f"Tell me the usual color of {thing}."],
                short=f"It is {color}.",
                context="Colors are how we describe the light that things reflect, and people "
                "see and name colors in many different ways.",
                wrong=lambda rng, c=color: f"It is {rng.choice([x for _, x in COLORS if x != c])}.",
            )
        )
    return out


def rambling(fact, rng):
    """The right answer, then the kind of run-on a small chat model adds after it."""
    return " ".join([fact["short"], fact["context"], rng.choice(RAMBLE_CLOSERS)])


def main():
    rng = random.Random(20260101)
    items = facts()
    rng.shuffle(items)
    n = len(items)
    seed_facts = items[: n // 4]
    round_facts = items[n // 4 : (3 * n) // 4]
    eval_facts = items[(3 * n) // 4 :]
    out_dir = pathlib.Path(__file__).resolve().parents[1] / "jaxalign" / "data" / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(name, records):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(records)} records")

    seed = []
    for i, fact in enumerate(seed_facts):
        for j, q in enumerate(fact["questions"][:2]):
            rejected = rambling(fact, rng) if (i + j) % 3 != 2 else fact["wrong"](rng)
            seed.append(
                dict(
                    id=f"seed-{len(seed):04d}",
                    prompt=q,
                    chosen=fact["short"],
                    rejected=rejected,
                    answer=fact["answer"],
                )
            )
    prompts = []
    for fact in round_facts:
        for q in fact["questions"]:
            prompts.append(dict(id=f"prompt-{len(prompts):04d}", prompt=q, answer=fact["answer"]))
    rng.shuffle(prompts)
    evals = [
        dict(id=f"eval-{i:04d}", prompt=f["questions"][0], answer=f["answer"])
        for i, f in enumerate(eval_facts)
    ]
    write("seed_pairs.jsonl", seed)
    write("prompts.jsonl", prompts)
    write("eval_prompts.jsonl", evals)


if __name__ == "__main__":
    main()
