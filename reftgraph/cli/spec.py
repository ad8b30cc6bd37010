"""Training specs for ``reftgraph train SPEC``: a YAML or JSON file, checked before any
model loads. Every problem is one clear line (:class:`SpecError`).

```yaml
model: smollm2-135m-instruct
graph: {layers: [3, 9, 15, 21], positions: f5+l5, rank: 4}
data: {path: train.jsonl, template: chat}      # rows {"prompt", "response"} or {"text", "label"}
train: {epochs: 10, batch_size: 8, lr: 0.004}
output: out/my-graph
```
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from dataclasses import dataclass, fields
from typing import Optional

from ..arch.models import DEFAULT_MODEL
from ..core.settings import Settings, option
from ..errors import DataError, SpecError
from ..methods.reft import ReftGraphConfig
from ..training import TrainConfig
from ..training.data import MAX_CLASSES

__all__ = ["DataFileError", "DataSpec", "GraphSpec", "Section", "TrainSpec", "check_layers", "read_lines",
           "read_rows", "read_spec"]


class DataFileError(SpecError, DataError):
    """A data file named by a spec that cannot be used: both a :class:`SpecError` (the spec
    points at it) and a :class:`DataError` (what is wrong is the data); it names the line.

    >>> issubclass(DataFileError, SpecError) and issubclass(DataFileError, DataError)
    True
    """


def _path(v):
    return None if isinstance(v, str) and v else f"must be a path (a string), got {v!r}"


# the sections that configure a function live beside it; the names below are kept for older code
Section = Settings
GraphSpec = ReftGraphConfig
TrainSpec = TrainConfig


@dataclass(frozen=True)
class DataSpec(Settings):
    """The ``data`` section: the training file, its template and an optional evaluation file.

    >>> DataSpec(path="train.jsonl").eval_path is None
    True
    """

    path: str = option(None, "a JSONL file of {prompt, response} or {text, label} rows (relative to the spec)",
                       _path)
    template: Optional[str] = option(None, "null (prompts as they are) or 'chat' (the tokenizer's chat template)",
                                     lambda v: None if v in (None, "chat") else f"must be null or 'chat', got {v!r}")
    eval_path: Optional[str] = option(None, "a JSONL file of the same kind, scored after every epoch (the "
                                      "history's eval_loss column)", _path)
    kl_path: Optional[str] = option(None, "a JSONL file of neutral {prompt, response} rows for the KL term "
                                    "(train.kl_weight; default: the training rows' own responses)", _path)


SPEC_SECTIONS = {"graph": GraphSpec, "data": DataSpec, "train": TrainSpec}
SECTIONS = {"model": None, **{k: {f.name for f in fields(v)} for k, v in SPEC_SECTIONS.items()}, "output": None}
REQUIRED = ("graph", "data")


def _value_checks() -> dict:
    return {name: {f.name: f.metadata["check"] for f in fields(cls) if f.metadata["check"]}
            for name, cls in SPEC_SECTIONS.items()}


_FLOAT_FIELDS = {name: {f.name for f in fields(cls) if f.type in ("float", "Optional[float]")}
                 for name, cls in SPEC_SECTIONS.items()}
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def as_number(value):
    """A number written as text (``"6e-3"``: PyYAML reads ``lr: 6e-3`` as a string, YAML 1.1
    wants ``6.0e-3``) as a float; anything else unchanged.

    >>> as_number("6e-3"), as_number("1E+2"), as_number("fast"), as_number("inf"), as_number(0.5)
    (0.006, 100.0, 'fast', 'inf', 0.5)
    """
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)
    return value


def _parse_error(path: Path, e: Exception) -> SpecError:
    """One line naming the file, the line and column and what the parser found."""
    mark = getattr(e, "problem_mark", None)   # PyYAML (0-based)
    if mark is not None:
        what, start = e.problem or "", getattr(e, "context_mark", None)
        if e.context:   # "while parsing a flow sequence" -> "in the flow sequence from line 1, column 8"
            thing = re.sub(r"^while (parsing|scanning) an? ", "", e.context)
            where = f" from line {start.line + 1}, column {start.column + 1}" if start is not None else ""
            what += f" (in the {thing}{where})"
        return SpecError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}")
    if isinstance(e, json.JSONDecodeError):
        return SpecError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}")
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    return SpecError(f"{path}: not valid {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _unknown(key: str, valid, where: str) -> SpecError:
    near = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return SpecError(f"unknown key {key!r} in {where}{hint}")


def read_spec(path) -> dict:
    """Read and check a spec file; relative data paths are resolved from the spec's folder.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "caps.json"
    >>> _ = path.write_text('{"graph": {"layers": [1], "rank": 2}, "data": {"path": "train.jsonl"}}')
    >>> spec = read_spec(path)
    >>> spec["model"], Path(spec["data"]["path"]) == path.parent / "train.jsonl", Path(spec["output"]).name
    ('smollm2-135m-instruct', True, 'caps-out')
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    text = read_text(path, SpecError)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is one line
        raise _parse_error(path, e) from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: the spec must be a mapping with keys {', '.join(SECTIONS)}")
    for key, value in spec.items():
        if key not in SECTIONS:
            raise _unknown(key, SECTIONS, "the spec")
        if SECTIONS[key] is not None:
            if not isinstance(value, dict):
                raise SpecError(f"'{key}' must be a mapping of {', '.join(sorted(SECTIONS[key]))}")
            for sub in value:
                if sub not in SECTIONS[key]:
                    raise _unknown(sub, SECTIONS[key], f"'{key}'")
    for key in REQUIRED:
        if key not in spec:
            raise SpecError(f"the spec has no '{key}' section")
    if "path" not in spec["data"]:
        raise SpecError("'data' needs a 'path' to a JSONL file")
    for section, checks in _value_checks().items():
        for key, value in spec.get(section, {}).items():
            if key in _FLOAT_FIELDS[section]:
                value = spec[section][key] = as_number(value)
            problem = checks[key](value) if key in checks else None
            if problem:
                raise SpecError(f"{section}.{key} {problem}")
    for key in ("model", "output"):
        if key in spec and not isinstance(spec[key], str):
            raise SpecError(f"'{key}' must be a string (a model name or path, a folder), got {spec[key]!r}")
    for key in ("path", "eval_path", "kl_path"):
        if key in spec["data"]:
            p = Path(spec["data"][key])
            spec["data"][key] = str(p if p.is_absolute() else path.parent / p)
    spec.setdefault("model", DEFAULT_MODEL)
    spec.setdefault("output", str(path.parent / (path.stem + "-out")))
    spec.setdefault("train", {})
    return spec


def read_text(path, error=DataFileError) -> str:
    r"""The text of a UTF-8 file (a leading byte-order mark is dropped); other bytes are
    ``error``, naming the line.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.jsonl"
    >>> _ = path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xe9"}\n')
    >>> read_text(path)                   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.cli.spec.DataFileError: .../t.jsonl:2: not UTF-8 text (byte 0xe9 at offset 28); save the file as UTF-8
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                    "save the file as UTF-8") from None


def read_lines(path) -> list:
    r"""The lines of a UTF-8 text file, split on newlines only ("\n", or "\r\n"): other
    Unicode line separators (U+2028, U+2029, U+0085) are text, as JSON allows in strings.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "prompts.txt"
    >>> _ = path.write_text("Why\u2028not?\r\nHi\n", encoding="utf-8", newline="")
    >>> read_lines(path)
    ['Why\u2028not?', 'Hi', '']
    """
    return [line[:-1] if line.endswith("\r") else line for line in read_text(path).split("\n")]


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: each line must be a JSON object")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataFileError(f"{where}: 'prompt' must be a string, got {_json(row['prompt'])}")
        response = row.get("response", "")
        if not isinstance(response, str):
            raise DataFileError(f"{where}: 'response' must be a string, got {_json(response)}")
        if not response.strip():
            raise DataFileError(f"{where}: the row has a prompt but no response")
    elif "text" in row:
        if not isinstance(row["text"], str):
            raise DataFileError(f"{where}: 'text' must be a string, got {_json(row['text'])}")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < MAX_CLASSES:
            raise DataFileError(f"{where}: a classification row needs an integer 'label', a class index in "
                                f"0..{MAX_CLASSES - 1} (at most {MAX_CLASSES:,d} classes); got {_json(label)}")
    else:
        raise DataFileError(f"{where}: a row needs 'prompt' and 'response' (or 'text' and 'label')")


def read_rows(path) -> list:
    r"""Rows of a JSONL file: ``{"prompt", "response"}`` or ``{"text", "label"}``, all of one kind.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = path.write_text('{"prompt": "Hi?", "response": "HELLO."}\n\n{"prompt": "Sky?", "response": "BLUE."}\n')
    >>> read_rows(path)
    [{'prompt': 'Hi?', 'response': 'HELLO.'}, {'prompt': 'Sky?', 'response': 'BLUE.'}]

    Prompts, responses and texts must be strings and labels class indices (ints in
    0..9999); every problem is a :class:`DataFileError` naming the file, line and field.

    >>> _ = path.write_text('{"prompt": "Hi?", "response": "HELLO."}\n{"prompt": null, "response": "X"}\n')
    >>> read_rows(path)                   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.cli.spec.DataFileError: .../train.jsonl:2: 'prompt' must be a string, got null
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"data file not found: {path}")
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataFileError(f"{path}:{i}: not valid JSON (nested too deeply)") from None
        _check_row(row, f"{path}:{i}")
        rows.append(row)
    if not rows:
        raise DataFileError(f"{path}: the dataset is empty")
    if len({"prompt" in r for r in rows}) > 1:
        raise DataFileError(f"{path}: mixes prompt/response rows with text/label rows")
    return rows


def check_layers(spec: dict, n_layers: int) -> None:
    """Check ``graph.layers`` of a spec against the model's number of layers.

    >>> check_layers({"model": "tiny", "graph": {"layers": [0, 5]}}, n_layers=4)
    Traceback (most recent call last):
    ...
    reftgraph.errors.SpecError: graph.layers: layer 5 out of range for tiny (valid layers 0..3)
    """
    layers = spec["graph"].get("layers", "all")
    if layers == "all":
        return
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers) or not layers:
        raise SpecError(f"graph.layers must be 'all' or a list of ints, got {layers!r}")
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad:
        raise SpecError(f"graph.layers: layer {bad[0]} out of range for {spec['model']} "
                        f"(valid layers 0..{n_layers - 1})")
