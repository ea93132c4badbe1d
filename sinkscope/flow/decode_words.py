"""Words of word-distribution decoding: which decoded tokens name an image's object.

A decoded token counts as a word after :func:`normalize_token` (word-start markers of the
tokenizer removed, spaces stripped, lower case), then an exact match against the word list of the
image's label (:func:`match_words`). :data:`DEFAULT_WORDS` holds the lists of the built-in data
sets; :func:`default_words` picks one, :func:`word_sets` normalises any ``{label: words}``.

>>> match_words(["Ġa", "ĠFace"], word_sets(default_words("lfw-faces"))["face"])
(2, 'face')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .._utils import SinkscopeError

#: Words that count as the main object of an image, per dataset and label (matched after
#: :func:`normalize_token`). ``lfw-faces``: a face image counts when a token decodes to a word
#: for a face or a person (the paper's "person" class); ``non-face`` images have no object word
#: and serve as the control. ``digits``: the numeral and the English word of the digit.
DEFAULT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "lfw-faces": {
        "face": (
            "face",
            "faces",
            "facial",
            "person",
            "persons",
            "people",
            "human",
            "man",
            "woman",
            "portrait",
        ),
    },
    "digits": {
        str(d): (str(d), w)
        for d, w in enumerate(
            ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        )
    },
}

#: Word-start / continuation markers of common tokenizers (byte-level BPE, SentencePiece, WordPiece).
WORD_MARKERS = ("Ġ", "▁", "Ċ", "ĉ", "##")


def default_words(dataset: str) -> dict[str, tuple[str, ...]]:
    """The :data:`DEFAULT_WORDS` of a dataset (its name up to any ``[...]`` subset suffix); a
    one-line error naming the datasets that have a list otherwise.

    >>> default_words("digits[10]")["7"]
    ('7', 'seven')
    """
    base_name = dataset.split("[", 1)[0]
    if base_name not in DEFAULT_WORDS:
        raise SinkscopeError(
            f"no default word list for dataset {dataset!r}: pass words={{label: [word, ...]}} "
            f"(defaults exist for {', '.join(DEFAULT_WORDS)})"
        )
    return DEFAULT_WORDS[base_name]


def normalize_token(token: str | None) -> str:
    """A decoded token as a word: word-start markers removed, spaces stripped, lower case.

    >>> [normalize_token(t) for t in ["ĠCat", "▁person", " Face ", "##s", "7"]]
    ['cat', 'person', 'face', 's', '7']
    """
    s = "" if token is None else str(token)
    for m in WORD_MARKERS:
        s = s.replace(m, "")
    return "".join(s.split()).lower()


def word_sets(words: Mapping[str, Sequence[str]]) -> dict[str, frozenset[str]]:
    """``{label: words}`` normalised (:func:`normalize_token`); a single string is one word, and
    labels left with no word are dropped (their images become the control).

    >>> word_sets({"cat": ["Cat", "ĠKitten"], "dog": "Dog", "none": [""]}) == {
    ...     "cat": {"cat", "kitten"}, "dog": {"dog"}}
    True
    """
    out = {}
    for label, ws in words.items():
        if isinstance(ws, str):
            ws = [ws]
        norm = frozenset(w for w in (normalize_token(x) for x in ws) if w)
        if norm:
            out[str(label)] = norm
    return out


def match_words(
    tokens: Sequence[str], words: Sequence[str] | frozenset[str]
) -> tuple[int | None, str | None]:
    """Rank (1-based) and normalized form of the first token among ``tokens`` that is one of
    ``words`` (both normalized with :func:`normalize_token`); ``(None, None)`` when none is.

    >>> match_words(["Ġthe", "ĠPerson", "Ġman"], ["person", "people"])
    (2, 'person')
    """
    ws = {normalize_token(w) for w in words}
    for r, t in enumerate(tokens, 1):
        n = normalize_token(t)
        if n and n in ws:
            return r, n
    return None, None


__all__ = ["DEFAULT_WORDS", "WORD_MARKERS", "default_words", "match_words", "normalize_token", "word_sets"]
