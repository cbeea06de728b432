"""Plan files: the pydantic model and YAML loading with file:line errors.

Pure data. Nothing here talks to a database or to Alembic, so `validate` and the unit
tests run anywhere. Every problem becomes a `PlanIssue` naming the file, the line, the
key and the fix; `PlanError` carries all of them at once so an author fixes a file in
one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from phasegate.errors import UsageError

PHASES: tuple[str, ...] = ("expand", "backfill", "switch", "contract")
PhaseName = Literal["expand", "backfill", "switch", "contract"]
REVISION_PHASES: tuple[str, ...] = ("expand", "switch", "contract")

_NAME = r"^[a-z0-9][a-z0-9-]*$"
_JOB_NAME = r"^[a-z0-9][a-z0-9_-]*$"
_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE = rf"^{_IDENT}(\.{_IDENT})?$"

Loc = tuple[str | int, ...]

# Bounds on a plan's YAML, far above any real plan (the bundled one nests 7 levels and has
# about 50 nodes): a "billion laughs" of nested aliases would otherwise expand to millions
# of nodes in `_walk` and pydantic, and deep nesting overflows the recursive composer.
MAX_NESTING = 64
MAX_NODES = 100_000


@dataclass(frozen=True)
class PlanIssue:
    """One problem in a plan file, located precisely enough to fix without guessing."""

    file: str
    line: int | None
    key: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return f"{text}. {self.hint}" if self.hint else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "message": self.message,
            "hint": self.hint,
        }


class PlanError(UsageError):
    """A plan (or its revision tags) is invalid; exit code 2, nothing touched."""

    kind = "invalid-plan"

    def __init__(self, issues: Iterable[PlanIssue]) -> None:
        self.issues = list(issues)
        super().__init__(
            "\n".join(str(i) for i in self.issues),
            issues=[i.to_dict() for i in self.issues],
        )


def check_specifier(value: str) -> str:
    """Reject anything packaging cannot parse as a PEP 440 specifier set."""
    if not value.strip():
        raise ValueError("empty version specifier; write e.g. '>=2,<3'")
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise ValueError(
            f"{value!r} is not a PEP 440 version specifier; write e.g. '>=2', '<3' or '>=1,<3'"
        ) from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Sync(_Strict):
    """Dual-write while both code versions run: `set` goes up, `down` goes back."""

    down: dict[str, str]

    @field_validator("down")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError(
                "`sync.down` needs at least one old column computed from the new ones; "
                "without it the trigger cannot tell old-code writes from new-code writes "
                "(omit `sync` for a copy with no dual-write)"
            )
        return _check_columns(value)


class Job(_Strict):
    """A backfill job: a one-shot `sql` statement, or a batched `update` of a table."""

    name: str = Field(pattern=_JOB_NAME)
    sql: str | None = None
    table: str | None = Field(default=None, pattern=_TABLE)
    key: str | list[str] | None = None
    set_: dict[str, str] | None = Field(default=None, alias="set")
    where: str | None = None
    sync: Sync | None = None
    batch_size: PositiveInt | None = None

    @field_validator("set_")
    @classmethod
    def _columns(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _check_columns(value)

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        return None if value is None else ends_its_comment(value)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | list[str] | None) -> str | list[str] | None:
        names = [value] if isinstance(value, str) else value or []
        if isinstance(value, list) and not value:
            raise ValueError("`key` is an empty list; name the key column(s) or omit it")
        for name in names:
            if not re.fullmatch(_IDENT, name):
                raise ValueError(f"{name!r} is not a plain column name")
        if len(set(names)) != len(names):
            raise ValueError("`key` names a column twice")
        return value

    @property
    def key_columns(self) -> list[str] | None:
        """The job's explicit key, always as a list (None: use the table's own)."""
        if self.key is None:
            return None
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @model_validator(mode="after")
    def _one_kind(self) -> Job:
        batched = {
            "table": self.table,
            "key": self.key,
            "set": self.set_,
            "where": self.where,
            "sync": self.sync,
            "batch_size": self.batch_size,
        }
        if self.sql is not None:
            extra = [k for k, v in batched.items() if v is not None]
            if extra:
                raise ValueError(
                    f"a job has either `sql` or `table`/`set`/`where`, not both "
                    f"(found sql and {', '.join(extra)}); split it into two jobs"
                )
            if not self.sql.strip():
                raise ValueError("`sql` is empty; write the statement or remove the job")
            return self
        missing = [k for k in ("table", "set", "where") if not batched[k]]
        if missing:
            raise ValueError(
                f"a batched job needs `table`, `set` and `where` (missing: {', '.join(missing)});"
                " or give `sql` for a one-shot statement"
            )
        if self.sync is not None:
            both = sorted(set(self.sync.down) & set(self.set_ or {}))
            if both:
                raise ValueError(
                    f"column(s) {', '.join(both)} appear in both `set` and `sync.down`;"
                    " `set` names the new columns, `sync.down` the old ones"
                )
        return self

    @property
    def is_batched(self) -> bool:
        return self.sql is None

    @property
    def new_columns(self) -> list[str]:
        return list(self.set_ or {})

    @property
    def old_columns(self) -> list[str]:
        return list(self.sync.down) if self.sync else []


class Phase(_Strict):
    """expand, switch, contract: Alembic revisions, gated on `compatible`."""

    compatible: str
    revisions: list[str] | None = None

    @field_validator("compatible")
    @classmethod
    def _specifier(cls, value: str) -> str:
        return check_specifier(value)


class BackfillPhase(_Strict):
    """backfill: jobs only; schema changes belong to expand or switch revisions."""

    compatible: str
    jobs: list[Job] = Field(min_length=1)

    @field_validator("compatible")
    @classmethod
    def _specifier(cls, value: str) -> str:
        return check_specifier(value)

    @field_validator("jobs")
    @classmethod
    def _unique_names(cls, jobs: list[Job]) -> list[Job]:
        seen: set[str] = set()
        for job in jobs:
            if job.name in seen:
                raise ValueError(f"two jobs are named {job.name!r}; job names must be unique")
            seen.add(job.name)
        return jobs


class Phases(_Strict):
    expand: Phase | None = None
    backfill: BackfillPhase | None = None
    switch: Phase | None = None
    contract: Phase | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Phases:
        if not any(getattr(self, p) for p in PHASES):
            raise ValueError(
                "a plan needs at least one phase: expand, backfill, switch or contract"
            )
        return self


class Plan(_Strict):
    """One logical schema change, as the YAML file describes it."""

    plan: str = Field(pattern=_NAME, max_length=40)
    description: str = ""
    app: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    baseline_compatible: str
    phases: Phases

    _source: str = PrivateAttr(default="<string>")
    _digest: str = PrivateAttr(default="")
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)

    @field_validator("baseline_compatible")
    @classmethod
    def _specifier(cls, value: str) -> str:
        return check_specifier(value)

    @property
    def name(self) -> str:
        return self.plan

    @property
    def source(self) -> str:
        return self._source

    @property
    def digest(self) -> str:
        return self._digest

    def line_of(self, *loc: str | int) -> int | None:
        """The line of the deepest key of `loc` present in the file (for later errors)."""
        return _line_for(self._lines, tuple(loc))

    def issue(self, loc: Loc, message: str, hint: str = "") -> PlanIssue:
        return PlanIssue(self._source, self.line_of(*loc), _dotted(loc), message, hint)

    def phase_names(self) -> list[str]:
        return [p for p in PHASES if getattr(self.phases, p) is not None]

    def phase(self, name: str) -> Phase | BackfillPhase:
        found = getattr(self.phases, name, None)
        if found is None:
            raise UsageError(
                f"plan {self.plan!r} has no {name!r} phase; its phases are "
                f"{', '.join(self.phase_names())}"
            )
        return found

    def jobs(self) -> list[Job]:
        return list(self.phases.backfill.jobs) if self.phases.backfill else []

    def next_phase(self, completed: str | None) -> str | None:
        """The phase after `completed` (None: nothing completed yet)."""
        names = self.phase_names()
        if completed is None:
            return names[0]
        index = names.index(completed) + 1
        return names[index] if index < len(names) else None

    def previous_phase(self, phase: str) -> str | None:
        names = self.phase_names()
        index = names.index(phase)
        return names[index - 1] if index else None

    def compatible_after(self, phase: str | None) -> str:
        """The code versions that work once `phase` is done (None: before the plan)."""
        return self.baseline_compatible if phase is None else self.phase(phase).compatible


def load_plan(path: str | Path) -> Plan:
    """Read, parse and validate one plan file; raise PlanError with every issue found."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(
            [PlanIssue(source, None, "", f"cannot read the plan: {exc.strerror}", "")]
        ) from None
    return parse_plan(raw.decode("utf-8", errors="replace"), source, raw)


COMPLEX_KEY = "a key must be a name, not a YAML list or mapping"


def parse_plan(text: str, source: str = "<string>", raw: bytes | None = None) -> Plan:
    try:
        _check_size(text, source)  # before anything recursive or alias-expanding runs
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise PlanError([_yaml_issue(exc, text, source)]) from None
    if node is None or not isinstance(node, yaml.MappingNode):
        line = node.start_mark.line + 1 if node is not None else 1  # empty: its first line
        raise PlanError(
            [PlanIssue(source, line, "", "a plan is a YAML mapping", "start with `plan: <name>`")]
        )
    lines: dict[Loc, int] = {(): node.start_mark.line + 1}  # a missing top-level key's line
    issues = list(_walk(node, (), lines, source))
    if any(issue.message == COMPLEX_KEY for issue in issues):  # yaml.load could not hash it
        raise PlanError(issues)
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise PlanError([*issues, _yaml_issue(exc, text, source)]) from None
    issues += _order_issues(data, lines, source)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        issues += [_issue_from_error(err, lines, source) for err in exc.errors()]
        raise PlanError(issues) from None
    if issues:
        raise PlanError(issues)
    plan._source = source
    plan._digest = hashlib.sha256(raw if raw is not None else text.encode()).hexdigest()
    plan._lines = lines
    return plan


def _check_size(text: str, source: str) -> None:
    """Refuse YAML nested deeper than MAX_NESTING, or expanding to more than MAX_NODES nodes
    once every alias is counted as the subtree it stands for.

    PyYAML's event stream is produced iteratively and shows aliases unexpanded, so this
    costs one pass over the text whatever the input: an anchor's size is known when its
    node ends, and an alias adds that size without expanding anything.
    """
    sizes: dict[str, int] = {}  # anchor -> nodes of its subtree, aliases expanded
    open_nodes: list[tuple[int, str | None]] = []  # per open collection: count at start, anchor
    expanded = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor or "")
            if size is None and any(anchor == event.anchor for _, anchor in open_nodes):
                raise PlanError(
                    [
                        PlanIssue(
                            source,
                            line,
                            "",
                            f"alias *{event.anchor} refers to a node that contains it",
                            "a plan is a tree: repeat the value instead of the alias",
                        )
                    ]
                )
            expanded += size or 1  # an undefined alias: the composer names it below
        elif isinstance(event, yaml.ScalarEvent):
            expanded += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            expanded += 1
            open_nodes.append((expanded - 1, event.anchor))
            if len(open_nodes) > MAX_NESTING:
                raise PlanError(
                    [
                        PlanIssue(
                            source,
                            line,
                            "",
                            f"the YAML is nested more than {MAX_NESTING} levels deep",
                            "a plan nests about 7 levels (phases, backfill, jobs, a job, sync, "
                            "down, a column); check the brackets and indentation there",
                        )
                    ]
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            start, anchor = open_nodes.pop()
            if anchor:
                sizes[anchor] = expanded - start
        if expanded > MAX_NODES:
            raise PlanError(
                [
                    PlanIssue(
                        source,
                        line,
                        "",
                        f"the YAML expands to more than {MAX_NODES:,} nodes once its aliases "
                        "are expanded",
                        "a plan has a few hundred at most; use anchors and aliases for small "
                        "repeated values only, and write the plan out",
                    )
                ]
            )


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, whose constructor's own errors carry the node's place: a
    value it cannot build (`2024-02-30` as a date, an integer of 5,000 digits) raises a
    plain ValueError with no line, which would end the command as an internal error."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"YAML cannot read this value: {exc}", node.start_mark
            ) from None


def _yaml_issue(exc: yaml.YAMLError, text: str, source: str) -> PlanIssue:
    """Locate a YAML syntax error; suggest quoting when a specifier started the value."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or str(exc)
    elif isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1
        character = exc.character  # PyYAML gives its code point, not the character
        character = chr(character) if isinstance(character, int) else character
        problem = f"character {character!r} is not allowed in YAML"
    else:
        line, problem = None, str(exc)
    hint = "check the indentation and quoting there"
    lines = text.splitlines()
    if line and line <= len(lines) and re.search(r":\s*[<>=!~]", lines[line - 1]):
        hint = 'quote version specifiers: compatible: ">=2"'
    return PlanIssue(source, line, "", f"not valid YAML: {problem}", hint)


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], source: str) -> Iterator[PlanIssue]:
    """Record the line of every key and item; report duplicate keys yaml would hide."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a]`: unhashable, never a name
                yield PlanIssue(
                    source,
                    key_node.start_mark.line + 1,
                    _dotted(loc),
                    COMPLEX_KEY,
                    "write the key as plain text",
                )
                continue
            key = key_node.value
            child = (*loc, key)
            if key in seen:
                yield PlanIssue(
                    source,
                    key_node.start_mark.line + 1,
                    _dotted(child),
                    "this key appears twice",
                    "keep one; YAML would silently use the last",
                )
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            yield from _walk(value_node, child, lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            lines[child] = item.start_mark.line + 1
            yield from _walk(item, child, lines, source)


def _order_issues(data: Any, lines: dict[Loc, int], source: str) -> list[PlanIssue]:
    """Phases must be written in the order they run, so the file reads like the rollout."""
    phases = data.get("phases") if isinstance(data, dict) else None
    if not isinstance(phases, dict):
        return []
    known = [p for p in phases if p in PHASES]
    issues = []
    for before, after in itertools.pairwise(known):
        if PHASES.index(before) > PHASES.index(after):
            issues.append(
                PlanIssue(
                    source,
                    lines.get(("phases", after)),
                    f"phases.{after}",
                    f"phase {after!r} is written after {before!r}",
                    "phases run expand → backfill → switch → contract; write them in that order",
                )
            )
    return issues


_HINTS = {
    "plan": "a unique name of lowercase letters, digits and dashes, e.g. `plan: bug-root-cause`",
    "app": "the application whose running versions gate this plan, e.g. `app: bugtracker`",
    "baseline_compatible": 'the code versions that work before the plan, e.g. `"<2"`',
    "compatible": 'the code versions that work once the phase is done, e.g. `">=2"`',
    "phases": "add `phases:` with at least one of expand, backfill, switch, contract",
    "jobs": "list the backfill jobs, each with `name` and either `sql` or `table`/`set`/`where`",
    "name": "lowercase letters, digits, `-` and `_`",
    "table": "a table name, optionally schema-qualified: `bug` or `public.bug`",
    "key": "a column name or a list of them (a unique, NOT NULL key); omit it to use the "
    "primary key",
    "batch_size": "a positive number of rows per batch",
}


def _issue_from_error(err: Any, lines: dict[Loc, int], source: str) -> PlanIssue:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    line = _line_for(lines, loc)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f"allowed keys here: {', '.join(allowed)}" if allowed else ""
        if len(loc) == 2 and loc[0] == "phases":
            hint = "phases are expand, backfill, switch and contract"
            allowed = list(PHASES)
        close = difflib.get_close_matches(field, allowed, n=1, cutoff=0.75)
        if close:
            hint = f"did you mean {close[0]!r}? ({hint})" if hint else f"did you mean {close[0]!r}?"
        if field == "revisions" and loc[:2] == ("phases", "backfill"):
            hint = "backfill runs jobs only; tag schema changes expand or switch"
        return PlanIssue(source, line, _dotted(loc), f"unknown key {field!r}", hint)
    if kind == "missing":
        return PlanIssue(
            source, line, _dotted(loc), f"missing required key {field!r}", _HINTS.get(field, "")
        )
    message = err["msg"].removeprefix("Value error, ")
    if kind == "string_type":
        message = f"expected text, got {type(err.get('input')).__name__}"
        hint = 'quote it, e.g. ">=2"' if field in {"compatible", "baseline_compatible"} else ""
        return PlanIssue(source, line, _dotted(loc), message, hint)
    if kind == "string_pattern_mismatch":
        return PlanIssue(
            source,
            line,
            _dotted(loc),
            f"{err.get('input')!r} is not allowed",
            _HINTS.get(field, ""),
        )
    return PlanIssue(
        source, line, _dotted(loc), message, _HINTS.get(field, "") if not message else ""
    )


def _allowed_keys(loc: Loc) -> list[str]:
    """The keys the model accepts at `loc`, so an unknown-key error can list them."""
    model: type[BaseModel] | None = Plan
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part),
            None,
        )
        model = _model_of(field.annotation) if field else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None


def _line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1 if lines else None)


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _check_columns(columns: dict[str, str]) -> dict[str, str]:
    for column, expression in columns.items():
        if not re.fullmatch(_IDENT, column):
            raise ValueError(f"{column!r} is not a plain column name")
        if not isinstance(expression, str) or not expression.strip():
            raise ValueError(f"column {column!r} needs a SQL expression written against `new`")
    return {column: ends_its_comment(expression) for column, expression in columns.items()}


def ends_its_comment(expression: str) -> str:
    """An expression whose last line may end in a `--` comment, closed by a newline: every
    statement phasegate builds embeds it in parentheses, and the comment would otherwise
    swallow the closing parenthesis and whatever follows on that line."""
    if "--" in expression and not expression.endswith("\n"):
        return expression + "\n"
    return expression
