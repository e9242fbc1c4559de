"""A1111's prompt grammar (sdxl_ui/prompt_syntax.py), checked on A1111's own documented examples: the doctests of
``parse_prompt_attention`` and ``get_learned_conditioning_prompt_schedules`` in its modules/prompt_parser.py."""
from __future__ import annotations

import pytest

from sdxl_ui.prompt_syntax import BREAK, Fragment, parse, parse_attention, schedule

ATTENTION = [  # A1111's doctests: (prompt, [[text, weight], …])
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]

SCHEDULES = [  # A1111's doctests at 10 steps: (prompt, [[last step, text], …])
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", ATTENTION)
def test_emphasis_as_a1111_documents_it(prompt, expected):
    assert [[f.text, f.weight] for f in parse_attention(prompt)] == expected


@pytest.mark.parametrize("prompt, expected", SCHEDULES)
def test_prompt_editing_and_alternation_as_a1111_documents_them(prompt, expected):
    assert [list(step) for step in schedule(prompt, 10)] == expected


def test_a_prompt_the_grammar_cannot_read_is_one_text_as_written():
    # A1111's doctest for "a [{b|d{:.5] c" is marked "not handling this right now" there; here it is kept as
    # written for every step (what A1111 does with any prompt its grammar refuses).
    assert schedule("a [{b|d{:.5] c", 10) == ((10, "a [{b|d{:.5] c"),)


def test_break_is_its_own_fragment_and_only_as_an_upper_case_word():
    assert parse_attention("a cat BREAK a dog") == (Fragment("a cat"), Fragment(BREAK, -1.0, True),
                                                    Fragment("a dog"))
    assert parse_attention("a breakfast, break") == (Fragment("a breakfast, break"),)
    assert parse("a cat BREAK a dog", 20).breaks == 1 and parse("a cat BREAK a dog", 20).plain is None


def test_parsed_once_into_a_typed_result():
    plain = parse("(a red house:1.0) on a hill", 20)
    assert plain.plain == "a red house on a hill" and not plain.scheduled and plain.weights == ()
    weighted = parse("a (red:1.3) house, [blue] sky", 20)
    assert weighted.plain is None and weighted.weights == (1 / 1.1, 1.3)
    edited = parse("a [red:blue:0.5] house", 20)
    assert edited.scheduled and [p.until for p in edited.phases] == [10, 20]
    assert [p.plain for p in edited.phases] == ["a red house", "a blue house"]
    assert edited.phase_at(1).plain == "a red house" and edited.phase_at(10).plain == "a red house"
    assert edited.phase_at(11).plain == "a blue house" and edited.phase_at(99) is edited.phases[-1]
    alternating = parse("a [cat|dog]", 4)
    assert [p.plain for p in alternating.phases] == ["a cat", "a dog", "a cat", "a dog"]
    assert parse("a [cat|cat]", 4).phases == (parse("a cat", 4).phases[0].__class__(4, "a cat",
                                                                                       parse_attention("a cat")),)
