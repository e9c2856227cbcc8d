"""The story script: one line per panel.

    [Mia] running through the rain, laughing "Wait for me!" # The storm broke at noon.
    [NC] an empty street at night, neon signs # caption "Meanwhile..."

* ``[Name]`` starts a panel with that (accepted) character; ``[NC]`` is a panel with no character.
* Text in double quotes ("..." or “...”) is speech: it becomes a speech bubble and is left out of the prompt.
  ``\\"`` is a literal quote inside speech.
* Text after ``#`` (outside quotes) is the caption; a leading ``caption`` word and surrounding quotes are optional.
* Blank lines and lines starting with ``//`` are ignored.

``parse_script`` checks everything before any generation starts and reports every problem with its line and column
and what was expected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MAX_PANELS = 200
MAX_LINE_CHARS = 600
MAX_SCRIPT_CHARS = 100_000
NO_CHARACTER = "NC"
OPEN_QUOTES, CLOSE_QUOTES = ('"', "\u201c"), {'"': '"', "\u201c": "\u201d"}


@dataclass(frozen=True)
class ScriptError:
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message}"


class ScriptErrors(ValueError):
    """All the problems of a script (a ValueError, so callers show the message)."""

    def __init__(self, errors: list[ScriptError]):
        self.errors = errors
        shown = "\n".join(str(e) for e in errors[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"the script has {len(errors)} problem{'s' * (len(errors) != 1)}:\n{shown}{more}")


@dataclass
class PanelSpec:
    index: int  # 0-based panel number
    line: int  # 1-based script line
    character: str | None  # the character's name as defined in the story, None for [NC]
    prompt: str
    speech: list[str] = field(default_factory=list)
    caption: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _clean_caption(text: str) -> str:
    text = text.strip()
    if text.lower().startswith("caption"):
        rest = text[len("caption"):]
        if not rest or rest[0] in " :\t\"\u201c":
            text = rest.lstrip(" :\t")
    if len(text) >= 2 and text[0] in OPEN_QUOTES and text[-1] == CLOSE_QUOTES[text[0]]:
        text = text[1:-1]
    return text.strip()


def _parse_line(text: str, line_no: int, names: dict[str, str], errors: list[ScriptError], index: int):
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        errors.append(ScriptError(line_no, start + 1,
                                  "expected a [Character] tag or [NC] at the start of the panel"))
        return None
    close = text.find("]", start)
    if close < 0:
        errors.append(ScriptError(line_no, start + 1, "unclosed [: expected ] after the character name"))
        return None
    tag = text[start + 1:close].strip()
    if not tag:
        errors.append(ScriptError(line_no, start + 2, "empty [ ]: expected a character name or NC"))
        return None
    if "," in tag:
        errors.append(ScriptError(line_no, start + 2, "one character per panel: split the panel into two lines"))
        return None
    character = None
    if tag.upper() != NO_CHARACTER:
        character = tag if names is None else names.get(tag.casefold())
        if character is None:
            known = ", ".join(sorted(names.values()) + [NO_CHARACTER])
            errors.append(ScriptError(line_no, start + 2, f'unknown character "{tag}": expected one of {known} '
                                      "(add and accept the character first)"))
            return None
    prompt, speech, caption = [], [], None
    i = close + 1
    while i < len(text):
        ch = text[i]
        if ch in OPEN_QUOTES:
            end_quote = CLOSE_QUOTES[ch]
            j, buf = i + 1, []
            while j < len(text) and not (text[j] == end_quote and text[j - 1] != "\\"):
                buf.append(text[j])
                j += 1
            if j >= len(text):
                errors.append(ScriptError(line_no, i + 1, f"unclosed quote: add a closing {end_quote}"))
                return None
            said = "".join(buf).replace('\\"', '"').strip()
            if said:
                speech.append(said)
            i = j + 1
            continue
        if ch == "#":
            caption = _clean_caption(text[i + 1:]) or None
            break
        prompt.append(ch)
        i += 1
    prompt_text = " ".join("".join(prompt).split()).strip(" ,")
    if not prompt_text:
        errors.append(ScriptError(line_no, close + 2, f"empty panel: write what the panel shows after [{tag}]"))
        return None
    return PanelSpec(index=index, line=line_no, character=character, prompt=prompt_text, speech=speech,
                     caption=caption)


def parse_script(text: str, characters) -> list[PanelSpec]:
    """Panels of ``text`` for the story's ``characters`` (names; None accepts any name, for captions and bubbles
    only); raises ScriptErrors listing every problem."""
    if not isinstance(text, str):
        raise ScriptErrors([ScriptError(1, 1, "the script must be text")])
    if len(text) > MAX_SCRIPT_CHARS:
        raise ScriptErrors([ScriptError(1, 1, f"the script has {len(text)} characters; keep it under "
                                              f"{MAX_SCRIPT_CHARS} (split the story into chapters)")])
    names = None if characters is None else {name.casefold(): name for name in characters}
    errors: list[ScriptError] = []
    panels: list[PanelSpec] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if len(line) > MAX_LINE_CHARS:
            errors.append(ScriptError(line_no, MAX_LINE_CHARS + 1,
                                      f"line too long ({len(line)} characters): keep a panel under {MAX_LINE_CHARS}"))
            continue
        if len(panels) + len(errors) >= MAX_PANELS:
            errors.append(ScriptError(line_no, 1, f"too many panels: at most {MAX_PANELS} per story"))
            break
        panel = _parse_line(line, line_no, names, errors, len(panels))
        if panel is not None:
            panels.append(panel)
    if not panels and not errors:
        errors.append(ScriptError(1, 1, "the script is empty: write one line per panel, e.g. [Mia] waving hello"))
    if errors:
        raise ScriptErrors(errors)
    return panels
