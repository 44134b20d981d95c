"""Counts words: a tiny package for examples/python."""


def tally(text):
    """The number of times each word occurs in text, lower-cased."""
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts
