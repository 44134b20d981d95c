from tally import tally


def test_counts_each_word_once_per_occurrence():
    assert tally("the cat and the hat") == {"the": 2, "cat": 1, "and": 1, "hat": 1}


def test_is_case_blind():
    assert tally("Go go GO") == {"go": 3}


def test_empty_text_has_no_words():
    assert tally("") == {}
