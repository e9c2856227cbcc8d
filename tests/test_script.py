import pytest

from studio.script import MAX_PANELS, ScriptErrors, parse_script

CHARS = ["Mia", "Leo", "Kai", "Ann", "Old Tom"]


@pytest.mark.parametrize(
    "script, expected",
    [
        ('[Mia] running through the rain, laughing # caption "Wait for me!"',
         [("Mia", "running through the rain, laughing", [], "Wait for me!")]),
        ('[Mia] running through the rain "Wait for me!" # The storm broke.',
         [("Mia", "running through the rain", ["Wait for me!"], "The storm broke.")]),
        ("[NC] an empty street at night", [(None, "an empty street at night", [], None)]),
        ('[mia] waving "Hi!" "Over here!"', [("Mia", "waving", ["Hi!", "Over here!"], None)]),
        ('[Leo] shouting \u201cStop!\u201d', [("Leo", "shouting", ["Stop!"], None)]),
        ('[Leo] reading a sign "it says \\"closed\\""', [("Leo", "reading a sign", ['it says "closed"'], None)]),
        ('[Mia] a cafe "a # in speech" # cap', [("Mia", "a cafe", ["a # in speech"], "cap")]),
        ("// a comment\n\n[Mia] jumping\n  [NC]   clouds  ", [("Mia", "jumping", [], None), (None, "clouds", [], None)]),
        ("[Mia] sitting # caption: Later that day", [("Mia", "sitting", [], "Later that day")]),
    ],
)
def test_valid_scripts(script, expected):
    panels = parse_script(script, CHARS)
    assert [(p.character, p.prompt, p.speech, p.caption) for p in panels] == expected
    assert [p.index for p in panels] == list(range(len(expected)))


@pytest.mark.parametrize(
    "script, line, column, text",
    [
        ("[Max] running", 1, 2, 'unknown character "Max": expected one of Ann, Kai, Leo, Mia, Old Tom, NC'),
        ('[Mia] running "Wait for me!', 1, 15, 'unclosed quote: add a closing "'),
        ("[Mia]   ", 1, 6, "empty panel: write what the panel shows after [Mia]"),
        ('[Mia] "only speech"', 1, 6, "empty panel"),
        ("running in the rain", 1, 1, "expected a [Character] tag or [NC]"),
        ("[Mia running", 1, 1, "unclosed [: expected ]"),
        ("[] running", 1, 2, "empty [ ]"),
        ("[Mia, Leo] hugging", 1, 2, "one character per tag: write [Mia][Leo]"),
        ("[Mia][Leo][Kai][Ann] a crowd", 1, 16, "at most 3 characters per panel"),
        ("[Mia][mia] hugging", 1, 7, "Mia is tagged twice"),
        ("[Mia:top] x", 1, 5, 'unknown position "top": expected left, centre or right'),
        ("[Mia:left][Leo:left] x", 1, 12, "cannot both stand left"),
        ("[NC][Mia] x", 1, 2, "[NC] is a panel without characters"),
        ('[Mia] waving Leo: "Hi!"', 1, 19, "Leo speaks but is not in this panel: add [Leo] to its tags"),
        ("[Mia][Leo]  ", 1, 11, "empty panel: write what the panel shows after [Mia][Leo]"),
        ("[Mia] ok\n\n   [Bob] hi", 3, 5, 'unknown character "Bob"'),
        ("", 1, 1, "the script is empty"),
        ("[Mia] " + "x" * 700, 1, 601, "line too long"),
    ],
)
def test_invalid_scripts_report_line_column_and_expectation(script, line, column, text):
    with pytest.raises(ScriptErrors) as info:
        parse_script(script, CHARS)
    first = info.value.errors[0]
    assert (first.line, first.column) == (line, column) and text in first.message
    assert f"line {line}, column {column}" in str(info.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ScriptErrors) as info:
        parse_script("[Max] a\n[Mia] b\n[Mia] \"c\n[Zed] d", CHARS)
    assert [e.line for e in info.value.errors] == [1, 3, 4]


def test_thousands_of_lines_are_refused_quickly():
    with pytest.raises(ScriptErrors, match="too many panels"):
        parse_script("\n".join("[Mia] waving" for _ in range(5000)), CHARS)
    with pytest.raises(ScriptErrors, match="keep it under"):
        parse_script("[Mia] a\n" * 20000, CHARS)
    assert len(parse_script("\n".join("[Mia] waving" for _ in range(MAX_PANELS)), CHARS)) == MAX_PANELS


def test_group_panels_characters_positions_and_speakers():
    (panel,) = parse_script('[Mia] [Leo:right] talking on a bench mia: "Hi!" Leo : \u201cHello.\u201d "Nice day" # Noon', CHARS)
    assert panel.characters == ["Mia", "Leo"] and panel.positions == [None, "right"] and panel.character == "Mia"
    assert panel.prompt == "talking on a bench" and panel.caption == "Noon"
    assert panel.speech == ["Hi!", "Hello.", "Nice day"] and panel.speakers == ["Mia", "Leo", None]
    (three,) = parse_script('[Kai:centre][Ann][Old Tom:left] at a table Old Tom: "Tea?"', CHARS)
    assert three.characters == ["Kai", "Ann", "Old Tom"] and three.positions == ["centre", None, "left"]
    assert three.speakers == ["Old Tom"] and three.prompt == "at a table"
    # one character: every line is theirs; "word:" that is no character stays in the prompt
    (single,) = parse_script('[Mia] the sign reads: "OPEN"', CHARS)
    assert single.speakers == ["Mia"] and single.prompt == "the sign reads:"
    (nc,) = parse_script('[NC] a radio "static"', CHARS)
    assert nc.characters == [] and nc.speakers == [None] and nc.character is None
