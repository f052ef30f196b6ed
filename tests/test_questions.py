"""questions.py: the questions, the split and the checker."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import questions


def test_every_right_sentence_is_right_and_every_wrong_one_wrong():
    """The checker against the sentences the generator of questions wrote itself, for all of them."""
    every = questions.questions(0)
    assert set(every) == set(questions.FAMILIES) and all(len(qs) >= 28 for qs in every.values())
    for qs in every.values():
        for q in qs:
            assert questions.is_right(q, q.right), q
            assert not questions.is_right(q, q.wrong), q
            assert not questions.is_right(q, q.dodge), q
            assert q.right != q.wrong and questions.INSTRUCTION in q.prompt


@pytest.mark.parametrize("family, answer, response, right", [
    ("add", "12", "5 plus 7 is 12.", True),
    ("add", "12", "The answer is twelve.", True),
    ("add", "12", "5 + 7 = 13", False),
    ("add", "12", "To find 5 plus 7, we add them: 5 + 7 = 12, so twelve", True),
    ("add", "12", "I don't know.", False),
    ("add", "12", "", False),
    ("units", "1000", "There are 1,000 grams in a kilogram.", True),
    ("subtract", "5", "10 minus 5 is 5.", True),   # a question's number that is also the answer counts
    ("subtract", "5", "10 minus 5 is 4.", False),
    ("subtract", "5", "10 minus 5 is 10.", False),  # the question restated, then a wrong number of it
    ("subtract", "5", "10 - 5 = 5", True),
    ("subtract", "5", "10 - 5 = 5, so 5 + 5 = 10", True),
    ("add", "16", "7 plus 9 is 7 plus 9.", False),
    ("add", "16", "9 + 7 = 16", True),
    ("units", "200", "There are 200 centimeters in 2 meters.", True),
    ("units", "3000", "Multiply 3 by 1000: 3 kilograms are 3000 grams.", True),
    ("units", "3000", "Multiply 3 by 1000, which is 300 grams.", False),
    ("units", "42", "It is forty-two.", True),
    ("capital", "Bogota", "The capital of Colombia is Bogotá.", True),
    ("capital", "Paris", "Paris, not Rome.", True),
    ("capital", "Paris", "Rome, not Paris.", False),
    ("capital", "Paris", "The capital of France is Lyon.", False),
    ("antonym", "short", "The opposite of long is short.", True),   # "short" is also in INSTRUCTION
    ("antonym", "short", "The opposite of long is brief.", False),
    ("weekday", "Tuesday", "The day after Monday is Tuesday.", True),  # the question's own day is not an answer
    ("weekday", "Tuesday", "The day after Monday is Wednesday, not Tuesday.", False),
])
def test_checker_on_written_out_cases(family, answer, response, right):
    asked = {("units", "1000"): "How many grams are in a kilogram?", ("units", "42"): "How many?"}
    wanted = {("units", "3000"): "kilograms", ("units", "200"): "centimeters", ("subtract", "5"): "10 minus",
              ("add", "16"): "7 plus 9"}
    if (family, answer) in asked:
        q = questions.Question(family, f"{asked[family, answer]} {questions.INSTRUCTION}", answer, "", "")
    else:
        q = next(q for q in questions.questions(0)[family] if q.answer == answer and wanted.get((family, answer), "") in q.prompt)
    assert questions.is_right(q, response) is right


# The rule: an answer is right when it commits to the right answer and to nothing else (questions.is_right).
COMMITS = [  # (family, question's operands or key, response, right)
    # the question restated in words is taken out, as in digits
    ("subtract", "12 minus 6", "Twelve minus six is twelve.", False),
    ("subtract", "12 minus 6", "Twelve minus six is six.", True),
    ("subtract", "12 minus 6", "twelve minus six equals 6", True),
    # a minus sign makes a number negative; between two numbers it is subtraction
    ("subtract", "12 minus 6", "The answer is -6.", False),
    ("subtract", "12 minus 6", "The answer is \u22126.", False),
    ("subtract", "12 minus 6", "12 -6 = 6", True),
    ("subtract", "12 minus 6", "12-6=6", True),
    # denial: "not X" commits against X
    ("add", "5 plus 7", "5 plus 7 is 13, not 12.", False),
    ("add", "5 plus 7", "5 plus 7 is 12, not 13.", True),
    ("add", "5 plus 7", "It isn't 12.", False),
    ("add", "5 plus 7", "The answer is not 12 but 13.", False),
    ("add", "5 plus 7", "It is 12 rather than 13.", True),
    ("add", "5 plus 7", "12, never 11.", True),
    # hedges: two answers are no answer
    ("add", "5 plus 7", "It is 11 or 12.", False),
    ("add", "5 plus 7", "Either 12 or 13.", False),
    ("add", "5 plus 7", "It is 12. Or maybe 13.", False),
    ("add", "5 plus 7", 'It is "11" or "12".', False),
    ("add", "5 plus 7", 'It is "12" or "13".', False),
    ("add", "5 plus 7", "It is **12** or **13**.", False),
    ("antonym", "hard", 'The opposite of "hard" is "soft" or "soft" (in the opposite', False),
    ("antonym", "visible", 'The opposite of "visible" is "invisible" or "non-visible".', False),
    ("antonym", "hard", 'The opposite of "hard" is "soft," which is easy.', True),
    ("capital", "France", "The capital of France is Paris.\nThe answer is:\nThe capital of France is Paris.", True),
    # numbers in words and digit groups
    ("units", "2 meters", "There are two hundred centimeters in 2 meters.", True),
    ("units", "2 meters", "There are 200 centimeters in two meters.", True),
    ("units", "10 kilometers", "There are 10 000 meters in 10 kilometers.", True),
    ("units", "10 kilometers", "There are 10,000 meters in 10 kilometers.", True),
    ("units", "10 kilometers", "There are ten thousand meters in ten kilometers.", True),
    ("units", "10 kilometers", "There are 1000 meters in 10 kilometers.", False),
    ("multiply", "9 times 8", "9 times 8 is seventy-two.", True),
    ("multiply", "9 times 8", "Nine times eight is seventy two.", True),
    ("multiply", "9 times 8", "8 times 9 is 72.", True),
    ("multiply", "9 times 8", "9 x 8 = 63", False),
    # "one" as a pronoun is not a number
    ("add", "5 plus 7", "The answer is 12. That one was easy!", True),
    ("add", "5 plus 7", "The answer is 12, the one you wanted.", True),
    ("add", "5 plus 7", "One answer: 12.", True),
    # the prompt echoed back is no answer: its instruction's "one" is not 1, nor its "short" an antonym
    ("subtract", "10 minus 9", "What is 10 minus 9? Answer in one short sentence.", False),
    ("subtract", "10 minus 9", "What is 10 minus 9? Answer in one short sentence. mendatang\nWhat is 10", False),
    ("subtract", "10 minus 9", "answer in one short sentence: ten minus nine is one", True),
    ("subtract", "10 minus 9", "What is 10 minus 9? Answer in one short sentence. It is one.", True),
    ("antonym", "long", "What is the opposite of long? Answer in one short sentence.", False),
    ("antonym", "long", 'What is the opposite of "long"? Answer in one short sentence. Short.', True),
    # a question asked back commits to nothing, whatever it names
    ("antonym", "inside", 'What is the opposite of "outside"? Answer in one short sentence.', False),
    ("capital", "France", "Is it Paris?", False),
    ("capital", "France", "Is it Rome? No, it is Paris.", True),
    ("add", "5 plus 7", "Is it 12?", False),
    ("add", "5 plus 7", "What is 5 plus 7? It is 12.", True),
    # working before the claim
    ("add", "5 plus 7", "Add 5 and 7 to get 12.", True),
    ("add", "5 plus 7", "5 + 7 = 12", True),
    ("add", "5 plus 7", "5 + 7 = 12. So the answer is 13.", False),
    # a term of an operation is working, not a claim: a loop that repeats the answer commits to nothing
    ("subtract", "12 minus 6", "12 minus 6 minus 6 minus 6 minus 6 minus 6", False),
    ("subtract", "12 minus 6", "12 - 6 - 6 - 6", False),
    ("subtract", "12 minus 6", "12 minus 6 minus 6 = 0, so 12 minus 6 is 6.", True),
    ("multiply", "9 times 8", "72 times 1", False),
    ("multiply", "9 times 8", "9 x 8 = 72 x 1 = 72", True),
    ("multiply", "9 times 8", "9\u00d78=72", True),
    ("add", "5 plus 7", "5 plus 7 is 12 plus 0.", False),
    ("add", "5 plus 7", "12 + 0", False),
    ("units", "2 meters", "2 x 100 = 200 centimeters.", True),
    # words: denied, alternatives, the only one named
    ("capital", "France", "It is not Paris.", False),
    ("capital", "Australia", "Sydney, not Canberra.", False),
    ("capital", "Australia", "Canberra, not Sydney.", True),
    ("capital", "France", "Paris or Rome.", False),
    ("capital", "France", "Paris, and Rome is the capital of Italy.", False),
    ("capital", "France", "Paris is the capital of France.", True),
    ("capital", "France", "The capital isn't Rome; it is Paris.", True),
    ("antonym", "hot", "The opposite of hot is cold.", True),
    ("antonym", "hot", "The opposite of hot is not cold.", False),
    ("antonym", "hot", "Cold or warm.", False),
    ("weekday", "the day after Monday", "The day after Monday is Tuesday.", True),
    ("weekday", "the day after Monday", "Tuesday, not Wednesday.", True),
    ("weekday", "the day after Monday", "It is Tuesday or Wednesday.", False),
    ("weekday", "the day after Monday", "Monday.", False),
]


@pytest.mark.parametrize("family, key, response, right", [c for c in COMMITS if c[3] is not None])
def test_an_answer_is_right_when_it_commits_to_the_answer_and_nothing_else(family, key, response, right):
    every = questions.questions(0)[family]
    q = next(q for q in every if re.search(r"\b" + re.escape(key) + r"\b", q.prompt.replace('"', "")))
    assert questions.is_right(q, response) is right, (q.prompt, q.answer)


@given(st.integers(0, 999999))
def test_numbers_in_words_and_groups_read_as_their_value(n):
    """The reader of numbers against the number itself, written in digits, in groups and in words."""
    def words(x):
        if x < 20:
            return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"][x]
        if x < 100:
            tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"][x // 10]
            return tens + ("-" + words(x % 10) if x % 10 else "")
        if x < 1000:
            return words(x // 100) + " hundred" + (" and " + words(x % 100) if x % 100 else "")
        return words(x // 1000) + " thousand" + (" " + words(x % 1000) if x % 1000 else "")
    for text in (str(n), f"{n:,}", f"{n:,}".replace(",", " "), words(n)):
        assert questions.numbers_in(f"The answer is {text}.") == [float(n)], text


def test_split_shares_no_question_and_is_the_same_every_time():
    every = questions.questions(0)
    train, held = questions.split(every)
    assert questions.split(questions.questions(0)) == (train, held)
    for f, qs in every.items():
        assert not {q.prompt for q in train[f]} & {q.prompt for q in held[f]}
        assert sorted(q.prompt for q in train[f] + held[f]) == sorted(q.prompt for q in qs)
        assert round(0.4 * len(qs)) <= len(held[f]) <= round(0.4 * len(qs)) + 1  # whole pairs of twins
    # no held-out sum or product has its mirror in training ("7 plus 5" for "5 plus 7")
    for f in ("add", "add2", "multiply"):
        operands = [tuple(sorted(map(int, re.findall(r"\d+", q.prompt)))) for q in train[f]]
        for q in held[f]:
            assert tuple(sorted(map(int, re.findall(r"\d+", q.prompt)))) not in operands, q.prompt
    mirrors = [q for q in every["add"] if "7 plus 5" in q.prompt or "5 plus 7" in q.prompt]
    assert len(mirrors) == 2 and len({questions.twins(q) for q in mirrors}) == 1
    assert sum(len(h) for h in held.values()) >= 200
