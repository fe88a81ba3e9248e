"""Flags that several binaries define under one name (``--seed``, ``--output``, ``--batch_size``…).

absl allows one definition per name per process. Each binary runs alone, but tests and tools
import several binaries into one process; ``shared`` returns the existing flag when another
module already defined the same name with the same default, and refuses a clash of defaults
(which would make a binary's behaviour depend on import order).
"""

from __future__ import annotations

from typing import Any, Callable

from absl import flags


def shared(define: Callable[..., flags.FlagHolder], name: str, default: Any, help_text: str,
           **kwargs) -> flags.FlagHolder:
  """``define(name, default, help_text, **kwargs)`` unless ``--name`` exists already."""
  if name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if flag.default != default:
      raise ValueError(f"flag --{name} is defined by two binaries with different defaults "
                       f"({flag.default!r} and {default!r}); give them one default")
    return flags.FlagHolder(flags.FLAGS, flag)
  return define(name, default, help=help_text, **kwargs)
