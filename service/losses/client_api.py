"""Writes service/client_api.py: one typed method per loss for LossClient and
AsyncLossClient, generated from the loss table (scripts/generate-client-api).

``client.loss(name, **fields)`` gives a type checker nothing to check; the
generated ``client.cross_entropy(input, target, reduction="mean", ...)`` has
the loss's tensor arguments as parameters and its options, ``grad`` and the
request fields as a TypedDict, so a misspelt option, a reduction the loss
does not have or a wrong option type is an error before anything runs.
tests/test_client_api.py fails when the file drifts from the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.losses import LOSSES, LossSpec, Option

TARGET = Path(__file__).resolve().parent.parent / "client_api.py"

HEADER = '''"""Typed methods per loss for LossClient and AsyncLossClient (mixins).

GENERATED from the loss table (service/losses) by scripts/generate-client-api:
do not edit; tests/test_client_api.py fails when this file drifts from the table.
Each method is ``self.loss("<name>", ...)`` with the loss's tensor arguments as
parameters and its options, ``grad`` and the request fields typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import numpy as np
import torch

if TYPE_CHECKING:
    from service.client import LossResult

# What a tensor argument may be: a torch tensor, a numpy array, (nested) lists, a number.
TensorLike = torch.Tensor | np.ndarray[Any, Any] | Sequence[Any] | float
FloatDtype = Literal["float16", "bfloat16", "float32", "float64"]
Encoding = Literal["nested", "flat", "b64"]
'''


def class_name(spec: LossSpec) -> str:
    return "".join(part.capitalize() for part in spec.name.split("_")) + "Fields"


def literal(values: Any) -> str:
    # double quotes, as the formatter writes them
    return "Literal[" + ", ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in values) + "]"


def option_type(option: Option) -> str:
    if option.choices is not None:
        named = [c for c in option.choices if c is not None]
        text = literal(named)
        return text + " | None" if None in option.choices else text
    if option.default is None:
        return f"{option.type.__name__} | None"
    return option.type.__name__


def fields_class(spec: LossSpec) -> list[str]:
    lines = [
        "",
        "",
        f"class {class_name(spec)}(TypedDict, total=False):",
        f'    """The optional fields of {spec.name}: its options (torch defaults), its',
        '    optional tensor arguments, grad and the request fields."""',
        "",
    ]
    for arg in spec.args:
        if not arg.required:
            lines.append(f"    {arg.name}: TensorLike")
    for option in spec.options:
        lines.append(f"    {option.name}: {option_type(option)}  # default {option.default!r}")
    lines.append(f"    reduction: {literal(spec.reductions)}  # default 'mean'")
    lines.append(f"    grad: bool | Sequence[{literal(spec.maybe_differentiable)}]")
    lines.append("    grad_output: TensorLike")
    lines.append("    device: str")
    lines.append("    dtype: FloatDtype")
    lines.append("    encoding: Encoding")
    return lines


def method(spec: LossSpec, asynchronous: bool) -> list[str]:
    """Parameters and arguments one per line (with trailing commas, which the
    formatter keeps as they are), so the output needs no formatter."""
    required = [a.name for a in spec.args if a.required]
    prefix, wait = ("async ", "await ") if asynchronous else ("", "")
    return [
        "",
        f"    {prefix}def {spec.name}(",
        "        self,",
        *(f"        {name}: TensorLike," for name in required),
        f"        **fields: Unpack[{class_name(spec)}],",
        "    ) -> LossResult:",
        f'        """``torch.nn.functional.{spec.name}`` on the service."""',
        f"        return {wait}self.loss(",
        f'            "{spec.name}",',
        *(f"            {name}={name}," for name in required),
        "            **fields,",
        "        )",
    ]


def mixin(asynchronous: bool) -> list[str]:
    name = "AsyncLossMethods" if asynchronous else "LossMethods"
    prefix = "async " if asynchronous else ""
    lines = [
        "",
        "",
        f"class {name}:",
        '    """One method per loss of the table, under its torch.nn.functional name."""',
        "",
        f"    {prefix}def loss(self, name: str, /, **fields: Any) -> LossResult:",
        "        raise NotImplementedError  # the client's",
    ]
    for spec in LOSSES.values():
        lines += method(spec, asynchronous)
    return lines


def render() -> str:
    lines = [HEADER.rstrip("\n")]
    for spec in LOSSES.values():
        lines += fields_class(spec)
    lines += mixin(asynchronous=False)
    lines += mixin(asynchronous=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/generate-client-api", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs from the table"
    )
    args = parser.parse_args(argv)
    text = render()
    current = TARGET.read_text() if TARGET.exists() else ""
    if args.check:
        if current != text:
            print(f"{TARGET} is out of date: run scripts/generate-client-api", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TARGET.write_text(text)
        print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
