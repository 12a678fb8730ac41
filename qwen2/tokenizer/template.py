"""Sandboxed, budgeted rendering of Jinja chat templates.

Chat templates ship inside checkpoints (tokenizer_config.json, GGUF metadata), i.e. they are code
from a download. They run in Jinja's `ImmutableSandboxedEnvironment` (no attribute escapes such as
`''.__class__`, no mutation of inputs -> `SecurityError`), configured as transformers does
(trim_blocks, lstrip_blocks, loopcontrols, a `tojson` that does not HTML-escape, `raise_exception`,
`strftime_now`), so that the same template renders the same text as `apply_chat_template`.

On top of the sandbox a `RenderBudget` bounds what a hostile or buggy template can cost:
* wall-clock time, enforced by a line tracer on template frames only (so even a hook-free
  `{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}` is interrupted);
* output size, checked as the output streams;
* the size of any single string/list the template builds with `*`, `+`, `~`, `%`, filters or str
  methods (checked before allocation where the size is predictable, e.g. `'a' * 10**9`,
  `x|center(10**9)`, `s ~ s` in a loop).
Every failure is a `ChatTemplateError` (a ValueError) with the cause chained.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template failed: syntax error, raise_exception(), sandbox violation or budget exceeded."""


class TemplateBudgetError(ChatTemplateError):
    """The template exceeded its RenderBudget (time or size)."""


@dataclass(frozen=True)
class RenderBudget:
    """Limits for one render. Defaults are far above any real conversation (a 128k-token context is
    ~0.5M characters) and far below what would hurt a server."""

    seconds: float = 2.0
    max_chars: int = 16 * 2**20


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Filters and str methods whose integer arguments are output sizes.
_WIDTH_TAKING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "batch", "slice"})


class _Limits:
    """Per-render budget state, consulted by the environment hooks and the tracer."""

    def __init__(self, budget: RenderBudget) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"chat template rendering exceeded {self.budget.seconds} s")

    def check_size(self, size: int, what: str) -> None:
        if size > self.budget.max_chars:
            raise TemplateBudgetError(f"chat template {what} would hold {size} items (limit {self.budget.max_chars})")

    def check_value(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)):
            self.check_size(len(value), what)
        return value

    def check_sizing_call(self, name: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse, before allocating, a filter or str method whose result size is set by its arguments."""
        if name in _WIDTH_TAKING:  # center(n), ljust(n), indent(n), batch(n), ... allocate ~n items
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int) and not isinstance(arg, bool):
                    self.check_size(abs(arg), f"{name}() argument")
        elif name == "replace" and isinstance(target, str) and len(args) >= 2:
            old, new = args[0], args[1]
            if isinstance(old, str) and isinstance(new, str):
                hits = len(target) + 1 if old == "" else target.count(old)
                self.check_size(len(target) + hits * len(new), "replace() result")

    def tracer(self, frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        # Called for every new frame; trace lines only in compiled template code (filename "<template>"),
        # so the cost is one cheap call per Python function entered while rendering.
        if frame.f_code.co_filename == "<template>":
            self.check_time()
            return self._line
        return None

    def _line(self, frame: Any, event: str, arg: Any) -> Callable[..., Any]:
        self.check_time()
        return self._line


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join: `~` is not a binary operator the sandbox can intercept,
    and `{% set s = s ~ s %}` in a loop would otherwise double a string up to gigabytes."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.budgeted_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus size/time checks on binary operators, calls and filters.

    One shared instance; the limits of the render in progress live in a thread-local, so concurrent
    renders in different threads each answer to their own budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self._active = threading.local()
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}

    @property
    def limits(self) -> _Limits:
        limits = getattr(self._active, "limits", None)
        if limits is None:  # compiled template used outside render(): no budget was set up
            raise ChatTemplateError("chat templates must be rendered through qwen2.tokenizer.template.render")
        return limits

    @contextlib.contextmanager
    def budgeted(self, limits: _Limits) -> Iterator[None]:
        previous_tracer = sys.gettrace()
        self._active.limits = limits
        sys.settrace(limits.tracer)
        try:
            yield
        finally:
            sys.settrace(previous_tracer)
            self._active.limits = None

    def _guard_filter(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)  # keeps jinja's pass_context/pass_environment markers
        def guarded(*args: Any, **kwargs: Any) -> Any:
            limits = self.limits
            limits.check_time()
            # Filters get (value, *args), or (context/environment, value, *args) when marked pass_*.
            offset = 2 if getattr(function, "jinja_pass_arg", None) is not None else 1
            target = args[offset - 1] if len(args) >= offset else None
            limits.check_sizing_call(name, target, args[offset:], kwargs)
            return limits.check_value(function(*args, **kwargs), f"filter {name!r} result")

        return guarded

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limits = self.limits
        limits.check_time()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    limits.check_size(len(seq) * max(count, 0), "'*' result")
        elif operator == "**" and isinstance(right, int) and isinstance(left, (int, float)) and abs(left) > 1:
            limits.check_size(abs(right) * 64, "'**' result")  # ~bits of the result; stops 10**10**9
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            limits.check_size(len(left) + len(right), "'+' result")
        elif operator == "%" and isinstance(left, str):  # printf-style formatting: '%s%s' % (s, s)
            args = right if isinstance(right, tuple) else (right,)
            limits.check_size(len(left) + sum(len(str(a)) for a in args), "'%' result")
        return super().call_binop(context, operator, left, right)

    def budgeted_concat(self, parts: tuple[Any, ...]) -> str:
        texts = [str(part) for part in parts]
        self.limits.check_size(sum(map(len, texts)), "'~' result")
        return "".join(texts)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        limits = __self.limits
        limits.check_time()
        target = getattr(__obj, "__self__", None)
        if isinstance(target, str):  # str methods: 'x'.center(10**9), 'x'.replace('', big)
            limits.check_sizing_call(getattr(__obj, "__name__", ""), target, args, kwargs)
        return limits.check_value(super().call(__context, __obj, *args, **kwargs), "call result")


_ENVIRONMENT = _ChatEnvironment()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.environment.Template:
    # Compiling costs milliseconds; checkpoints use one template, so cache the compiled form.
    return _ENVIRONMENT.from_string(template)


def _jinja_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])


# Jinja sandboxes before 3.1.6 have published escapes (CVE-2024-56201, CVE-2024-56326, CVE-2025-27516).
_MIN_JINJA = (3, 1, 6)


def render(template: str, context: dict[str, Any], budget: RenderBudget | None = None) -> str:
    """Render `template` with `context` (already plain data) in the sandbox, within `budget`."""
    if _jinja_version() < _MIN_JINJA:
        raise ChatTemplateError(f"jinja2>={'.'.join(map(str, _MIN_JINJA))} is required to render chat templates safely "
                                f"(installed: {jinja2.__version__})")
    limits = _Limits(budget or RenderBudget())
    try:
        compiled = _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    pieces: list[str] = []
    total = 0
    try:
        with _ENVIRONMENT.budgeted(limits):
            for piece in compiled.generate(**context):
                total += len(piece)
                limits.check_size(total, "output")
                pieces.append(piece)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template attempted an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    except (RecursionError, MemoryError) as e:
        raise TemplateBudgetError(f"chat template exhausted resources: {type(e).__name__}") from e
    except Exception as e:  # a template calling e.g. int('x') or dividing by zero
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    return "".join(pieces)
