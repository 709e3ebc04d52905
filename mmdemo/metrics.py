"""Text metrics for captioning and VQA: pure functions over strings, no torch, no Java, no downloads.

Captions are scored with coco-caption's own scorers (the `pycocoevalcap` package: BLEU, ROUGE-L,
CIDEr-D are pure Python there; only its tokenizer, METEOR and SPICE shell out to Java, so they are
not used). VQA answers follow the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py), ported.
"""

from __future__ import annotations

import re
from collections import Counter

# --- captions ----------------------------------------------------------------------------------

# Stand-in for coco-caption's Java PTBTokenizer (-lowerCase) followed by its punctuation filter:
# clitics become their own tokens ("dog's" -> "dog 's", "don't" -> "do n't") as PTB does, numbers
# and hyphenated words stay whole, and the tokens coco-caption drops (. , ; : ? ! - quotes brackets)
# are dropped. Other symbols ($ % & / ...) stay as one-character tokens, as they do under PTB.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CAPTION_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|(?:[^\W\d_]\.){2,}"  # acronyms such as u.s. stay one token
    r"|\d+(?:[.,:]\d+)+"  # 3.5, 1,000, 10:30
    r"|\w+(?:[-'’]\w+)*"  # words, black-and-white, o'clock
    r"|[^\w\s]"  # any other symbol, one character at a time
)
_PTB_DROPPED = set(".,;:?!-'\"`()[]{}“”‘’…–—")


def _tokenize_caption(text: str) -> str:
    """Lowercased, PTB-style tokens joined by single spaces (the form coco-caption's scorers expect)."""
    text = _CLITIC.sub(r" \1", text.lower().replace("’", "'"))
    return " ".join(t for t in _CAPTION_TOKEN.findall(text) if t not in _PTB_DROPPED)


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Scores generated captions against reference captions, the way coco-caption does.

    Every caption is lowercased and tokenised like coco-caption's PTBTokenizer (punctuation removed,
    "dog's" -> "dog 's"), then scored with the `pycocoevalcap` scorers themselves.

    Args:
        predictions: One generated caption per image.
        references: For each image, one or more human captions (at least one non-empty).

    Returns:
        A dict of floats:
        ``bleu4``: corpus BLEU-4 in [0, 1] (coco-caption's: closest reference length, 1e-9 smoothing).
        ``rouge_l``: mean over images of ROUGE-L F (beta 1.2, best precision and best recall over
        references), in [0, 1].
        ``cider``: CIDEr-D as coco-caption reports it under the name "CIDEr" (Gaussian length
        penalty sigma 6, candidate counts clipped to the reference's, n = 1..4, times 10), so about
        0..10, above 1 for good models. Its IDF weights come from the references of the evaluated
        set itself: the score depends on the whole set, and with a single image every n-gram has
        IDF log(1) - log(1) = 0, so CIDEr-D is 0 whatever the caption. Report it on tens of images
        or more.
        ``exact_match``: fraction of predictions equal to one of their references after the same
        normalisation (lowercase, punctuation removed, single spaces).

    Raises:
        ValueError: If the lists are empty or of different lengths, or an image has no non-empty
            reference.
    """
    _check_pairs(predictions, references)
    # Imported here: pycocoevalcap pulls in numpy, and importing mmdemo must stay cheap.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res, gts = {}, {}
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        res[i] = [_tokenize_caption(prediction)]
        # An empty reference would let an empty prediction "match" it under ROUGE-L.
        gts[i] = [tokens for tokens in map(_tokenize_caption, refs) if tokens]
        if not gts[i]:
            raise ValueError(f"Image {i} has no non-empty reference caption; give it at least one.")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 (the default) prints
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    exact = [res[i][0] in gts[i] for i in res]
    # float(): numpy scalars do not serialise into metrics.jsonl
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider),
            "exact_match": sum(exact) / len(exact)}


# --- VQA ---------------------------------------------------------------------------------------

# The tables below are copied from the official vqaEval.py (GT-Vision-Lab/VQA, Python 3 version),
# quirks included ("somebody'd" -> "somebodyd", capitalised keys that never match lowercased text),
# so scores are comparable with published VQA accuracies.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
# Official pattern kept verbatim: "(?!<=\d)" is a typo for a lookbehind and never fires, so every
# period not followed by a digit goes ("3.5" survives, "3." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """Normalises a VQA answer exactly like the official VQA evaluation (vqaEval.py).

    Punctuation is deleted when it touches a space (or the answer holds a number such as "1,000")
    and replaced by a space otherwise; periods not followed by a digit are removed; the text is
    lowercased; number words up to ten become digits ("none" -> "0"); articles are dropped; and
    apostrophe-less contractions are repaired ("dont" -> "don't").

    Args:
        text: A raw answer, predicted or human.

    Returns:
        The normalised answer, words joined by single spaces, e.g. "Two dogs." -> "2 dogs".
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # processPunctuation: the test is made on the input text, not the text being edited (official).
    original, delete = text, _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        gone = delete or p + " " in original or " " + p in original
        text = text.replace(p, "" if gone else " ")
    text = _PERIOD_STRIP.sub("", text)
    # processDigitArticle
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one normalised prediction against normalised human answers."""
    if len(answers) < 10:
        # Too few humans for the leave-one-out average (with one answer it would always be 0). The 3
        # means "enough humans agree"; a dataset with 1 or 2 answers per question cannot have 3, so
        # there agreeing with all of them is full credit (one answer: VQA accuracy = exact match).
        return min(answers.count(prediction) / min(3, len(answers)), 1.0)
    # Official: average min(#matches among the other answers / 3, 1) over leaving each answer out.
    return sum(min((answers[:i] + answers[i + 1:]).count(prediction) / 3, 1.0)
               for i in range(len(answers))) / len(answers)


def vqa_metrics(predictions: list[str], answers: list[list[str]]) -> dict:
    """Scores predicted answers with the official VQA accuracy.

    Predictions and human answers both go through `normalize_answer`. (The official script
    normalises only the prediction, as the VQA annotation files ship answers already normalised;
    user data is raw, so here both sides are.)

    Args:
        predictions: One predicted answer per question.
        answers: For each question, the human answers (10 in VQA v2; any number >= 1 here).

    Returns:
        A dict of floats in [0, 1] (the official script reports 100x these):
        ``vqa_accuracy``: mean over questions of min(#humans who gave the prediction / 3, 1); with
        10 or more answers, averaged over the subsets that leave one human answer out, as the
        official evaluation does (e.g. 2 of 10 humans agreeing -> 0.6, not 2/3). With fewer than 3
        answers the 3 becomes their number: a question with a single answer (most user datasets)
        scores 1 for a match, where the literal formula would cap every model at 1/3.
        ``exact_match``: fraction of questions whose prediction equals the most common human
        answer (ties go to the answer listed first).

    Raises:
        ValueError: If the lists are empty or of different lengths, or a question has no answers.
    """
    _check_pairs(predictions, answers)
    accuracy, exact = [], []
    for i, (prediction, refs) in enumerate(zip(predictions, answers)):
        if not refs:
            raise ValueError(f"Question {i} has no reference answers; give it at least one.")
        prediction, refs = normalize_answer(prediction), [normalize_answer(a) for a in refs]
        accuracy.append(_vqa_accuracy(prediction, refs))
        exact.append(prediction == Counter(refs).most_common(1)[0][0])
    return {"vqa_accuracy": sum(accuracy) / len(accuracy), "exact_match": sum(exact) / len(exact)}


def _check_pairs(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise ValueError("No predictions to score; evaluate on at least one example.")
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists; "
                         "give one list of references per prediction.")
    if any(isinstance(refs, str) for refs in references):
        # A bare string would be scored character by character without any error.
        raise ValueError("Each entry of references must be a list of strings, not a string.")


# --- image-text retrieval ------------------------------------------------------------------------

RECALL_KS = (1, 5, 10)


def retrieval_metrics(similarity, image_captions: list[list[str]], texts: list[str], ks=RECALL_KS) -> dict:
    """Recall@k in both directions and the median rank, the standard way: a query is a hit at k when any
    of its true matches is among its k best-scored candidates.

    Args:
        similarity: images x texts scores (anything ``numpy.asarray`` takes); higher is closer.
        image_captions: each image's true captions.
        texts: the caption of each column. Columns with the same text are one candidate (and one query):
            a caption shared by several images ("a red circle") is a true match of each of them, never a
            wrong answer for one, and it is counted once as a text query.

    Returns:
        ``i2t_recall@k`` (image -> text) and ``t2i_recall@k`` (text -> image) per k, ``i2t_median_rank``,
        ``t2i_median_rank`` (1 = the first candidate is a true match) and ``mean_recall`` (their mean).
        A tie with a wrong candidate counts against the query.
    """
    import numpy as np

    sim = np.asarray(similarity, dtype=np.float64)
    first = list(dict.fromkeys(texts))
    columns = [texts.index(t) for t in first]
    sim = sim[:, columns].reshape(len(image_captions), len(first))
    true = np.array([[t in set(caps) for t in first] for caps in image_captions], dtype=bool).reshape(sim.shape)
    out = {}
    for name, scores, matches in (("i2t", sim, true), ("t2i", sim.T, true.T)):
        queries = matches.any(1)  # a query without a true match (a text of no image here) is not ranked
        scores, matches = scores[queries], matches[queries]
        best = np.where(matches, scores, -np.inf).max(1, initial=-np.inf)
        ranks = 1 + (np.where(matches, -np.inf, scores) >= best[:, None]).sum(1)
        for k in ks:
            out[f"{name}_recall@{k}"] = float((ranks <= k).mean()) if len(ranks) else 0.0
        out[f"{name}_median_rank"] = float(np.median(ranks)) if len(ranks) else 0.0
    recalls = [v for k, v in out.items() if "recall@" in k]
    out["mean_recall"] = float(sum(recalls) / len(recalls))
    return out
