"""What both benchmarks share: interleaved timing rounds, and the JSON they write."""

import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax


def interleaved_times(calls: dict[str, Callable[[], float]], *, min_repeats: int,
                      budget_s: float, max_repeats: int = 10_000) -> tuple[dict, int]:
    """Times each call once per round, for at least `min_repeats` rounds and `budget_s` seconds.

    Each call runs one step and returns its own wall time. The order rotates from round to
    round, so that no call always runs right after the same neighbour; noise from the rest of
    the machine then hits every call alike. Returns the times per name and the rounds run.
    """
    names = list(calls)
    times = {name: [] for name in names}
    start, repeat = time.perf_counter(), 0
    while repeat < min_repeats or (time.perf_counter() - start < budget_s
                                   and repeat < max_repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(calls[name]())
        repeat += 1
    return times, repeat


def interleaved_train_steps(runs: dict[str, list], *, min_repeats: int, budget_s: float,
                            warmup: int = 3) -> tuple[dict, int]:
    """`interleaved_times` of jitted train steps, after `warmup` steps of each (compiling).

    `runs[name]` is `[train_step, state, batch]`; each step's new state replaces the old one,
    which the step donates. Each time includes `block_until_ready` on the state and metrics.
    """
    def step(name):
        train_step, state, batch = runs[name]
        start = time.perf_counter()
        state, metrics = train_step(state, *batch)
        jax.block_until_ready((state, metrics))
        runs[name][1] = state
        return time.perf_counter() - start

    for name in runs:
        for _ in range(warmup):
            step(name)
    return interleaved_times({name: functools.partial(step, name) for name in runs},
                             min_repeats=min_repeats, budget_s=budget_s)


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median of the per-round ratios: less sensitive to slow drifts than a ratio of medians."""
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def device_line(**versions: str) -> str:
    device = jax.devices()[0]
    extra = "".join(f", {name} {version}" for name, version in versions.items())
    return (f"# {device.platform} {device.device_kind}, {jax.device_count()} device(s), "
            f"jax {jax.__version__}{extra}")


def write_json(path: Path | None, results: list[dict], **extra) -> None:
    """Writes the results with the device, machine and versions they came from (if `path`)."""
    if path is None:
        return
    device = jax.devices()[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": f"{device.platform} {device.device_kind}",
        "device_count": jax.device_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "jax": jax.__version__,
        **extra,
        "results": results,
    }, indent=2))
    print(f"# wrote {path}")
