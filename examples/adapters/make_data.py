"""Build the two demo adapter datasets: farm-notes and helpdesk.

    python examples/adapters/make_data.py

Writes <name>/train.jsonl and <name>/heldout.jsonl next to this file. Only the
standard library is used and the random seed is fixed, so every run writes the
same files. The held-out files use whole combinations that never appear in
training: (crop, problem) pairs for farm-notes and whole topics for helpdesk.
"""

import json
import random
import sys
from pathlib import Path

sys.dont_write_bytecode = True
import farm_pieces as F
import helpdesk_pieces as H

HERE = Path(__file__).resolve().parent
SEED = 20240611


# ---------------------------------------------------------------- helpers

def cap(s):
    return s[:1].upper() + s[1:] if s else s


def typo(rng, text, n=1):
    """Put n small typing slips into words of five letters or more."""
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    rng.shuffle(idx)
    for i in idx[:n]:
        w = words[i]
        k = rng.randrange(1, len(w) - 2)
        kind = rng.choice(["swap", "drop", "double"])
        if kind == "swap":
            w = w[:k] + w[k + 1] + w[k] + w[k + 2:]
        elif kind == "drop":
            w = w[:k] + w[k + 1:]
        else:
            w = w[:k] + w[k] + w[k:]
        words[i] = w
    return " ".join(words)


def record(user, answer):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- farm-notes

FIELD_TEMPLATES = [
    "{Ls} {C}: {S} on {E}{W}.{T}",
    "{Cc}, {L}. {Sc} on {E}.{Wsent}{T}",
    "Checked the {C} in {L} today. Found {S} on {E}{W}.{T}",
    "crop: {C}\nwhere: {L}\nseen: {S}\nhow much: {E}{Wline}{Tline}",
    "{C} - {S} - {E} - {L}{Wdash}{T}",
    "This morning I walked through the {C} in {L} and noticed {S}. It is on {E} so far{W}.{T}",
    "{D}: {C}, {L}, {S}, {E}{W}.{T}",
    "{Sc} in my {C} ({L}), {E}{Wc}.{T} What should I do?",
    "{low}",
    "{Lc}: {C} showing {S} on {E}{W}.{T}",
    "Problem in the {C}, {L}: {S}. {Ec} affected{W}.{T}",
]
ANIMAL_TEMPLATES = [
    "{Lc}: {E} with {S}{W}.{T}",
    "Noticed {E} with {S} this morning in {L}.{T}",
    "animal: {a}\nseen: {S}\nhow many: {E}\nwhere: {L}{Tline}",
    "{a} - {S} - {E}{Tdash}",
    "{D}: {E} in {L} showing {S}.{T}",
    "Worried about my {a}. {Ec} with {S}{W}.{T} What do I do?",
]
STORE_TEMPLATES = [
    "Store check, {C}: {S} in {E}{W}.",
    "Opened the bags of {C} in {L} and found {S} in {E}.",
    "crop: stored {C}\nseen: {S}\nhow much: {E}\nwhere: {L}",
    "{Lc}: stored {C} with {S}, {E}{W}.",
    "{C} in storage - {S} - {E}",
]
HEALTHY_TEMPLATES = [
    "{Ls} {C}: {S}.",
    "{Cc}, {L}: {S}{W}.",
    "crop: {C}\nwhere: {L}\nseen: {S}",
    "Checked the {C} in {L} today, {S}.",
    "{D}: {C}, {L}, {S}.",
]
STORE_WORDS = {
    "maize": ["maize", "shelled maize", "maize cobs"],
    "beans": ["beans", "dry beans"],
    "sorghum": ["sorghum", "sorghum grain"],
    "rice": ["rice", "milled rice", "paddy"],
}
ABIOTIC = {"drought", "waterlog", "nitrogen", "ber", "birds"}
TREND_ABIOTIC = ["Getting worse every day.", "Worse than yesterday."]
TREND_ANIMAL = ["Two more sick since yesterday.", "More are sick each day."]

# Whole (crop, problem) pairs kept out of training.
HELD_PAIRS = {
    ("sorghum", "faw"), ("wheat", "nitrogen"), ("cassava", "drought"), ("onions", "waterlog"),
    ("potatoes", "early_blight"), ("sorghum", "aphids"), ("wheat", "birds"),
    ("tomatoes", "bacterial_wilt"), ("beans", "store_weevil"), ("onions", "healthy"),
}


def seen_for(problem, crop):
    seen = problem["seen"]
    if isinstance(seen, dict):
        return seen.get(crop, seen["_"])
    return seen


def farm_note(rng, problem, crop, final):
    """Compose one note whose severity is `final`; return (prompt, answer)."""
    kind = problem["kind"]
    minimum = problem.get("min", "low")
    lo = F.SEV.index(minimum)
    f = F.SEV.index(final)
    # Extent level and whether a "getting worse" remark lifts it one step.
    if f == lo and lo > 0:
        ext_level, trend = rng.randrange(0, lo + 1), False
    elif f > 0 and kind != "store" and rng.random() < 0.2:
        ext_level, trend = f - 1, True
    else:
        ext_level, trend = f, False
    assert max(ext_level + trend, lo) == f
    lvl = F.SEV[ext_level]

    S = rng.choice(seen_for(problem, crop))
    W, Ws = rng.choice(problem["weather"])
    if problem["id"] in ABIOTIC:
        T = rng.choice(TREND_ABIOTIC) if trend else ""
    elif kind == "animal":
        T = rng.choice(TREND_ANIMAL) if trend else ""
    else:
        T = rng.choice(F.SPREADING) if trend else ""

    if kind == "field":
        C = rng.choice(F.CROP_WORDS[crop])
        L = rng.choice(F.FIELD_PLACES)
        E = rng.choice(F.FIELD_EXTENT[lvl])
        tpl = rng.choice(FIELD_TEMPLATES)
        a = ""
    elif kind == "animal":
        a = rng.choice(F.ANIMAL_WORDS[crop])
        C = a
        L = rng.choice(F.ANIMAL_PLACES[crop])
        E = rng.choice(F.ANIMAL_EXTENT[lvl]).format(a=a)
        tpl = rng.choice(ANIMAL_TEMPLATES)
    else:
        C = rng.choice(STORE_WORDS[crop])
        L = rng.choice(F.STORE_PLACES)
        E = rng.choice(F.STORE_EXTENT[lvl])
        tpl = rng.choice(STORE_TEMPLATES)
        a = ""

    if tpl == "{low}":
        parts = [C, L, S, E] + ([Ws] if Ws else [])
        prompt = " ".join(parts).lower().replace(",", "")
        if T:
            prompt += " " + T.lower().rstrip(".")
    else:
        prompt = tpl.format(
            C=C, Cc=cap(C), L=L, Lc=cap(L), Ls=rng.choice(F.SHORT_PLACES),
            S=S, Sc=cap(S), E=E, Ec=cap(E), a=a,
            W=(" " + W) if W else "", Wc=(", " + W) if W else "", Wsent=(" Weather: " + Ws + ".") if Ws else "",
            Wline=("\nweather: " + Ws) if Ws else "", Wdash=(" - " + Ws) if Ws else "",
            T=(" " + T) if T else "", Tline=("\nnote: " + T) if T else "",
            Tdash=(" - " + T.rstrip(".").lower()) if T else "", D=cap(rng.choice(F.DAYS)))
    if rng.random() < 0.15:
        prompt = typo(rng, prompt, n=rng.choice([1, 1, 2]))
    answer = json.dumps({"crop": crop, "issue": problem["issue"], "severity": final,
                         "action": problem["actions"][final]})
    return prompt, answer


def healthy_note(rng, crop):
    C = rng.choice(F.CROP_WORDS[crop])
    L = rng.choice(F.FIELD_PLACES)
    S = rng.choice(F.HEALTHY_SEEN)
    W, _ = rng.choice(F.ANY)
    prompt = rng.choice(HEALTHY_TEMPLATES).format(
        C=C, Cc=cap(C), L=L, Lc=cap(L), Ls=rng.choice(F.SHORT_PLACES), S=S,
        W=(" " + W) if W else "", D=cap(rng.choice(F.DAYS)))
    answer = json.dumps({"crop": crop, "issue": "none seen", "severity": "low",
                         "action": F.HEALTHY_ACTION})
    return prompt, answer


def build_farm(rng):
    train, held = [], []
    used = set()

    def add(rows, maker, n):
        made = 0
        for _ in range(n * 50):
            if made == n:
                break
            p, a = maker()
            if p in used:
                continue
            used.add(p)
            rows.append(record(p, a))
            made += 1
        assert made == n, "could not make enough distinct notes"

    for prob in F.PROBLEMS:
        levels = F.SEV[F.SEV.index(prob.get("min", "low")):]
        train_crops = [c for c in prob["crops"] if (c, prob["id"]) not in HELD_PAIRS]
        n = 16 if len(prob["crops"]) > 4 else 12
        for i in range(n):
            crop = train_crops[i % len(train_crops)]
            final = levels[i % len(levels)]
            add(train, lambda: farm_note(rng, prob, crop, final), 1)
        for crop in prob["crops"]:
            if (crop, prob["id"]) in HELD_PAIRS:
                for i in range(4):
                    final = levels[i % len(levels)] if i < 3 else rng.choice(levels)
                    add(held, lambda: farm_note(rng, prob, crop, final), 1)
    for i, crop in enumerate(c for c in F.HEALTHY_CROPS if (c, "healthy") not in HELD_PAIRS):
        add(train, lambda: healthy_note(rng, crop), 2 if i % 3 == 0 else 1)
    for crop in F.HEALTHY_CROPS:
        if (crop, "healthy") in HELD_PAIRS:
            add(held, lambda: healthy_note(rng, crop), 4)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


# ---------------------------------------------------------------- helpdesk

# Whole topics kept out of training.
HELD_TOPICS = {"paper_jam", "eject_usb", "projector_sound", "average", "page_numbers",
               "touchpad", "spill", "rename", "locked", "screenshot"}


def helpdesk_answer(topic):
    lines = [f"{i}. {s}" for i, s in enumerate(topic["steps"], 1)]
    return "\n".join(lines + [H.CLOSING])


def dress(rng, ask):
    """Wrap a hand-written question in a greeting or a remark, sometimes with a slip."""
    pre = rng.choice(H.PREFIXES)
    suf = rng.choice(H.SUFFIXES)
    q = ask
    if pre.endswith(". ") or (pre and rng.random() < 0.5):
        q = cap(q)
    text = pre + q
    if suf:
        if text[-1] not in ".?!":
            text += "."
        text += suf
    if rng.random() < 0.12:
        text = typo(rng, text)
    return text


def build_helpdesk(rng):
    train, held = [], []
    for topic in H.TOPICS:
        heldout = topic["id"] in HELD_TOPICS
        n = 4 if heldout else 7
        answer = helpdesk_answer(topic)
        seen = set()
        asks = list(topic["asks"])
        rng.shuffle(asks)
        i = 0
        while len(seen) < n:
            ask = asks[i % len(asks)]
            # First time round, the question is used as written.
            prompt = ask if i < len(asks) and rng.random() < 0.4 else dress(rng, ask)
            i += 1
            if prompt in seen:
                continue
            seen.add(prompt)
            (held if heldout else train).append(record(prompt, answer))
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def main():
    rng = random.Random(SEED)
    for name, build in (("farm-notes", build_farm), ("helpdesk", build_helpdesk)):
        train, held = build(rng)
        train_prompts = {r["messages"][0]["content"] for r in train}
        assert not any(r["messages"][0]["content"] in train_prompts for r in held)
        write_jsonl(HERE / name / "train.jsonl", train)
        write_jsonl(HERE / name / "heldout.jsonl", held)
        print(f"{name}: {len(train)} train, {len(held)} heldout")


if __name__ == "__main__":
    main()
