"""The one fault-injection hook: failures on demand, driven by the TEMPER_FAULT environment variable.

Reliability tests (kill -9 mid-checkpoint, retention safety, non-finite losses, elastic restarts)
need a process to die or a loss to turn NaN at an exact step on an exact rank. Rather than monkeypatching, the code under test asks
`active(name, step=..., rank=...)` at the one point where the fault belongs, e.g.

    TEMPER_FAULT="kill_during_save:step=6"                  checkpoint.py: SIGKILL mid-write
    TEMPER_FAULT="nan_loss:step=3:rank=1"                   train/step.py: NaN loss on rank 1
    TEMPER_FAULT="crash:step=5:rank=1:once=/tmp/marker"     pretrain loop: crash once, not after restart
    TEMPER_FAULT="sigterm:step=0" / "sigterm_in_eval:step=4"  pretrain loop: SIGTERM to itself mid-step / mid-eval

Several specs are separated by `;`. Keys: `step` and `rank` (either left out means any), and
`once=<path>` (fire only while the marker file does not exist; firing creates it, so a restarted
process does not fail again). With the variable unset, `active` costs one dict lookup.

It does not decide what a fault does (the caller raises, NaNs or calls `kill_now`), and it is
not a test-only module: a user can reproduce a reported failure with the same variable.
"""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass

ENV_VAR = "TEMPER_FAULT"


@dataclass(frozen=True)
class FaultSpec:
    name: str
    step: int | None = None
    """Fire only at this step; None: any step."""
    rank: int | None = None
    """Fire only on this rank; None: any rank."""
    once: str | None = None
    """Marker file: fire only if it does not exist, and create it when firing."""


def parse(text: str) -> tuple[FaultSpec, ...]:
    """Parse `name:key=value:...;name:...`; a malformed spec fails loudly rather than never firing."""
    specs = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        name, *pairs = (p.strip() for p in item.split(":"))
        if not name or "=" in name:
            raise ValueError(f"{ENV_VAR}: spec {item!r} must start with a fault name, e.g. 'crash:step=5'")
        fields: dict[str, int | str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("step", "rank", "once") or not value:
                raise ValueError(f"{ENV_VAR}: bad field {pair!r} in {item!r}; expected step=N, rank=N or once=PATH")
            if key == "once":
                fields[key] = value
            else:
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise ValueError(f"{ENV_VAR}: {key}={value!r} in {item!r} is not an integer") from None
        specs.append(FaultSpec(name, **fields))  # type: ignore[arg-type]
    return tuple(specs)


@functools.lru_cache(maxsize=8)
def _specs(text: str) -> tuple[FaultSpec, ...]:
    # Keyed by the variable's value: parsed once per value, yet a test may change it in-process.
    return parse(text)


def active(name: str, *, step: int, rank: int = 0) -> bool:
    """True when a TEMPER_FAULT spec named `name` matches this step and rank (and its once-marker)."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return False
    for spec in _specs(text):
        if spec.name != name:
            continue
        if spec.step is not None and spec.step != step:
            continue
        if spec.rank is not None and spec.rank != rank:
            continue
        if spec.once is not None and not _claim_marker(spec.once):
            continue
        return True
    return False


def _claim_marker(path: str) -> bool:
    """Create `path` exclusively; False if it already exists (the fault has fired before)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        # O_EXCL makes check-and-create one step, so two processes cannot both fire.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def kill_now() -> None:
    """Die like `kill -9`: no exception, no finally blocks, no atexit, no flushing of buffers."""
    os.kill(os.getpid(), signal.SIGKILL)
