"""An offline corpus of children's stories, generated from a small grammar that can also check text.

The storyteller has to train in CI with no network, so the book brings its own TinyStories-like
corpus. Each story is built section by section (introduction, what the hero likes, a wish, a
problem, a feeling, a helper, the fix, an ending); each section picks one of several sentence
templates, and each template slot picks from a word list. Slots may contain slots ("{poss} mom").

The same grammar scores text: a sentence counts as *accepted* if some template matches it exactly,
and as *consistent* if every name and pronoun slot in it refers to the story's hero, who is the
character named in the first accepted sentence (name and pronouns agree: Lily is "she", Tom is "he").
That gives chapter 7 a quality measure that a model cannot pass by luck.
"""

from __future__ import annotations

import random
import re
import socket
import threading
from dataclasses import dataclass
from functools import cache

# --- the grammar ------------------------------------------------------------------------------

GIRL_NAMES = ("Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Zoe", "Amy", "Ella", "Rose", "Kate", "Sara", "Nina", "Ruby", "Molly", "Daisy", "Grace",
              "Ivy", "Hannah", "Lola")
BOY_NAMES = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Jake", "Noah", "Oliver", "Jim", "Bob", "Dan", "Luke", "Owen", "Theo", "Eli",
             "Adam", "Hugo")
PRONOUNS = {"she": {"subj": "she", "obj": "her", "poss": "her"}, "he": {"subj": "he", "obj": "him", "poss": "his"}}
CHARACTER_SLOTS = ("name", "subj", "obj", "poss", "other")  # slots that refer to people

WORDS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "bunny", "bear", "duck", "fox", "mouse", "frog", "bird", "puppy", "kitten", "pig", "lamb", "squirrel"),
    "adj": ("little", "small", "happy", "kind", "brave", "curious", "shy", "friendly", "clever", "playful", "gentle", "silly"),
    "place": ("the park", "the forest", "the garden", "the beach", "the big house", "the farm", "the village", "the meadow", "the pond", "the hill",
              "the yard", "the old barn"),
    "activity": ("run in the grass", "sing songs", "draw pictures", "jump in puddles", "look at the stars", "build sand castles", "read books",
                 "dance", "climb trees", "pick flowers", "chase butterflies", "play games", "splash in the water", "ride on the swing"),
    "thing": ("red ball", "shiny kite", "toy car", "blue hat", "teddy bear", "small boat", "yellow balloon", "wooden box", "magic stone", "big drum",
              "soft blanket", "pretty shell", "green kite", "little train", "new bike", "paper crown"),
    "wish": ("find a hidden treasure", "climb the tall tree", "see the big ocean", "make a new friend", "bake a yummy cake", "win the race",
             "touch the moon", "build a big tower", "find the lost key", "swim in the lake", "catch a falling star", "ride a big horse",
             "visit the castle", "plant a garden"),
    "feeling": ("sad", "scared", "worried", "upset", "lonely", "angry", "confused", "tired"),
    "good_feeling": ("happy", "proud", "glad", "excited", "thankful"),
    "helper": ("{poss} mom", "{poss} dad", "a wise old owl", "a friendly dog", "{poss} friend {other}", "a kind old man", "a little bird",
               "{poss} big sister", "{poss} grandma", "a tall giraffe"),
    "quote": ("Do not worry, I will help you.", "Let us try together!", "You can do it!", "Be brave, {name}!", "I know what to do.",
              "We can fix this, {name}.", "Come with me, I have an idea."),
}
WORDS["name"] = GIRL_NAMES + BOY_NAMES
WORDS["other"] = WORDS["name"]
WORDS["subj"] = ("she", "he")
WORDS["obj"] = ("her", "him")
WORDS["poss"] = ("her", "his")

SECTIONS: tuple[tuple[str, ...], ...] = (
    (  # introduction: names the hero
        "Once upon a time, there was a {adj} {kind} named {name}.",
        "Once upon a time, a {adj} {kind} named {name} lived near {place}.",
        "There once was a {adj} {kind} called {name}.",
        "One sunny day, a {adj} {kind} named {name} went to {place}.",
    ),
    (  # what the hero likes
        "{^subj} loved to {activity}.",
        "{name} liked to {activity} with {poss} friends.",
        "Every day, {name} played with {poss} {thing}.",
        "{^subj} had a {thing} that {subj} loved very much.",
    ),
    (  # the wish
        "One day, {name} wanted to {wish}.",
        "{^subj} really wanted to {wish}.",
        "{name} said, \"I want to {wish} today!\"",
    ),
    (  # the problem
        "But {poss} {thing} got stuck in a tree.",
        "But the path was too long and dark.",
        "But it started to rain very hard.",
        "But {subj} could not find {poss} {thing}.",
        "But a big wind took {poss} {thing} away.",
        "But {subj} was too small to do it alone.",
    ),
    (  # the feeling
        "{name} felt very {feeling}.",
        "{^subj} was {feeling} and started to cry.",
        "{name} sat down and felt {feeling}.",
    ),
    (  # a helper arrives
        "Then {helper} came to help.",
        "Soon, {helper} saw {obj} and came over.",
        "Just then, {helper} walked by.",
    ),
    (  # the helper speaks
        "{^helper_again} said, \"{quote}\"",
        "{^helper_again} smiled and said, \"{quote}\"",
    ),
    (  # the fix
        "Together, they found a way.",
        "They worked hard and did not give up.",
        "{name} and {helper_again} tried again and again.",
        "With a little help, {name} was able to {wish}.",
    ),
    (  # the ending
        "In the end, {name} felt {good_feeling}.",
        "{name} said thank you and gave {helper_again} a big hug.",
        "From that day on, {name} always helped others too.",
        "{^subj} learned that it is good to ask for help.",
        "{name} was very {good_feeling} and smiled all day.",
    ),
)
ENDING = "The end."
WORDS["helper_again"] = tuple("the " + h[2:] if h.startswith("a ") else h for h in WORDS["helper"])  # "a wise old owl", then "the wise old owl"
WORDS["kind"] = ("girl", "boy") + WORDS["animal"]  # for the checker; the generator picks a kind that fits the name

_SLOT = re.compile(r"\{(\^?)(\w+)\}")


# --- generation -------------------------------------------------------------------------------


def _capitalize(text: str) -> str:
    if text.startswith("{"):
        return "{^" + text[1:]
    return text[:1].upper() + text[1:]


class _Story:
    """One story's cast and a filler for template slots; the hero's pronouns come from the name."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.gender = rng.choice(("she", "he"))
        self.name = rng.choice(GIRL_NAMES if self.gender == "she" else BOY_NAMES)
        self.kind = rng.choice(("girl" if self.gender == "she" else "boy",) + WORDS["animal"])
        self.other = rng.choice([n for n in WORDS["name"] if n != self.name])
        self.fixed = {"name": self.name, "other": self.other, "kind": self.kind, **PRONOUNS[self.gender]}
        self.chosen: dict[str, str] = {}  # thing, helper, wish: chosen once, so the story stays about one thing

    def fill(self, template: str) -> str:
        def replace(m: re.Match) -> str:
            cap, slot = m.group(1), m.group(2)
            if slot in self.fixed:
                value = self.fixed[slot]
            elif slot in ("thing", "helper", "wish"):
                value = self.chosen.setdefault(slot, self.fill(self.rng.choice(WORDS[slot])))
            elif slot == "helper_again":
                helper = self.chosen.get("helper") or self.fill("{helper}")
                value = "the " + helper[2:] if helper.startswith("a ") else helper
            else:
                value = self.fill(self.rng.choice(WORDS[slot]))
            return value[:1].upper() + value[1:] if cap else value

        return _SLOT.sub(replace, template)


def generate_story(rng: random.Random) -> str:
    """One story; all randomness comes from ``rng``."""
    story = _Story(rng)
    sentences = [story.fill(rng.choice(section)) for section in SECTIONS]
    if rng.random() < 0.3:
        sentences.append(ENDING)
    return " ".join(sentences)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` stories, the same ones for the same ``seed`` on every machine."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n)]


# --- checking ---------------------------------------------------------------------------------


def _slot_regex(slot: str, cap: bool, groups: list[str]) -> str:
    group = f"g{len(groups)}"
    groups.append(slot)
    alternatives = [_template_regex(_capitalize(w) if cap else w, groups) for w in WORDS[slot]]
    alternatives.sort(key=len, reverse=True)  # longest first, so "his" is not taken for "hi"
    return f"(?P<{group}>{'|'.join(alternatives)})"


def _template_regex(template: str, groups: list[str]) -> str:
    parts, pos = [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(_slot_regex(m.group(2), bool(m.group(1)), groups))
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return "".join(parts)


@cache
def _compiled_templates() -> list[tuple[re.Pattern, list[str]]]:
    compiled = []
    for template in [t for section in SECTIONS for t in section] + [ENDING]:
        groups: list[str] = []
        compiled.append((re.compile(_template_regex(template, groups)), groups))
    return compiled


def split_sentences(text: str) -> list[str]:
    """Complete sentences of ``text`` (a closing quote stays with its sentence); a trailing fragment is dropped."""
    return [s.strip() for s in re.findall(r'[^.!?]+[.!?]"?', text.replace("\n", " ")) if s.strip()]


def _parse(sentence: str) -> dict[str, list[str]] | None:
    """The character-slot values of the first template that matches ``sentence`` exactly, or None."""
    for pattern, groups in _compiled_templates():
        m = pattern.fullmatch(sentence)
        if m:
            slots: dict[str, list[str]] = {}
            for group, slot in enumerate(groups):
                value = m.group(f"g{group}")
                if value is not None and slot in CHARACTER_SLOTS:
                    slots.setdefault(slot, []).append(value.lower())
            return slots
    return None


@dataclass(frozen=True)
class GrammarScore:
    """How well a text follows the story grammar.

    accepted: fraction of sentences some template matches.
    consistent: fraction of sentences that are accepted *and* refer to the hero correctly
        (the hero's name, the hero's pronouns, and no other character under the hero's name).
    This second number is the score the book quotes.
    """

    sentences: int
    accepted: float
    consistent: float

    @property
    def score(self) -> float:
        return self.consistent


def grammar_score(text: str) -> GrammarScore:
    """Score one story; the hero is the character introduced by the first accepted sentence with a name."""
    sentences = split_sentences(text)
    if not sentences:
        return GrammarScore(0, 0.0, 0.0)
    parsed = [_parse(s) for s in sentences]
    hero = next((p["name"][0] for p in parsed if p and "name" in p), None)
    pronouns = None
    if hero is not None:
        pronouns = PRONOUNS["she" if hero in {n.lower() for n in GIRL_NAMES} else "he"]
    accepted = consistent = 0
    for p in parsed:
        if p is None:
            continue
        accepted += 1
        ok = all(v == hero for v in p.get("name", [])) and all(v != hero for v in p.get("other", []))
        if pronouns is not None:
            ok = ok and all(v == pronouns[slot] for slot in ("subj", "obj", "poss") for v in p.get(slot, []))
        elif any(p.get(slot) for slot in ("subj", "obj", "poss")):
            ok = False  # a pronoun with no hero to refer to
        consistent += ok
    n = len(sentences)
    return GrammarScore(n, accepted / n, consistent / n)


# --- data sets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoryData:
    """Stories split into training and validation sets, and where they came from."""

    train: list[str]
    valid: list[str]
    source: str  # "offline grammar (seed …)" or "roneneldan/TinyStories"
    message: str = ""  # why the offline corpus was used, when TinyStories was asked for


def split(stories: list[str], valid_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Last ``valid_fraction`` of the stories for validation; at least one story on each side."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if len(stories) < 2:
        raise ValueError("need at least two stories to split")
    n_valid = min(max(1, round(len(stories) * valid_fraction)), len(stories) - 1)
    return stories[:-n_valid], stories[-n_valid:]


def offline_stories(n: int = 20_000, seed: int = 0, valid_fraction: float = 0.05) -> StoryData:
    """The generated corpus, split."""
    train, valid = split(generate_stories(n, seed), valid_fraction)
    return StoryData(train, valid, f"offline grammar (seed {seed}, {n} stories)")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` on port 443 opens within ``timeout`` seconds, the name lookup
    included (it runs in a thread: a resolver that hangs cannot hold the caller longer); no data is sent."""
    opened: list[bool] = []

    def connect():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened)


_hub_reachable = hub_reachable  # what load_stories calls; tests replace it to stand in for the network


def load_stories(source: str = "offline", n: int = 20_000, seed: int = 0, valid_fraction: float = 0.05) -> StoryData:
    """Stories for the storyteller.

    source: ``"offline"`` (the generated corpus), ``"tinystories"`` (the real data set via ``datasets``;
        fails if it cannot be loaded) or ``"auto"`` (TinyStories when the hub is reachable, else the
        offline corpus, with the reason in ``StoryData.message``).
    n: number of stories (TinyStories: the first ``n`` of its training split, plus its validation split
        cut to the same proportion).
    """
    if source not in ("offline", "tinystories", "auto"):
        raise ValueError(f"source must be 'offline', 'tinystories' or 'auto', got {source!r}")
    if source == "offline":
        return offline_stories(n, seed, valid_fraction)
    try:
        if not _hub_reachable():
            raise ConnectionError("huggingface.co is not reachable from this machine")
        from datasets import load_dataset

        n_valid = max(1, round(n * valid_fraction))
        train = load_dataset("roneneldan/TinyStories", split=f"train[:{n}]")["text"]
        valid = load_dataset("roneneldan/TinyStories", split=f"validation[:{n_valid}]")["text"]
        return StoryData(list(train), list(valid), "roneneldan/TinyStories")
    except Exception as error:  # no network, no datasets package, hub error: say which
        if source == "tinystories":
            raise RuntimeError(f"could not load TinyStories ({error}); use source='offline' for the generated corpus") from error
        data = offline_stories(n, seed, valid_fraction)
        return StoryData(data.train, data.valid, data.source, f"TinyStories not loaded ({type(error).__name__}: {error}); using the offline corpus")
