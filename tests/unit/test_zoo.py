"""ryzen_opt.models.zoo on the tiny recipe: corpus split, cache keyed by recipe, corruption detected and rebuilt."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ryzen_opt.errors import ConfigError
from ryzen_opt.models import cache as model_cache
from ryzen_opt.models import corpus, recipes, zoo


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("zoo_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RYZEN_OPT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def built(cache: Path) -> Path:
    """One tiny zoo shared by the module (each build costs seconds); tests that damage it rebuild it."""
    return zoo.build("tiny")


def test_corpus_split_is_deterministic_and_disjoint() -> None:
    rels = [rel for rel, _ in corpus.corpus_files()]
    assert rels == sorted(rels)
    assert not any(r.startswith(("test", "idlelib/", "lib2to3/", "encodings/")) for r in rels)
    heldout = [r for r in rels if corpus.is_heldout(r, 20)]
    assert 0 < len(heldout) < len(rels) / 5
    train_docs, heldout_docs = corpus.corpus("default")
    # The split is by file path: every file lands in exactly one side.
    assert len(heldout_docs) == len(heldout)
    assert len(train_docs) + len(heldout_docs) == len(rels)
    assert corpus.corpus("default") == (train_docs, heldout_docs)


def test_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown zoo recipe 'huge'"):
        recipes.get_recipe("huge")
    with pytest.raises(ConfigError, match="'target' or 'draft'"):
        zoo.reference_model("teacher", "tiny")
    with pytest.raises(ConfigError, match="draft_layers"):
        recipes.Recipe(layers=2, draft_layers=2)


def test_tiny_zoo_builds_loads_and_is_cached(cache: Path, built: Path) -> None:
    path = zoo.build("tiny")
    assert path == built
    assert path.parent == cache / "zoo"
    assert model_cache.verify(path) is None
    manifest_mtime = (path / "manifest.json").stat().st_mtime_ns
    assert zoo.build("tiny") == path
    assert (path / "manifest.json").stat().st_mtime_ns == manifest_mtime, "an intact cache must not retrain"

    target, tok = zoo.reference_model("target", "tiny")
    draft, draft_tok = zoo.reference_model("draft", "tiny")
    assert tok.get_vocab() == draft_tok.get_vocab()
    recipe = recipes.get_recipe("tiny")
    assert target.config.num_hidden_layers == recipe.layers
    assert draft.config.num_hidden_layers == recipe.draft_layers
    # The draft is the target's early exit: same embedding (tied LM head) and first layers.
    torch.testing.assert_close(draft.model.embed_tokens.weight, target.model.embed_tokens.weight, rtol=0, atol=0)
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0
    )
    assert target.generation_config.eos_token_id == tok.convert_tokens_to_ids(corpus.EOT)
    text = "def f(x):\n    return x\n"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE is lossless


def test_changed_recipe_retrains_elsewhere(built: Path) -> None:
    base = recipes.get_recipe("tiny")
    changed = dataclasses.replace(base, seed=1)
    assert zoo.zoo_dir(base) != zoo.zoo_dir(changed)
    a, b = built, zoo.build(changed)
    assert a != b
    assert (a / "target" / "model.safetensors").read_bytes() != (b / "target" / "model.safetensors").read_bytes()


def test_training_is_deterministic(built: Path) -> None:
    path = built
    first = (path / "target" / "model.safetensors").read_bytes()
    zoo.build("tiny", force=True)
    assert (path / "target" / "model.safetensors").read_bytes() == first


def test_truncated_weights_are_detected_and_rebuilt(built: Path) -> None:
    path = built
    weights = path / "target" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert "truncated" in (model_cache.verify(path) or "")
    assert zoo.build("tiny") == path
    assert model_cache.verify(path) is None
    assert weights.read_bytes() == good


def test_unfinished_build_is_rebuilt(built: Path) -> None:
    path = built
    (path / "manifest.json").unlink()  # as if killed before the manifest was written
    assert "manifest" in (model_cache.verify(path) or "")
    zoo.build("tiny")
    assert model_cache.verify(path) is None


def test_cache_key_survives_minor_upgrades_but_not_major_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module objects zoo reads: transformers' lazy module can be re-created in sys.modules by its own imports
    # (auto_docstring loading model modules), so `import transformers` here may give another object than zoo's.
    tokenizers, transformers = zoo.tokenizers, zoo.transformers
    recipe = recipes.get_recipe("tiny")
    key = zoo.recipe_hash(recipe)
    major = transformers.__version__.split(".")[0]
    monkeypatch.setattr(transformers, "__version__", f"{major}.999.0")
    monkeypatch.setattr(torch, "__version__", "2.999.0+cpu")
    assert zoo.recipe_hash(recipe) == key  # a minor transformers or any torch upgrade keeps the trained zoo
    monkeypatch.setattr(transformers, "__version__", f"{int(major) + 1}.0.0")
    assert zoo.recipe_hash(recipe) != key  # a new major may change save_pretrained's files
    monkeypatch.setattr(transformers, "__version__", f"{major}.0.0")
    monkeypatch.setattr(tokenizers, "__version__", "999.0.0")
    assert zoo.recipe_hash(recipe) != key


def test_chat_task_texts_split_into_disjoint_halves_and_bad_names_are_refused() -> None:
    for task in corpus.CHAT_TASKS:
        tune, test = corpus.task_texts(task, "tune", n=4), corpus.task_texts(task, "test", n=4)
        assert len(tune) == len(test) == 4
        assert not set(tune) & set(test), task
    repeat, spelling = corpus.task_texts("repeat", n=4), corpus.task_texts("spelling", n=4)
    assert not set(repeat) & {corpus.misspell(t) for t in spelling}
    with pytest.raises(ConfigError, match="chat task 'poem'"):
        corpus.task_texts("poem")
    with pytest.raises(ConfigError, match="not 999"):
        corpus.task_texts("open", n=999)


def test_passages_to_repeat_end_at_a_sentence_end() -> None:
    # A passage cut mid-sentence reads as text to continue: SmolLM2 summarised one instead of repeating it.
    for split in corpus.PROSE_SPLITS:
        for text in corpus.task_texts("repeat", split, n=4):
            assert text.rstrip("\"')\u201d").endswith((".", "?", "!")), text[-40:]
            assert 45 <= len(text.split()) <= 90


def test_misspell_swaps_letters_in_every_sixth_long_word_and_nothing_else() -> None:
    text = "alpha bravo charlie delta foxtrot hotel india juliet kilos lima mike"
    out = corpus.misspell(text, every=2)
    assert out.split()[1] == "barvo"  # the second word of five or more letters: 2nd and 3rd letters swapped
    assert out.split()[3] == "dleta"
    assert [len(w) for w in out.split()] == [len(w) for w in text.split()]
    assert corpus.misspell(text, every=2) == out  # deterministic
