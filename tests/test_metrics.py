"""Caption and VQA metrics against independently computed reference values."""

import math

import pytest

from mmdemo.metrics import caption_metrics, normalize_answer, vqa_metrics

# --- BLEU-4 ------------------------------------------------------------------------------------


def test_bleu4_matches_hand_computed_corpus_bleu():
    preds = ["A black dog runs.", "The cat sleeps on a sofa!"]
    refs = [["A black dog runs fast.", "A dog is running."], ["The cat sleeps on the sofa."]]
    # Clipped n-gram matches / candidate n-grams, summed over the corpus:
    #   image 1 "a black dog runs" is inside ref 1:      1-4 grams 4/4, 3/3, 2/2, 1/1
    #   image 2 "the cat sleeps on a sofa" vs its ref:   unigrams 5/6 (no "a"), bigrams 3/5
    #     (the cat, cat sleeps, sleeps on), trigrams 2/4, 4-grams 1/3 ("the cat sleeps on")
    #   p1 = 9/10, p2 = 6/8, p3 = 4/6, p4 = 2/4
    # Lengths: candidate 4 + 6 = 10; closest reference 4 ("a dog is running") + 6 = 10 -> BP = 1.
    expected = (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** (1 / 4)  # = 0.225 ** 0.25 = 0.68874
    assert caption_metrics(preds, refs)["bleu4"] == pytest.approx(expected, abs=1e-6)


def test_bleu4_matches_nltk_corpus_bleu_with_brevity_penalty_and_clipping():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    preds = ["A man riding a wave on top of a surfboard.", "the the the cat", "Two dogs play in the snow"]
    refs = [["A man riding a wave on a surfboard.", "A surfer rides a large wave in the ocean."],
            ["The cat is on the mat.", "There is a cat on the mat."],
            ["Two dogs are playing in the snow.", "Two brown dogs play together in deep snow.",
             "Dogs playing in snow"]]
    # The same captions tokenised by hand (lowercase, punctuation removed), so nltk does not see
    # our tokenizer. nltk: closest reference length, clipped counts, no smoothing, like coco-caption
    # (whose 1e-9 smoothing terms only move the 9th decimal here).
    hyps = [p.lower().rstrip(".").split() for p in preds]
    refs_tok = [[r.lower().rstrip(".").split() for r in rs] for rs in refs]
    expected = nltk_bleu.corpus_bleu(refs_tok, hyps)
    assert 0.2 < expected < 0.8  # a fixture where every n-gram order has matches
    assert caption_metrics(preds, refs)["bleu4"] == pytest.approx(expected, abs=1e-6)


# --- ROUGE-L -----------------------------------------------------------------------------------


def test_rouge_l_matches_hand_computed_values():
    preds = ["a black dog runs", "A dog."]
    refs = [["a dog runs fast on grass", "a black cat"], ["a dog"]]
    # Image 1: LCS with ref 1 = "a dog runs" = 3 -> P = 3/4, R = 3/6; with ref 2 = "a black" = 2
    #   -> P = 2/4, R = 2/3. coco-caption takes the best P and best R separately: P = 3/4, R = 2/3,
    #   F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.5 / (2/3 + 1.08) = 0.698473
    # Image 2: identical after tokenisation -> 1. Corpus value = mean over images.
    p, r = 3 / 4, 2 / 3
    image1 = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert caption_metrics(preds, refs)["rouge_l"] == pytest.approx((image1 + 1) / 2, abs=1e-9)


# --- CIDEr-D -----------------------------------------------------------------------------------


def test_cider_d_matches_hand_computed_values():
    # Two images, so IDF = log(2) - log(df): "a" is in both images' references (idf 0), "cat",
    # "dog", "a cat", "a dog" in one (idf log 2); n-grams no reference has get df 1 -> idf log 2.
    # Perfect two-word captions: unigram and bigram cosines are 1, 3- and 4-grams do not exist (0),
    # so CIDEr-D = 10 * mean(1, 1, 0, 0) = 5, not 10.
    assert caption_metrics(["a cat", "a dog"], [["a cat"], ["a dog"]])["cider"] == pytest.approx(5.0)
    # "a cat cat" vs "a cat": unigrams (a: 0, cat: 2 log2) vs (a: 0, cat: log2); CIDEr-D clips the
    # candidate weight to the reference's: min(2 log2, log2) * log2 / (2 log2 * log2) = 1/2.
    # Bigrams ("a cat": log2, "cat cat": log2) vs ("a cat": log2): log2^2 / (sqrt2 log2 * log2)
    # = 1/sqrt2. Trigram "a cat cat" has no reference counterpart: 0. Length penalty
    # exp(-delta^2 / (2 * 6^2)) with delta = 1 (coco-caption counts lengths in bigrams: 2 vs 1).
    image1 = 10 * (1 / 2 + 1 / math.sqrt(2) + 0 + 0) / 4 * math.exp(-1 / 72)
    result = caption_metrics(["a cat cat", "a dog"], [["a cat"], ["a dog"]])
    assert result["cider"] == pytest.approx((image1 + 5.0) / 2, abs=1e-9)


def test_cider_d_equals_pycocoevalcap_scorer_on_pretokenised_captions():
    from pycocoevalcap.cider.cider import Cider

    preds = ["A man is riding a wave on his surfboard.", "Two dogs play in the snow.", "A red bus."]
    refs = [["A surfer rides a big wave.", "A man riding a wave on top of a surfboard."],
            ["Two dogs are playing in the snow.", "Dogs running through snow."],
            ["A red double-decker bus on a street.", "A bus parked by the road."]]
    # The reference scorer gets captions as coco-caption's PTBTokenizer would hand them over:
    # lowercase, punctuation tokens removed, hyphenated words kept whole.
    gts = {0: ["a surfer rides a big wave", "a man riding a wave on top of a surfboard"],
           1: ["two dogs are playing in the snow", "dogs running through snow"],
           2: ["a red double-decker bus on a street", "a bus parked by the road"]}
    res = {0: ["a man is riding a wave on his surfboard"], 1: ["two dogs play in the snow"],
           2: ["a red bus"]}
    expected, _ = Cider().compute_score(gts, res)
    assert expected > 0.5
    assert caption_metrics(preds, refs)["cider"] == pytest.approx(float(expected), abs=1e-9)


def test_cider_d_is_zero_for_a_single_image():
    # One image: IDF = log(1) - log(df) = 0 for every n-gram, so nothing can score.
    assert caption_metrics(["a cat on a mat"], [["a cat on a mat"]])["cider"] == 0.0


# --- caption edge cases ------------------------------------------------------------------------


def test_perfect_captions_score_one():
    preds = ["A man riding a wave on a surfboard.", "Two dogs are playing in the snow."]
    refs = [["A man riding a wave on a surfboard.", "A surfer on a wave."],
            ["Some dogs in snow.", "Two dogs are playing in the snow."]]
    result = caption_metrics(preds, refs)
    assert result["bleu4"] == pytest.approx(1.0, abs=1e-6)  # coco-caption's 1e-9 smoothing
    assert result["rouge_l"] == pytest.approx(1.0)
    assert result["exact_match"] == 1.0
    assert result["cider"] > 1.0


def test_empty_and_punctuation_only_predictions_score_zero():
    for empty in ["", "  ", "..."]:
        result = caption_metrics([empty], [["a cat sits on a mat"]])
        assert result == {"bleu4": 0.0, "rouge_l": 0.0, "cider": 0.0, "exact_match": 0.0}
    # Next to a perfect caption the empty one counts as 0 in the per-image mean.
    result = caption_metrics(["", "a cat sits"], [["a dog runs"], ["a cat sits"]])
    assert result["rouge_l"] == pytest.approx(0.5)
    assert result["exact_match"] == 0.5


def test_captions_are_tokenised_like_coco_captions_ptb_tokenizer():
    # Case and punctuation do not count; clitics split as PTB does ("man's" -> "man 's").
    refs = [["a man 's dog sitting on a black-and-white couch"], ["people do n't smile"]]
    raw = caption_metrics(["A man's dog, sitting on a (black-and-white) couch!", '"People" don\'t smile...'],
                          refs)
    assert raw["exact_match"] == 1.0
    assert raw == caption_metrics([refs[0][0], refs[1][0]], refs)
    assert caption_metrics(["a dog"], [["A DOG!", "a cat"]])["exact_match"] == 1.0
    assert caption_metrics(["a dog running"], [["a dog"]])["exact_match"] == 0.0


def test_caption_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="No predictions"):
        caption_metrics([], [])
    with pytest.raises(ValueError, match="list of strings, not a string"):
        caption_metrics(["a cat"], ["a cat"])
    with pytest.raises(ValueError, match="Image 0 has no non-empty reference"):
        caption_metrics(["a cat"], [["", "?"]])


# --- VQA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("a dog.", "dog"), ("yes!", "yes"), ("dont", "don't"), ("don't", "don't"),
    ("  The Cat\n", "cat"), ("none", "0"), ("Ten", "10"), ("an apple", "apple"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000 dogs", "1000 dogs"),  # digit,digit anywhere: all punctuation is deleted, not spaced
    ("red, white", "red white"),  # "," touches a space: deleted
    ("red,white", "red white"),  # otherwise replaced by a space
    ("black-and-white", "black and white"), ("what?", "what"), ("oclock", "o'clock"),
    ("two dogs", "2 dogs"), ("yes.", "yes"),
])
def test_normalize_answer_follows_official_vqa_eval(raw, expected):
    assert normalize_answer(raw) == expected


def _official_accuracy_10(k: int) -> float:
    """vqaEval.py for 10 human answers, k of them equal to the prediction: mean over the 10
    subsets that leave one answer out of min(matches in the subset / 3, 1)."""
    subsets = [k - 1] * k + [k] * (10 - k)  # leaving out a matching answer / another one
    return sum(min(m / 3, 1) for m in subsets) / 10


@pytest.mark.parametrize("k", range(11))
def test_vqa_accuracy_with_10_answers_averages_leave_one_out_subsets(k):
    answers = ["red"] * k + ["blue", "green", "pink", "gray", "tan", "teal", "navy", "lime", "gold",
                             "plum"][:10 - k]
    assert vqa_metrics(["red"], [answers])["vqa_accuracy"] == pytest.approx(_official_accuracy_10(k))


def test_vqa_accuracy_reference_points():
    # From the definition: 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 3 of 10 -> (3 * 2/3 + 7) / 10
    # = 0.9; 1 of 10 -> (0 + 9 * 1/3) / 10 = 0.3; 4 or more (here "3" x10) -> 1.
    ten = lambda k: ["2"] * k + ["3"] * (10 - k)  # noqa: E731
    result = vqa_metrics(["two", "Two.", "2", "2!", "3"], [ten(2), ten(3), ten(1), ten(4), ten(0)])
    assert result["vqa_accuracy"] == pytest.approx((0.6 + 0.9 + 0.3 + 1 + 1) / 5)


def test_vqa_accuracy_with_fewer_than_10_answers_is_min_matches_over_3():
    assert vqa_metrics(["yes"], [["yes", "yes", "no"]])["vqa_accuracy"] == pytest.approx(2 / 3)
    assert vqa_metrics(["yes"], [["yes", "yes", "yes", "no"]])["vqa_accuracy"] == 1.0
    assert vqa_metrics(["maybe"], [["yes", "no"]])["vqa_accuracy"] == 0.0


def test_vqa_accuracy_with_one_or_two_answers_gives_full_credit_for_agreeing_with_all():
    # Single-answer datasets (easy-VQA, most user uploads): VQA accuracy equals exact match, not 1/3.
    single = vqa_metrics(["yes", "2", "red"], [["Yes"], ["two"], ["blue"]])
    assert single["vqa_accuracy"] == pytest.approx(2 / 3) == pytest.approx(single["exact_match"])
    assert vqa_metrics(["yes"], [["yes", "yes"]])["vqa_accuracy"] == 1.0
    assert vqa_metrics(["yes"], [["yes", "no"]])["vqa_accuracy"] == 0.5


def test_vqa_exact_match_uses_most_common_normalised_answer():
    answers = [["the dog", "Dog", "cat", "cat."], ["two", "2", "3"], ["red", "blue"]]
    # Q1: "dog" x2 vs "cat" x2 -> tie, the first listed ("dog") wins. Q2: "2" x2. Q3: tie -> "red".
    result = vqa_metrics(["A dog", "2", "blue"], answers)
    assert result["exact_match"] == pytest.approx(2 / 3)


def test_vqa_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="Question 0 has no reference answers"):
        vqa_metrics(["yes"], [[]])
    with pytest.raises(ValueError, match="1 predictions but 2 reference"):
        vqa_metrics(["yes"], [["yes"], ["no"]])
