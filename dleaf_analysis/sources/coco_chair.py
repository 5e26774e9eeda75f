"""CHAIR's matcher for COCO (Rohrbach et al. 2018): which objects a caption mentions, faithful to the Python-3 port used by OPERA, PAI and
"Devils in Middle Layers" (lower-case; NLTK word tokenisation; NLTK perceptron POS tags;
WordNet lemmatisation by part of speech; two-word merging; the toilet-seat rule; synonyms).

Offline route (NLTK's data cannot be downloaded here):
- tokeniser: NLTK's ``NLTKWordTokenizer`` per sentence, sentences from an *untrained*
  ``PunktSentenceTokenizer`` (NLTK's trained English punkt parameters are data);
- POS tagger: NLTK's ``PerceptronTagger`` with the averaged-perceptron weights shipped in the
  PyPI package ``textblob-aptagger`` 0.2.0 (the same algorithm), plus ``potted -> JJ``;
  ``tagger="none"`` lemmatises every token as a noun instead;
- lemmatiser: NLTK's WordNet reader on WordNet 3.0 from Debian ``wordnet-base``
  (``/usr/share/wordnet``), copied with a ``lexnames`` file into a cache directory.

Ground truth and tables: ``data/coco/`` (the evaluator's own tables, see its README).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import pandas as pd

from dleaf_analysis.paths import DATA_DIR
from dleaf_analysis.errors import DleafError

COCO_DIR = DATA_DIR / "coco"
WORDNET_SOURCES = (Path("/usr/share/wordnet"),)
TAGGERS = ("perceptron", "none")
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


class CocoDataError(DleafError, ValueError):
    """A captions, annotation or question file that cannot be used; the message says why."""


class NLPResourceError(DleafError, RuntimeError):
    """WordNet or the tagger weights are missing; the message says how to install them."""


# -- offline NLP resources -------------------------------------------------------------------------
def _wordnet_root() -> Path:
    cache = Path(os.environ.get("DLEAF_CACHE", Path.home() / ".cache" / "dleaf")) / "wordnet-3.0"
    if (cache / "lexnames").is_file():
        return cache
    src = next((p for p in WORDNET_SOURCES if (p / "data.noun").is_file()), None)
    if src is None:
        raise NLPResourceError(
            "WordNet 3.0 not found: install Debian's wordnet-base (`apt-get install wordnet-base`, which "
            "scripts/setup.sh does) or copy its dict files (data.*, index.*, *.exc) to " + str(cache))
    cache.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(("data.", "index.")) or f.suffix == ".exc":
            shutil.copy(f, cache / f.name)
    cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    (cache / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES)))
    return cache


@lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNet reader on the local WordNet 3.0 files."""
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # no mapping to another WordNet version is needed
            return None

    root = _wordnet_root()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Reader(str(root), None)


class _SetOnly(pickle.Unpickler):
    """Unpickles the tagger weights (dicts, strings, floats and one ``set``); nothing else."""

    def find_class(self, module, name):
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return set
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the tagger weights")


@lru_cache(maxsize=1)
def perceptron_tagger():
    """NLTK's averaged-perceptron tagger with textblob-aptagger 0.2.0's weights (+ ``potted``)."""
    import importlib.util

    from nltk.tag.perceptron import PerceptronTagger

    # only the weights file is used: the package's own code imports textblob, which is not needed
    spec = importlib.util.find_spec("textblob_aptagger")
    path = Path(list(spec.submodule_search_locations)[0]) / "trontagger-0.1.0.pickle" if spec else None
    if path is None or not path.is_file():
        raise NLPResourceError("the POS tagger weights come from PyPI `textblob-aptagger==0.2.0`; pip install it")
    weights, tagdict, classes = _SetOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    tagger = PerceptronTagger(load=False)
    tagger.model.weights = weights
    tagger.model.classes = classes
    tagger.classes = classes
    tagger.tagdict = {**tagdict, "potted": "JJ"}
    return tagger


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` with an untrained punkt sentence splitter (no NLTK data needed)."""
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    tok = NLTKWordTokenizer()
    return [t for s in PunktSentenceTokenizer().tokenize(text) for t in tok.tokenize(s)]


def _wordnet_pos(tag: str) -> str:
    return {"J": "a", "V": "v", "N": "n", "R": "r"}.get(tag[:1], "n")


def lemmatize(word: str, pos: str) -> str:
    """NLTK's ``WordNetLemmatizer.lemmatize``: the shortest morphy lemma, else the word."""
    lemmas = wordnet()._morphy(word, pos)
    return min(lemmas, key=len) if lemmas else word


# -- the scorer ------------------------------------------------------------------------------------
@dataclass
class CocoChair:
    """CHAIR for COCO captions against the evaluator's ground truth (``gt``: image id -> objects)."""

    gt: dict[int, frozenset[str]]
    tables: dict
    tagger: str = "perceptron"

    @classmethod
    def load(cls, gt_file: str | Path | None = None, tagger: str = "perceptron") -> "CocoChair":
        if tagger not in TAGGERS:
            raise ValueError(f"unknown tagger {tagger!r}; choose one of {TAGGERS}")
        gt_file = Path(gt_file) if gt_file else COCO_DIR / "gt_objects_coco2014_all.json.gz"
        gt = load_ground_truth(gt_file)
        tables = json.loads((COCO_DIR / "chair_evaluator_tables.json").read_text())
        return cls(gt, tables, tagger)

    @cached_property
    def objects(self) -> set[str]:
        return set(self.tables["mscoco_objects"])

    def _merged(self, caption: str) -> tuple[list[str], list[tuple[str, int, int]]]:
        """NLTK's tokens of the lowercased caption and the merged words: ``(lemma or two-word object,
        first token, last token)``, as CHAIR reads them (tag, lemmatise, join the two-word objects)."""
        words = word_tokenize(caption.lower())
        tags = [t for _, t in perceptron_tagger().tag(words)] if self.tagger == "perceptron" else ["NN"] * len(words)
        lemmas = [lemmatize(w, _wordnet_pos(t)) for w, t in zip(words, tags)]
        merged, i = [], 0
        dw = self.tables["double_word_dict"]
        while i < len(lemmas):
            pair = " ".join(lemmas[i:i + 2])
            if pair in dw:
                merged.append((dw[pair], i, i + 1))
                i += 2
            else:
                merged.append((lemmas[i], i, i))
                i += 1
        return words, merged

    def _object_entries(self, merged: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """The merged words that name a COCO object (CHAIR ignores "seat" next to "toilet")."""
        names = {w for w, _, _ in merged}
        drop_seat = "toilet" in names and "seat" in names
        return [m for m in merged if m[0] in self.objects and not (drop_seat and m[0] == "seat")]

    def caption_to_words(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """``(object words, their categories, all words after merging)`` of one caption."""
        _, merged = self._merged(caption)
        obj_words = [w for w, _, _ in self._object_entries(merged)]
        inv = self.tables["inverse_synonym_dict"]
        return obj_words, [inv[w] for w in obj_words], [w for w, _, _ in merged]

    def mentions(self, caption: str) -> list[tuple[str, int, int]]:
        """``(category, start, end)`` of every object mention of :meth:`caption_to_words`, with
        the characters ``caption[start:end]`` it was read from (a two-word object spans both)."""
        text = caption.lower()
        words, merged = self._merged(caption)
        spans, pos = [], 0
        for w in words:  # align NLTK's tokens with the text (its quotes are rewritten as `` and '')
            j = text.find(w, pos)
            if j < 0 and w in ("``", "''"):
                j, w = text.find('"', pos), '"'
            if j < 0:
                spans.append(None)
                continue
            spans.append((j, j + len(w)))
            pos = j + len(w)
        inv = self.tables["inverse_synonym_dict"]
        return [(inv[w], spans[a][0], spans[b][1]) for w, a, b in self._object_entries(merged)
                if spans[a] is not None and spans[b] is not None]

    def details(self, captions: pd.DataFrame) -> pd.DataFrame:
        """Per-caption table for a frame with ``image_id`` and ``caption`` columns (unknown ids raise)."""
        rows = []
        for r in captions.itertuples(index=False):
            gt = self.gt[int(r.image_id)]
            words, nodes, merged = self.caption_to_words(r.caption)
            hall = [(w, n) for w, n in zip(words, nodes) if n not in gt]
            covered = {n for n in nodes if n in gt}
            rows.append({"image_id": int(r.image_id), "caption": r.caption, "mentioned": nodes,
                         "hallucinated": [n for _, n in hall], "gt_objects": sorted(gt), "n_mentions": len(nodes),
                         "n_hallucinated": len(hall), "n_gt": len(gt), "n_covered": len(covered), "n_words": len(merged)})
        return pd.DataFrame(rows)


def load_ground_truth(path: str | Path) -> dict[int, frozenset[str]]:
    """``{image_id: objects}`` from a (gzipped) JSON mapping; malformed files get a clear error."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CocoDataError(f"ground-truth file not found: {path}") from None
    except (json.JSONDecodeError, OSError, EOFError) as e:
        raise CocoDataError(f"{path} is not a JSON (or gzipped JSON) file: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise CocoDataError(f"{path} must map image ids to lists of COCO category names")
    try:
        return {int(k): frozenset(v) for k, v in raw.items()}
    except ValueError:
        raise CocoDataError(f"{path}: image ids must be integers") from None


def read_captions(path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption") -> pd.DataFrame:
    """A captions file: JSON Lines, or a JSON list / ``{"sentences": [...]}``; rows with missing keys
    are dropped and counted in ``df.attrs["skipped_missing_keys"]``."""
    path = Path(path)
    if not path.is_file():
        raise CocoDataError(f"captions file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            recs = [json.loads(l) for l in text.splitlines() if l.strip()]
        else:
            obj = json.loads(text)
            recs = obj["sentences"] if isinstance(obj, dict) and "sentences" in obj else obj
    except json.JSONDecodeError as e:
        raise CocoDataError(f"{path} does not parse as JSON / JSON Lines: {e}") from None
    if not isinstance(recs, list):
        raise CocoDataError(f"{path}: expected a list of caption records")
    ok = [r for r in recs if isinstance(r, dict) and image_id_key in r and caption_key in r]
    df = pd.DataFrame({"image_id": [int(r[image_id_key]) for r in ok], "caption": [str(r[caption_key]) for r in ok]})
    df.attrs["skipped_missing_keys"] = len(recs) - len(ok)
    return df
