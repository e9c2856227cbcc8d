"""The story script: one line per panel.

    [Mia] running through the rain, laughing "Wait for me!" # The storm broke at noon.
    [Mia][Kai:right] talking on a bench Mia: "Hi!" Kai: "Hello." # Noon
    [NC] an empty street at night, neon signs # caption "Meanwhile..."

* ``[Name]`` starts a panel with that (accepted) character; ``[NC]`` is a panel with no character.
* Up to three tags, ``[Mia][Kai]``, put several characters in one panel, left to right in the order written;
  ``[Kai:right]`` (``left``, ``centre``/``center``, ``right``) places one explicitly.
* Text in double quotes ("..." or “...”) is speech: it becomes a speech bubble and is left out of the prompt.
  ``Name:`` just before the quote gives it to that speaker (its bubble points at them); in a panel with one
  character the speech is theirs. ``\\"`` is a literal quote inside speech.
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


MAX_CHARACTERS_PER_PANEL = 3
# Where a character stands in a group panel; "centre" is the canonical spelling.
POSITIONS = {"left": "left", "centre": "centre", "center": "centre", "middle": "centre", "right": "right"}


@dataclass
class PanelSpec:
    index: int  # 0-based panel number
    line: int  # 1-based script line
    characters: list[str]  # names as defined in the story, left to right as written; empty for [NC]
    prompt: str
    speech: list[str] = field(default_factory=list)
    caption: str | None = None
    positions: list[str | None] = field(default_factory=list)  # per character: left/centre/right or None (auto)
    speakers: list[str | None] = field(default_factory=list)  # per speech line: who says it (None: not said)

    def __post_init__(self):
        self.positions = list(self.positions) or [None] * len(self.characters)
        if not self.speakers:
            # in a one-character panel every line is theirs; otherwise unattributed until a speaker is written
            self.speakers = [self.characters[0] if len(self.characters) == 1 else None] * len(self.speech)

    @property
    def character(self) -> str | None:
        """The panel's first character (None for [NC])."""
        return self.characters[0] if self.characters else None

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


def _parse_tags(text: str, start: int, line_no: int, names, errors: list[ScriptError]):
    """The [..] tags at the start of a panel: (characters, positions, end index), or None after an error."""
    characters, positions, i = [], [], start
    while i < len(text) and text[i] == "[":
        close = text.find("]", i)
        if close < 0:
            errors.append(ScriptError(line_no, i + 1, "unclosed [: expected ] after the character name"))
            return None
        tag, _, where = (part.strip() for part in text[i + 1:close].partition(":"))
        column = i + 2
        if not tag:
            errors.append(ScriptError(line_no, column, "empty [ ]: expected a character name or NC"))
            return None
        if "," in tag:
            errors.append(ScriptError(line_no, column, "one character per tag: write [Mia][Leo] for two characters"))
            return None
        if tag.upper() == NO_CHARACTER:
            if characters or text[close + 1:].lstrip().startswith("["):
                errors.append(ScriptError(line_no, column, "[NC] is a panel without characters: it takes no other tag"))
                return None
            return [], [], close + 1
        character = tag if names is None else names.get(tag.casefold())
        if character is None:
            known = ", ".join(sorted(names.values()) + [NO_CHARACTER])
            errors.append(ScriptError(line_no, column, f'unknown character "{tag}": expected one of {known} '
                                      "(add and accept the character first)"))
            return None
        if character in characters:
            errors.append(ScriptError(line_no, column, f"{character} is tagged twice in this panel"))
            return None
        if len(characters) == MAX_CHARACTERS_PER_PANEL:
            errors.append(ScriptError(line_no, i + 1, f"at most {MAX_CHARACTERS_PER_PANEL} characters per panel"))
            return None
        position = POSITIONS.get(where.casefold()) if where else None
        if where and position is None:
            errors.append(ScriptError(line_no, i + 2 + text[i + 1:close].index(":"),
                                      f'unknown position "{where}": expected left, centre or right'))
            return None
        if position is not None and position in positions:
            errors.append(ScriptError(line_no, column, f"two characters cannot both stand {position}"))
            return None
        characters.append(character)
        positions.append(position)
        i = close + 1
        while i < len(text) and text[i] in " \t" and text[i + 1:i + 2] == "[":
            i += 1
    return characters, positions, i


def _speaker(before: list[str], characters: list[str], names) -> tuple[str | None, int, str | None]:
    """The ``Name:`` right before a quote: (speaker, characters to drop from the prompt, name of a story character
    who is not in the panel)."""
    text = "".join(before).rstrip()
    if not text.endswith(":"):
        return None, 0, None
    head = text[:-1].rstrip()
    candidates = list(characters) + [n for n in (names or {}).values() if n not in characters]
    for name in sorted(candidates, key=len, reverse=True):
        if head.casefold().endswith(name.casefold()):
            cut = len(head) - len(name)
            if cut == 0 or not (head[cut - 1].isalnum() or head[cut - 1] == "_"):
                if name not in characters:
                    return None, 0, name
                return name, len("".join(before)) - cut, None
    return None, 0, None


def _parse_line(text: str, line_no: int, names: dict[str, str], errors: list[ScriptError], index: int):
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        errors.append(ScriptError(line_no, start + 1,
                                  "expected a [Character] tag or [NC] at the start of the panel"))
        return None
    tags = _parse_tags(text, start, line_no, names, errors)
    if tags is None:
        return None
    characters, positions, body = tags
    prompt, speech, speakers, caption = [], [], [], None
    i = body
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
            speaker, drop, absent = _speaker(prompt, characters, names)
            if absent is not None:
                errors.append(ScriptError(line_no, i + 1, f"{absent} speaks but is not in this panel: add "
                                          f"[{absent}] to its tags"))
                return None
            if drop:
                del prompt[len(prompt) - drop:]
            said = "".join(buf).replace('\\"', '"').strip()
            if said:
                speech.append(said)
                speakers.append(speaker or (characters[0] if len(characters) == 1 else None))
            i = j + 1
            continue
        if ch == "#":
            caption = _clean_caption(text[i + 1:]) or None
            break
        prompt.append(ch)
        i += 1
    prompt_text = " ".join("".join(prompt).split()).strip(" ,")
    if not prompt_text:
        tag_text = text[start:body].strip()
        errors.append(ScriptError(line_no, body + 1, f"empty panel: write what the panel shows after {tag_text}"))
        return None
    return PanelSpec(index=index, line=line_no, characters=characters, prompt=prompt_text, speech=speech,
                     caption=caption, positions=positions, speakers=speakers)


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
