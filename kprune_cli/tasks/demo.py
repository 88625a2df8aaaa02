"""The offline demo task: short generated review sentences labelled positive (1) or negative (0).

Sentences come from a few templates filled from fixed word lists, so the task needs no
download and is the same for a given seed on every machine:

- a plain clause: ``"the service was truly excellent"``, ``"the plot felt painfully dull"``;
- a negated clause, which flips the adjective's polarity: ``"the ending was not bad"`` is positive;
- a first-person clause: ``"i really loved the coffee"``, ``"i did not enjoy the lecture"``;
- a contrast, labelled by its second clause: ``"the food was great but the staff was rude"``
  and ``"although the music was dull, i loved the view"``.

Negation and contrast make word counts insufficient: the same words appear under both labels
and their order decides. A fixed fraction of labels (``label_noise``) is flipped, equally in
each class, so that even a perfect model stays below 100% dev accuracy and pruning damage shows.
Labels are exactly balanced in every split. With the defaults (2,000 train and 600 validation
sentences, 4% noise) MiniLM fine-tuned for 3 epochs (~190 steps) reaches 0.96 dev accuracy, the
ceiling the noise allows.

The files follow the GLUE parquet layout the data loader reads: ``<dir>/train/0000.parquet`` and
``<dir>/validation/0000.parquet`` with columns ``sentence`` (str), ``label`` (int) and ``idx`` (int).

:func:`~kprune_cli.core.demo_model.ensure_demo_model` fine-tunes the packaged all-MiniLM-L6-v2 on it once
and caches the result, giving every command of the CLI a fine-tuned model to prune without a download.
"""

from __future__ import annotations

import fcntl
import random
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

# Bump when the generator or the fine-tuning recipe (configs/finetune.yaml as written) changes:
# cached demo models are keyed by it.
DEMO_VERSION = 1

SUBJECTS = (
    "the food", "the service", "the plot", "the acting", "the staff", "the music", "the hotel room",
    "the ending", "the price", "the movie", "the book", "the game", "the concert", "the coffee",
    "the lecture", "the app", "the view", "the design", "the show", "the trip",
)
LINKING_VERBS = ("was", "felt", "seemed", "is", "looked")
# Intensifiers carry no polarity: they appear equally often with either label.
INTENSIFIERS = ("", "truly", "really", "quite", "very", "painfully", "remarkably", "genuinely", "rather")
POSITIVE_ADJECTIVES = (
    "excellent", "great", "wonderful", "delightful", "charming", "superb", "fantastic", "pleasant",
    "brilliant", "lovely", "impressive", "enjoyable", "fresh", "friendly", "good",
)
NEGATIVE_ADJECTIVES = (
    "dull", "awful", "terrible", "boring", "bland", "disappointing", "mediocre", "poor", "dreadful",
    "rude", "tedious", "weak", "messy", "annoying", "bad",
)
POSITIVE_VERBS = ("loved", "liked", "enjoyed", "adored", "appreciated")
NEGATIVE_VERBS = ("hated", "disliked", "regretted", "resented", "detested")
# Base forms for "i did not <verb> ...".
BASE_FORM = {
    "loved": "love", "liked": "like", "enjoyed": "enjoy", "adored": "adore", "appreciated": "appreciate",
    "hated": "hate", "disliked": "dislike", "regretted": "regret", "resented": "resent", "detested": "detest",
}
NEGATIONS = ("not", "never")

NEGATION_RATE = 0.3
CONTRAST_RATE = 0.4
FIRST_PERSON_RATE = 0.3


def _described_clause(rng: random.Random, positive: bool) -> str:
    """``"<subject> <verb> [not] [intensifier] <adjective>"`` with the given polarity."""
    negated = rng.random() < NEGATION_RATE
    adjectives = POSITIVE_ADJECTIVES if positive != negated else NEGATIVE_ADJECTIVES
    words = [rng.choice(SUBJECTS), rng.choice(LINKING_VERBS)]
    if negated:
        words.append(rng.choice(NEGATIONS))
    words += [rng.choice(INTENSIFIERS), rng.choice(adjectives)]
    return " ".join(w for w in words if w)


def _first_person_clause(rng: random.Random, positive: bool) -> str:
    """``"i [really] <verb> <subject>"``, ``"i did not <verb> ..."`` or ``"i never <verb> ..."``."""
    negated = rng.random() < NEGATION_RATE
    verb = rng.choice(POSITIVE_VERBS if positive != negated else NEGATIVE_VERBS)
    if negated:
        negated_verb = f"never {verb}" if rng.random() < 0.5 else f"did not {BASE_FORM[verb]}"
        return f"i {negated_verb} {rng.choice(SUBJECTS)}"
    intensifier = rng.choice(("", "really", "truly", "genuinely"))
    return " ".join(w for w in ("i", intensifier, verb, rng.choice(SUBJECTS)) if w)


def _clause(rng: random.Random, positive: bool) -> str:
    if rng.random() < FIRST_PERSON_RATE:
        return _first_person_clause(rng, positive)
    return _described_clause(rng, positive)


def demo_sentence(rng: random.Random, positive: bool) -> str:
    """One sentence whose (noise-free) label is ``positive``; contrasts are labelled by their last clause."""
    if rng.random() >= CONTRAST_RATE:
        return _clause(rng, positive)
    first = _clause(rng, not positive if rng.random() < 0.8 else positive)
    last = _clause(rng, positive)
    if rng.random() < 0.5:
        return f"{first} but {last}"
    return f"although {first}, {last}"


def generate_split(rng: random.Random, size: int, label_noise: float) -> dict[str, list]:
    """``size`` examples (columns ``sentence``, ``label``, ``idx``), balanced, with flipped labels.

    ``round(label_noise * size / 2)`` labels of each class are flipped, so balance survives the noise.
    """
    labels = [i % 2 for i in range(size)]
    rng.shuffle(labels)
    sentences = [demo_sentence(rng, bool(label)) for label in labels]
    flips_per_class = round(label_noise * size / 2)
    members = {label: [i for i, y in enumerate(labels) if y == label] for label in (0, 1)}
    for label in (0, 1):
        for i in rng.sample(members[label], flips_per_class):
            labels[i] = 1 - label
    return {"sentence": sentences, "label": labels, "idx": list(range(size))}


def write_demo_data(directory: Path, seed: int = 0, num_train: int = 2000, num_validation: int = 600,
                    label_noise: float = 0.04) -> Path:
    """Write the demo task's train and validation splits as parquet under ``directory``; return it.

    Each split draws from its own generator seeded by ``(seed, split)``, so changing one split's size
    leaves the other unchanged.
    """
    directory = Path(directory)
    for split, size in (("train", num_train), ("validation", num_validation)):
        rng = random.Random(f"kprune-demo/{seed}/{split}")
        table = pa.table(generate_split(rng, size, label_noise))
        (directory / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, directory / split / "0000.parquet")
    return directory


def cache_root(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / f"demo-v{DEMO_VERSION}"


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` into a staging directory that becomes ``target``, unless ``target`` exists.

    Processes take turns (parallel jobs of a sweep preparing the demo at once): each holds an
    exclusive ``flock`` on ``.<name>.lock`` beside ``target`` while it builds, the others wait and
    then find ``target`` made. Only a renamed, complete ``target`` is ever used; the staging
    directories of a builder that was killed (``.<name>.*.partial``; the kernel drops its lock)
    are removed by the next one. A full disk or a cache that may not be written is one line.
    """
    from kprune_cli.runtime.console import console
    from kprune_cli.runtime.output_dir import atomic_directory, write_errors

    if target.is_dir():
        return
    with write_errors(f"the demo cache {target}", "set KPRUNE_CACHE to a writable directory with free space"):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.print(f"[bold]kprune:[/] waiting for another kprune process preparing {target}",
                              highlight=False, soft_wrap=True)
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when that process ends, however it ends
            if target.is_dir():
                return
            for leftover in target.parent.glob(f".{target.name}.*.partial"):
                shutil.rmtree(leftover, ignore_errors=True)
            with atomic_directory(target) as staging:
                build(staging)


def ensure_demo_data(cache_dir: Path) -> Path:
    """The demo data (default seed and sizes), written once under ``cache_dir``; its directory."""
    data_dir = cache_root(cache_dir) / "data"
    build_once(data_dir, write_demo_data)
    return data_dir
