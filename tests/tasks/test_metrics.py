"""LongBench metrics against hand-computed values (Bai et al. 2023, arXiv 2308.14508)."""

from __future__ import annotations

import pytest

from capkv.tasks.longbench import DATASETS
from capkv.tasks.longbench.metrics import (
    DATASET_METRIC,
    METRICS,
    best_score,
    bind_metric,
    classification_score,
    code_sim_score,
    count_score,
    first_line,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score_prediction,
)

CLASSES = ["Date", "Date of birth", "City", "Country"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # lower -> "the cat, and a dog!"; no punctuation -> "the cat and a dog";
        # articles -> " cat and   dog"; whitespace -> "cat and dog"
        ("The Cat, and a DOG!", "cat and dog"),
        # punctuation goes before articles: "an apple's" -> "an apples" -> "apples"
        ("  an apple's  ", "apples"),
        # articles only as whole words: "Theatre" and "Another" stay
        ("Theatre Another", "theatre another"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_first_line_strips_leading_newlines_only() -> None:
    assert first_line("\n\nCity\nCountry") == "City"
    assert first_line("  City \nx") == "  City "


def test_qa_f1_partial_overlap() -> None:
    # "eiffel tower in paris" (4 tokens) vs "eiffel tower" (2): overlap 2,
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert qa_f1_score("The Eiffel Tower in Paris.", "Eiffel Tower") == pytest.approx(2 / 3)


def test_qa_f1_counts_repeated_tokens_once_per_match() -> None:
    # ["paris", "paris"] vs ["paris"]: multiset overlap min(2, 1) = 1, P = 1/2, R = 1, F1 = 2/3
    assert qa_f1_score("Paris paris", "Paris") == pytest.approx(2 / 3)


def test_qa_f1_exact_and_disjoint() -> None:
    assert qa_f1_score("the Black Sea", "Black sea!") == 1.0
    assert qa_f1_score("Danube", "Black Sea") == 0.0
    assert qa_f1_score("", "Black Sea") == 0.0


def test_rouge_l_single_sentence() -> None:
    # distinct words: n = 5 (prediction), m = 5 (reference); LCS "cat on mat" = 3 words,
    # P = R = 3/5, F = 2 * 0.36 / 1.2 = 0.6
    assert rouge_score("a cat sat on mat", "the cat lay on mat") == pytest.approx(0.6)


def test_rouge_l_counts_distinct_words() -> None:
    # the rouge package counts words as sets: n = |{cat}| = 1, m = 1, LCS words {cat}: F = 1
    # (a plain token ROUGE-L would give P = 1/3, F = 0.5)
    assert rouge_score("cat cat cat", "cat") == pytest.approx(1.0)


def test_rouge_l_is_summary_level_over_sentences() -> None:
    # sentences split on ".": the union of the per-sentence LCS words is {cat, sat, dog, ran},
    # n = m = 4, F = 1 (the LCS of the whole token sequences would be 2 of 4, F = 0.5)
    assert rouge_score("cat sat. dog ran", "dog ran. cat sat") == pytest.approx(1.0)


def test_rouge_l_breaks_lcs_ties_like_the_package() -> None:
    # reference sentences "a b" and "b", prediction "b a". LCS("a b", "b a") has length 1 and the
    # package's back-trace picks "b" (it steps back in the reference only on a strict gain);
    # LCS("b", "b a") = "b". Union {b}: P = 1/2, R = 1/2, F = 0.5 (picking "a" would give 1).
    assert rouge_score("b a", "a b. b") == pytest.approx(0.5)


def test_rouge_l_is_case_sensitive_and_zero_when_empty() -> None:
    assert rouge_score("Cat", "cat") == 0.0
    assert rouge_score("", "cat") == 0.0
    assert rouge_score("...", "cat") == 0.0


def test_classification_single_and_shared_matches() -> None:
    assert classification_score("City", "City", CLASSES) == 1.0
    # two class names in the prediction, one right: 1/2
    assert classification_score("City or Country", "City", CLASSES) == 0.5
    assert classification_score("Country", "City", CLASSES) == 0.0


def test_classification_drops_proper_substrings_of_the_truth() -> None:
    # matches ["Date", "Date of birth"]; "Date" is a proper substring of the truth: dropped -> 1
    assert classification_score("Date of birth", "Date of birth", CLASSES) == 1.0
    # the rule only looks at the truth: "Date of birth" is not inside "Date", both kept -> 1/2
    assert classification_score("Date of birth", "Date", CLASSES) == 0.5


def test_classification_keeps_the_match_after_a_dropped_one() -> None:
    # official loop removes from the list it iterates: after dropping "Date", "Date of" is
    # skipped (kept) although it is also a proper substring of the truth -> 1/2, not 1
    classes = ["Date", "Date of", "Date of birth"]
    assert classification_score("Date of birth", "Date of birth", classes) == 0.5


def test_retrieval_share_of_right_numbers() -> None:
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    # numbers [3, 12], one right: 1/2
    assert retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    # whole numbers only: "12" is not "1"
    assert retrieval_score("Paragraph 12", "Paragraph 1") == 0.0
    assert retrieval_score("I do not know", "Paragraph 1") == 0.0


def test_retrieval_needs_a_paragraph_reference() -> None:
    with pytest.raises(ValueError, match="Paragraph 3"):
        retrieval_score("Paragraph 1", "the first one")


def test_count_share_of_right_numbers() -> None:
    assert count_score("3", "3") == 1.0
    # numbers [3, 5], one right: 1/2
    assert count_score("There are 3 unique paragraphs out of 5.", "3") == 0.5
    assert count_score("several", "3") == 0.0


def test_code_sim_takes_first_line_without_markup() -> None:
    # lines "```python", "# add one", "return x + 1": the first without ` # // is the code
    prediction = "\n```python\n# add one\nreturn x + 1\n```"
    assert code_sim_score(prediction, "return x + 1") == 1.0
    assert code_sim_score("// comment\nreturn count;", "return count;") == 1.0


def test_code_sim_ratio_is_rounded_difflib_ratio() -> None:
    # "abcd" vs "abce": matching block "abc", ratio = 2 * 3 / 8 = 0.75
    assert code_sim_score("abcd", "abce") == 0.75
    # "abc" vs "abd": 2 * 2 / 6 = 0.666.. -> round(66.67) / 100 = 0.67
    assert code_sim_score("abc", "abd") == 0.67


def test_code_sim_empty_and_equal_strings() -> None:
    # no line without markup: the prediction is "", and fuzz.ratio("", x) = 0
    assert code_sim_score("# only a comment", "x = 1") == 0.0
    # fuzz.ratio checks equality before emptiness: ratio("", "") = 100
    assert code_sim_score("", "") == 1.0


def test_first_line_rule_applies_to_few_shot_datasets() -> None:
    # trec keeps "City" only: one match, right -> 1 (the whole text would give 1/2)
    assert score_prediction("trec", "\nCity\nCountry", ["City"], CLASSES) == 1.0
    assert score_prediction("triviaqa", "Black Sea\nQuestion: next?", ["Black Sea"]) == 1.0
    # samsum: ROUGE-L on "cat sat" only, F = 1
    assert score_prediction("samsum", "cat sat\nDialogue: more", ["cat sat"]) == pytest.approx(1)


def test_other_datasets_score_the_whole_prediction() -> None:
    # narrativeqa: tokens [paris, france] vs [paris]: P = 1/2, R = 1, F1 = 2/3
    assert score_prediction("narrativeqa", "Paris\nFrance", ["Paris"]) == pytest.approx(2 / 3)


def test_score_is_max_over_answers() -> None:
    # "tower in paris" vs "eiffel tower": overlap 1, P = 1/3, R = 1/2, F1 = (1/3) / (5/6) = 0.4;
    # vs "the tower in Paris": F1 = 1; max = 1
    answers = ["Eiffel Tower", "the tower in Paris"]
    assert qa_f1_score("tower in paris", answers[0]) == pytest.approx(0.4)
    assert score_prediction("narrativeqa", "tower in paris", answers) == 1.0
    assert best_score(qa_f1_score, "tower in paris", []) == 0.0


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="narrativeqa"):
        score_prediction("dureader", "x", ["x"])


def test_classification_without_classes_is_rejected() -> None:
    with pytest.raises(ValueError, match="all_classes"):
        bind_metric(classification_score, None)


def test_dataset_metric_covers_the_16_english_datasets() -> None:
    assert set(DATASET_METRIC) == set(DATASETS)
    assert len(DATASET_METRIC) == 16
    assert set(DATASET_METRIC.values()) == set(METRICS.values())
