"""The text every machine has offline, and the workloads cut from it.

- the CPython standard library's sources, split by file into train and held-out sets (the zoo's corpus);
- English prose from CPython's documentation (``pydoc_data.topics``; :data:`PROSE_LICENCE`), in a ``tune`` and a
  ``test`` half (fine-tuning and accuracy on real models: nothing was tuned on the ``test`` half);
- chat tasks for speculative decoding (repeat, spelling, code, open questions), cut from the same prose and code.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sysconfig
from functools import lru_cache
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch

from ryzen_opt.errors import ConfigError
from ryzen_opt.models.recipes import Recipe, get_recipe
from ryzen_opt.training.loop import TokenBlocks

EOT = "<|endoftext|>"


_EXCLUDED_DIRS = {"site-packages", "dist-packages", "idlelib", "lib2to3", "encodings", "__pycache__", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    return any(part in _EXCLUDED_DIRS or part.startswith("test") for part in rel.parts)


@lru_cache(maxsize=1)
def corpus_files() -> tuple[tuple[str, Path], ...]:
    """The stdlib ``.py`` files, sorted by relative path (tests, idlelib, lib2to3, encodings excluded)."""
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel):
            files.append((rel.as_posix(), path))
    if not files:
        raise ConfigError(f"no Python sources under {root}: the zoo's corpus is the CPython standard library")
    return tuple(sorted(files))


def is_heldout(relpath: str, every: int) -> bool:
    return int(hashlib.md5(relpath.encode()).hexdigest(), 16) % every == 0


@lru_cache(maxsize=4)
def split_corpus(heldout_every: int, max_train_chars: int | None) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    train_docs, heldout_docs = [], []
    digest = hashlib.sha256()
    used = 0
    for rel, path in corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if is_heldout(rel, heldout_every):
            heldout_docs.append(text)
        elif max_train_chars is None or used < max_train_chars:
            train_docs.append(text)
            used += len(text)
        else:
            continue
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
    return tuple(train_docs), tuple(heldout_docs), digest.hexdigest()


def corpus(recipe: str | Recipe = "default") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train_documents, heldout_documents)`` for a recipe. Deterministic: the split is by file path."""
    r = get_recipe(recipe)
    train_docs, heldout_docs, _ = split_corpus(r.heldout_every, r.max_train_chars)
    return train_docs, heldout_docs


def heldout_texts(recipe: str | Recipe = "default") -> list[str]:
    """The held-out documents: files no zoo model trained on."""
    return list(corpus(recipe)[1])


def encode_documents(tokenizer: Any, docs: tuple[str, ...] | list[str]) -> torch.Tensor:
    """One stream: each document's ids followed by the end-of-text id."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    # The backend tokenizer: documents are longer than any model context, and that is fine for a stream.
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def heldout_blocks(tokenizer: Any, recipe: str | Recipe = "default", *, blocks: int | None = 64) -> torch.Tensor:
    """The first ``blocks`` held-out token blocks ``[N, block_size]`` (all of them with ``None``), in corpus order.

    The held-out files never reach training (split by file path), so this is what accuracy losses are measured on.
    """
    r = get_recipe(recipe)
    data = TokenBlocks(encode_documents(tokenizer, heldout_texts(r)), r.block_size).blocks
    return data if blocks is None else data[:blocks]


PROSE_SPLITS = ("tune", "test")
# The prose corpus and its licence, for users who quote what their accuracy was measured on: CPython's LICENSE says
# "Python software and documentation are licensed under the Python Software Foundation License Version 2" (code
# examples in the documentation, since 3.8.6, dual licensed with the Zero-Clause BSD licence).
PROSE_LICENCE = (
    "PSF License Version 2 (Python Software Foundation License): English prose of CPython's documentation, the "
    "language reference's sections shipped in the standard library as pydoc_data.topics"
)


def prose_texts(split: str = "test") -> list[str]:
    """English prose from CPython's own documentation (``pydoc_data.topics``: the language reference's sections, about
    465k characters, shipped with every CPython), split by topic into two disjoint halves.

    ``"tune"`` is where defaults may be chosen (group sizes, calibration); ``"test"`` is where they are judged and
    gated, so no reported accuracy was tuned on the text it is measured on.
    """

    if split not in PROSE_SPLITS:
        raise ConfigError(f"prose split {split!r}: choose one of {PROSE_SPLITS}")
    keys = sorted(topics)
    start = PROSE_SPLITS.index(split)
    return [topics[k] for k in keys[start::2]]


def prose_blocks(
    tokenizer: Any, split: str = "test", *, blocks: int | None = 64, block_size: int = 256
) -> torch.Tensor:
    """``[blocks, block_size]`` token blocks of :func:`prose_texts` for a real model's tokenizer (documents joined by
    its end-of-sequence token), in order; all of them with ``blocks=None``.

    The corpus: English prose from CPython's documentation, the language reference's sections that every CPython
    ships as ``pydoc_data.topics`` (about 465k characters in 79 topics on 3.11; the running interpreter's copy, so
    another CPython version gives slightly different text). Licence: :data:`PROSE_LICENCE`, the Python Software
    Foundation License Version 2. The split is by topic, alternating in sorted order: ``"tune"`` (even positions) is
    where defaults may be chosen, ``"test"`` (odd positions) is where they are judged and gated, and the two share no
    text, so no accuracy reported on ``"test"`` was tuned on it.

    Raises:
        ConfigError: an unknown ``split``, or fewer than ``blocks`` blocks of ``block_size`` tokens in it.
    """
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in prose_texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    data = TokenBlocks(ids, block_size).blocks
    if blocks is not None and blocks > len(data):
        raise ConfigError(f"prose split {split!r} holds {len(data)} blocks of {block_size} tokens, not {blocks}")
    return data if blocks is None else data[:blocks]


COPY_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n"


def _chat_prompt(tokenizer: Any, content: str, caller: str) -> torch.Tensor:
    """``[1, T]`` ids of one user turn through the tokenizer's chat template, ending where the answer starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{caller} needs a tokenizer with a chat template (an instruct model's)")
    chat = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def copy_prompts(tokenizer: Any, passages: torch.Tensor) -> list[torch.Tensor]:
    """``[1, T]`` chat prompts asking an instruct model to repeat each row of ``passages`` (token ids) word for word:
    the repeated-context workload (an edit, a quotation) where n-gram drafting has something to look up. Through the
    tokenizer's chat template, ending where the assistant's answer starts."""
    return [_chat_prompt(tokenizer, COPY_INSTRUCTION + tokenizer.decode(row), "copy_prompts") for row in passages]


# ------------------------------------------------------------------------------------------------ chat workloads
# What users ask a small instruct model, by how much of the answer the prompt already holds: "repeat" a passage,
# correct its "spelling", rewrite a "code" snippet (the answer copies most of the prompt: prompt lookup has
# something to find), and "open" questions (it has not). Every source ships with CPython and is split in two disjoint
# halves like the prose: "tune" chooses defaults (a drafter's stopping rule), "test" gates them.
CHAT_TASKS = ("repeat", "spelling", "code", "open")


COPY_TASKS = ("repeat", "spelling", "code")


# Pure-Python standard-library functions of 8-24 lines with a docstring (inspect.getsource reads their files).
_CODE_FUNCTIONS = (
    ("textwrap", "indent"),
    ("textwrap", "shorten"),
    ("string", "capwords"),
    ("shlex", "quote"),
    ("statistics", "mean"),
    ("statistics", "median"),
    ("statistics", "stdev"),
    ("statistics", "multimode"),
    ("html", "escape"),
    ("fnmatch", "filter"),
    ("base64", "b64encode"),
    ("base64", "urlsafe_b64decode"),
    ("glob", "escape"),
    ("urllib.parse", "urldefrag"),
    ("urllib.parse", "urlunsplit"),
    ("email.utils", "format_datetime"),
    ("colorsys", "rgb_to_hsv"),
    ("colorsys", "hsv_to_rgb"),
    ("calendar", "monthrange"),
    ("mimetypes", "add_type"),
)


_OPEN_QUESTIONS = (
    "Why do leaves change colour in autumn?",
    "What are three good habits for learning a new language?",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend hiking trip?",
    "Why is the ocean salty?",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "What is the difference between weather and climate?",
    "How can I sleep better at night?",
    "What makes a good cup of coffee?",
    "Why do cats purr?",
    "How do airplanes stay in the air?",
    "What are the benefits of regular exercise?",
    "How do vaccines work?",
    "What is a good way to start saving money?",
    "Why do we have seasons?",
    "Suggest a simple recipe for dinner tonight.",
)


TASK_INSTRUCTIONS = {
    "repeat": COPY_INSTRUCTION + "{text}",
    "spelling": "Correct the spelling mistakes in the following text. Reply with the corrected text only.\n\n{text}",
    "code": (
        "Rewrite this Python function with type hints added. Keep everything else unchanged.\n\n```python\n{text}```"
    ),
    "open": "{text}",
}


def _passages(split: str, words: int) -> list[str]:
    """Paragraphs of the prose split with at least ``words`` words, cut after the last sentence that ends within their
    first ``words`` (and past half of them), in order. A passage that stops mid-sentence reads as text to continue:
    asked to repeat one that ended on "... the "__get__()" method. Data", SmolLM2 summarised it instead."""
    out = []
    for text in prose_texts(split):
        for paragraph in text.split("\n\n"):
            tokens = paragraph.split()
            if len(tokens) < words or paragraph.startswith(" "):  # too short, or an indented code example
                continue
            ends = [i for i in range(words // 2, words) if tokens[i].rstrip("\"')\u201d").endswith((".", "?", "!"))]
            if ends:
                out.append(" ".join(tokens[: ends[-1] + 1]))
    return out


def misspell(text: str, every: int = 6) -> str:
    """``text`` with a typo in every ``every``-th word of five or more letters: its second and third letters swapped
    (deterministic, so a task's prompts are the same on every machine)."""
    words = text.split(" ")
    seen = 0
    for i, word in enumerate(words):
        if len(word) >= 5 and word.isalpha():
            seen += 1
            if seen % every == 0 and word[1] != word[2]:
                words[i] = word[0] + word[2] + word[1] + word[3:]
    return " ".join(words)


def task_texts(task: str, split: str = "test", *, n: int = 8, words: int = 90) -> list[str]:
    """The first ``n`` texts of ``task`` (one of :data:`CHAT_TASKS`) in ``split``, before the instruction."""

    if task not in CHAT_TASKS:
        raise ConfigError(f"chat task {task!r}: choose one of {CHAT_TASKS}")
    if split not in PROSE_SPLITS:
        raise ConfigError(f"split {split!r}: choose one of {PROSE_SPLITS}")
    half = PROSE_SPLITS.index(split)
    if task in ("repeat", "spelling"):
        texts = _passages(split, words)
        texts = texts[0::2] if task == "repeat" else texts[1::2]  # disjoint passages for the two tasks
        if task == "spelling":
            texts = [misspell(t) for t in texts]
    elif task == "code":
        texts = []
        for module, name in _CODE_FUNCTIONS[half::2]:
            try:
                texts.append(inspect.getsource(getattr(importlib.import_module(module), name)))
            except (OSError, TypeError, AttributeError):  # a CPython without the module's source files
                continue
    else:
        texts = list(_OPEN_QUESTIONS[half::2])
    if len(texts) < n:
        raise ConfigError(f"chat task {task!r} has {len(texts)} texts in split {split!r}, not {n}")
    return texts[:n]


def chat_prompts(tokenizer: Any, task: str, split: str = "test", *, n: int = 8, words: int = 90) -> list[torch.Tensor]:
    """``[1, T]`` chat prompts of ``task`` (see :data:`CHAT_TASKS`) through the tokenizer's chat template, ending where
    the assistant's answer starts: the workloads speculative decoding is measured on."""
    texts = task_texts(task, split, n=n, words=words)
    return [_chat_prompt(tokenizer, TASK_INSTRUCTIONS[task].format(text=text), "chat_prompts") for text in texts]
