"""Words with timings, and LocalAgreement-2: commit what two hypotheses agree on.

The same growing stretch of audio is decoded again and again while the speaker talks. The words
at its end change between decodes (the model has heard only part of them); the words a decode
begins with alike with the decode before it, or with the one before that, are stable and are
committed. Committed words are never sent again: later hypotheses are cut to what follows the
last committed word, by time and by text.
"""

from __future__ import annotations

from collections.abc import Sequence

from real_time_audio.service import Word

MATCH_TOLERANCE_S = 0.6  # two hypotheses agree on a word if its start moved less than this
OVERLAP_TOLERANCE_S = 0.1  # a word starting up to this much before the committed end may still be new
# A word that repeats the last committed word and starts no later than this after the committed end
# is that word heard again (a decode that starts at the committed end can catch its tail); one that
# starts later is the speaker saying it again.
REPEAT_SLACK_S = 0.03
MAX_OVERLAP_WORDS = 5
# A hypothesis confirms the words it begins with alike with any of the AGREEMENT_HISTORY before it
# (not only the last): a word the model hears one way, then another, then the first way again is
# settled as it heard it twice.
AGREEMENT_HISTORY = 2
RECENT_WORDS = 8
# Agreed words are committed a phrase at a time: up to the last one that ends a phrase (its
# punctuation has been seen with the words after it), or all of them once this many are waiting.
PHRASE_END = (",", ".", "?", "!", ";", ":")
ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "e.g.", "i.e."})
MAX_HELD_WORDS = 6
# An agreed word is committed only once this much audio after it has been heard (by default): until
# then the words that follow it (and its own punctuation) are still being decided.
SETTLE_AGE_S = 2.5
# A word the model was unsure of (a token below this probability) waits for UNSURE_SETTLE_FACTOR
# times as much: two early decodes that heard little after it can agree on the same wrong word
# ("the Criccorpus" for "the sick corpus"), which a decode that heard more reads right.
UNSURE_PROBABILITY = 0.2
UNSURE_SETTLE_FACTOR = 2.0


def unsure(word: Word) -> bool:
    """Whether the model was unsure of the word (one of its tokens scored under UNSURE_PROBABILITY)."""
    return word.probability < UNSURE_PROBABILITY


def _shared_start(old: Sequence[Word], new: Sequence[Word]) -> int:
    """How many words two hypotheses begin with alike (same word, start within the tolerance)."""
    count = 0
    for a, b in zip(old, new, strict=False):
        if a.key != b.key or abs(a.start - b.start) > MATCH_TOLERANCE_S:
            break
        count += 1
    return count


def join_words(words: Sequence[Word]) -> str:
    return " ".join(w.text for w in words)


def phrase_length(agreed: Sequence[Word]) -> int:
    """How many of the agreed words to commit now: whole phrases, or everything once too many wait.

    Committing phrase by phrase sends fewer, longer finals, and lets a word's case and punctuation
    settle with the words that follow it before it can no longer change.
    """
    if len(agreed) >= MAX_HELD_WORDS:
        return len(agreed)
    for index in range(len(agreed) - 1, -1, -1):
        text = agreed[index].text
        if text.endswith(PHRASE_END) and text.casefold() not in ABBREVIATIONS:  # "Mr." ends no phrase
            return index + 1
    return 0


class LocalAgreement:
    """The committed history and the unconfirmed tail of one stream of hypotheses."""

    def __init__(self, settle_age_s: float = SETTLE_AGE_S) -> None:
        self.settle_age_s = settle_age_s
        self.committed_end = 0.0  # end of the last committed word
        self._tail: list[Word] = []  # the latest hypothesis's words that are not committed
        self._earlier: list[list[Word]] = []  # the uncommitted words of the hypotheses before it
        self._recent: list[Word] = []  # the last committed words, to recognise a repeat of them

    @property
    def tail(self) -> list[Word]:
        """The latest hypothesis's words that are not committed."""
        return self._tail

    @tail.setter
    def tail(self, words: list[Word]) -> None:
        self._tail, self._earlier = words, []  # hypotheses from before this one no longer apply

    def fresh(self, words: Sequence[Word], after_prefix: bool = False) -> list[Word]:
        """The words of a hypothesis that come after everything committed.

        `after_prefix`: the decode was made to continue after the committed words, so none of its
        words is an old one heard again by time; only a repeat at the very boundary is checked.
        """
        new = list(words) if after_prefix else [w for w in words if w.start >= self.committed_end - OVERLAP_TOLERANCE_S]
        if new and self._recent and new[0].start <= self.committed_end + REPEAT_SLACK_S:
            # Of the ways to read the start as the last committed words heard again (the longest
            # first, or none), the one that agrees best with what the last hypothesis said follows
            # them: "words, words, words" after a committed "more words, words," is one word more
            # when the hypothesis before had two left, not the same two heard again.
            sizes = [
                size
                for size in range(min(MAX_OVERLAP_WORDS, len(new), len(self._recent)), 0, -1)
                if [w.key for w in self._recent[-size:]] == [w.key for w in new[:size]]
            ]
            if sizes:
                best = max([*sizes, 0], key=lambda size: _shared_start(self._tail, new[size:]))
                new = new[best:]
        return new

    def insert(self, words: Sequence[Word], after_prefix: bool = False, heard_until: float | None = None) -> list[Word]:
        """Take a new hypothesis; returns the words it confirms (now committed).

        `heard_until`: the end of the audio this hypothesis was decoded from. Only words ending
        `settle_age_s` before it may be committed: the model has heard what follows them.
        """
        new = self.fresh(words, after_prefix)
        limit = len(new) if heard_until is None else self._settled(new, heard_until)
        hypotheses = [self._tail, *self._earlier]
        agreements = [_shared_start(h, new) for h in hypotheses]
        count = phrase_length(new[: min(max(agreements), limit)])
        committed = new[:count]
        # The earlier hypotheses that began with the committed words stay, as what follows them.
        kept = [h[count:] for h, agreed in zip(hypotheses, agreements, strict=True) if agreed >= count]
        self._tail, self._earlier = new[count:], kept[: AGREEMENT_HISTORY - 1]
        self._commit(committed)
        return committed

    def commit_until(self, words: Sequence[Word], cutoff: float, after_prefix: bool = False) -> list[Word]:
        """Commit the new words that end before `cutoff` (the buffer is full; the rest waits)."""
        new = self.fresh(words, after_prefix)
        count = 0
        while count < len(new) and new[count].end <= cutoff:
            count += 1
        committed, self.tail = new[:count], []
        self._commit(committed)
        return committed

    def finish(
        self,
        words: Sequence[Word],
        after_prefix: bool = False,
        hold_from: float | None = None,
        heard_until: float | None = None,
    ) -> list[Word]:
        """The audio is over (end of utterance, flush or end of stream): commit every new word.

        `hold_from`: new words whose middle is at or after this time are not committed but kept as
        the tail (the utterance that just ended, waiting to hear whether the speaker goes on). The
        middle, not the start: Whisper often times the word on one side of a pause across all of
        it, and such a word belongs to the side it mostly lies on.

        `heard_until` (with `hold_from`): the end of the decoded audio. The words before the held
        ones that end `settle_age_s` before it are committed anyway, a phrase at a time, as
        agreed words of a partial that heard as much would be: what follows the pause decides
        only the words near it.
        """
        new = self.fresh(words, after_prefix)
        count = len(new)
        if hold_from is not None:
            while count and new[count - 1].start + new[count - 1].end >= 2 * hold_from:
                count -= 1
            if heard_until is not None:
                count = max(count, phrase_length(new[: self._settled(new, heard_until)]))
        committed, self.tail = new[:count], new[count:]
        self._commit(committed)
        return committed

    def _settled(self, words: Sequence[Word], heard_until: float) -> int:
        """How many of `words` end `settle_age_s` before `heard_until` (the end of the audio heard),
        or longer before it for a word the model was unsure of."""
        return next((i for i, w in enumerate(words) if w.end > heard_until - self.age(w)), len(words))

    def age(self, word: Word) -> float:
        """How much audio after `word` must have been heard before it may be committed."""
        return self.settle_age_s * (UNSURE_SETTLE_FACTOR if unsure(word) else 1.0)

    def settled_at(self, words: Sequence[Word]) -> float:
        """The end of the audio heard by which all of `words` are settled (each its age past it)."""
        return max((w.end + self.age(w) for w in words), default=0.0)

    def commit(self, words: list[Word]) -> None:
        """Commit words decided elsewhere (held words whose wait is over); the tail is dropped."""
        self.tail = []
        self._commit(words)

    def commit_head(self, count: int) -> list[Word]:
        """Commit the first `count` words of the tail as they stand; the rest stays the tail."""
        committed, self.tail = self.tail[:count], self.tail[count:]
        self._commit(committed)
        return committed

    def reset_tail(self) -> None:
        self.tail = []

    def _commit(self, words: list[Word]) -> None:
        if words:
            self.committed_end = max(self.committed_end, words[-1].end)
            self._recent = (self._recent + words)[-RECENT_WORDS:]
