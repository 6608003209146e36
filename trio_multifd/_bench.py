"""The benchmark: trio_multifd against what one would use instead, process against
process, case by case (one run of a case: :mod:`._benchrun`; its data: :mod:`._benchdata`).
Cases are interleaved within each repeat, each trio_multifd run right after the baseline
with as many connections (and QEMU's multifd right after it, with ``qemu``).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from ._benchdata import MIB
from ._benchrun import RunResult, run_once
from ._qemu_bench import QEMU_METHODS, run_qemu_once

__all__ = [
    "Case",
    "CaseResult",
    "format_table",
    "make_cases",
    "run_bench",
]


# -- cases and the whole benchmark ------------------------------------------------------------


@attrs.frozen
class Case:
    """One benchmark case: an implementation at a connection count, method and data."""

    impl: str
    channels: int
    compression: str
    data: str

    @property
    def raw_impl(self) -> str:
        """The baseline with the same connection count."""
        return "raw_socket" if self.channels == 1 else "raw_socket_threads"

    def baseline(self) -> Case:
        """The case this one is compared with."""
        return Case(self.raw_impl, self.channels, "none", self.data)

    def counterpart(self) -> Case:
        """The trio_multifd case of the same channels, method and data."""
        return Case("trio_multifd", self.channels, self.compression, self.data)


@attrs.define
class CaseResult:
    """A case's runs over every repeat."""

    case: Case
    size: int
    known_zero: bool = False
    io_threads: int | None = None
    runs: list[RunResult] = attrs.Factory(list)
    ratios: list[float] = attrs.Factory(list)
    qemu_ratios: list[float] | None = None
    """Per-repeat ratios to QEMU's multifd (a trio_multifd case, when QEMU ran)."""

    @property
    def verified(self) -> bool:
        """Whether every run delivered an identical copy."""
        return bool(self.runs) and all(r.verified for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        """The case as the ``--json`` object (see docs/performance.rst)."""
        ok = [r for r in self.runs if r.verified]
        gb = self.size / 1e9

        # Figures over the verified runs; none verified, nothing measured: null.
        def med(values: Iterable[float]) -> float | None:
            values = list(values)
            return round(statistics.median(values), 4) if values else None

        def peak(values: Iterable[float], less: float) -> float | None:
            values = list(values)
            return round(max(values) - less, 1) if values else None

        # A known-zero trio_multifd target is never touched where the data is zero:
        # nothing of it to subtract, the figure is the whole peak (an upper bound).
        target = 0 if self.known_zero and self.case.impl == "trio_multifd" else self.size
        obj: dict[str, Any] = {
            "impl": self.case.impl,
            "channels": self.case.channels,
            "compression": self.case.compression,
            "data": self.case.data,
            "bytes": self.size,
            # A failed run has no speed: null, keeping the list aligned with the repeats.
            "gbps": [round(r.gbps, 4) if r.verified else None for r in self.runs],
            "gbps_median": med(r.gbps for r in ok),
            "verified": self.verified,
            "sender_cpu_s_per_gb": med(r.sender_cpu_s / gb for r in ok),
            "receiver_cpu_s_per_gb": med(r.receiver_cpu_s / gb for r in ok),
            "sender_peak_rss_mib": peak((r.sender_rss_mib for r in ok), 0),
            "receiver_peak_rss_mib": peak((r.receiver_rss_mib for r in ok), 0),
            # Beyond the spec'd fields: RSS less the data buffer each side holds (the
            # source or the target, which counts in RSS once touched), and the load.
            "sender_rss_beyond_data_mib": peak((r.sender_rss_mib for r in ok), self.size / MIB),
            "receiver_rss_beyond_target_mib": peak((r.receiver_rss_mib for r in ok), target / MIB),
            "load_1m": [round(r.load, 2) for r in self.runs],
        }
        if self.case.impl == "trio_multifd":
            obj["raw_impl"] = self.case.raw_impl
            obj["io_threads"] = self.io_threads
            # No ratios without baselines: null then.
            obj["ratio_to_raw"] = med(self.ratios)
            if self.qemu_ratios is not None:
                obj["ratio_to_qemu"] = med(self.qemu_ratios)
            wire = [r.sender.get("wire_bytes") for r in ok if r.sender.get("wire_bytes")]
            if wire:
                obj["wire_bytes"] = wire[0]
        errors = [r.error for r in self.runs if r.error]
        if errors:
            obj["error"] = errors[0]
        return obj


def make_cases(
    *,
    channels: Sequence[int],
    compressions: Sequence[str],
    data: Sequence[str],
    baselines: bool,
    qemu: bool = False,
) -> list[Case]:
    """The cases of one repeat, in the order they run: per data kind, per connection
    count, the baseline right before the trio_multifd runs it is compared with; with
    ``qemu``, QEMU's multifd right after each trio_multifd run of a method it has."""
    cases: list[Case] = []
    for kind in data:
        if baselines:
            cases.append(Case("naive_trio", 1, "none", kind))
        for count in channels:
            if baselines:
                cases.append(Case("trio_multifd", count, "none", kind).baseline())
            for method in compressions:
                cases.append(Case("trio_multifd", count, method, kind))
                if qemu and method in QEMU_METHODS:
                    cases.append(Case("qemu_multifd", count, method, kind))
    return cases


def run_bench(
    *,
    size: int,
    channels: Sequence[int],
    compressions: Sequence[str],
    data: Sequence[str],
    repeat: int,
    baselines: bool,
    level: int | None = None,
    known_zero: bool = False,
    io_threads: int | None = None,
    qemu: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> list[CaseResult]:
    """Run every case ``repeat`` times, interleaved within each repeat.

    ``qemu`` is the path of a ``qemu-system-x86_64`` to run QEMU's own multifd on the
    same data after each trio_multifd case (see ``_qemu_bench``); ``None`` skips it.

    With ``known_zero`` every receiver starts from fresh, untouched memory (no pattern
    fill), and trio_multifd's target is a known-zero block (``RAMBlock(zeroed=True)``).
    ``io_threads`` goes to both ends of the trio_multifd runs (``None``: their default).
    """
    cases = make_cases(
        channels=channels,
        compressions=compressions,
        data=data,
        baselines=baselines,
        qemu=qemu is not None,
    )
    results = {case: CaseResult(case, size, known_zero, io_threads) for case in cases}
    for case in cases:
        if case.impl == "qemu_multifd":
            results[case.counterpart()].qemu_ratios = []
    total = len(cases) * repeat
    done = 0
    for rep in range(repeat):
        for case in cases:
            run = _runner(case, qemu=qemu, known_zero=known_zero, io_threads=io_threads)(
                channels=case.channels,
                compression=case.compression,
                data=case.data,
                size=size,
                level=level if case.compression != "none" else None,
                seed=rep,
            )
            done += 1
            status = f"{run.gbps:.2f} GB/s" if run.verified else f"FAILED: {run.error}"
            progress(
                f"[{done}/{total}] repeat {rep + 1}: {case.impl} ch={case.channels}"
                f" {case.compression} {case.data}: {status} (load {run.load:.2f})"
            )
            results[case].runs.append(run)
            if case.impl == "trio_multifd" and baselines:
                base = results[case.baseline()].runs
                ratio = _ratio(run, base[-1]) if len(base) == rep + 1 else None
                if ratio is not None:
                    results[case].ratios.append(ratio)
            if case.impl == "qemu_multifd":
                ours = results[case.counterpart()]
                assert ours.qemu_ratios is not None, "set for every QEMU counterpart"
                ratio = _ratio(ours.runs[-1], run)
                if ratio is not None:
                    ours.qemu_ratios.append(ratio)
    return list(results.values())


def _ratio(ours: RunResult, theirs: RunResult) -> float | None:
    """One repeat's ratio of a trio_multifd run to the run it is compared with, when
    both verified."""
    return ours.gbps / theirs.gbps if ours.verified and theirs.verified else None


def _runner(
    case: Case, *, qemu: str | None, known_zero: bool, io_threads: int | None
) -> Callable[..., RunResult]:
    """What runs ``case``: a QEMU migration, or a pair of this module's processes."""
    if case.impl == "qemu_multifd":
        assert qemu is not None, "a qemu_multifd case needs a QEMU binary"
        return functools.partial(run_qemu_once, qemu, known_zero=known_zero)
    return functools.partial(run_once, case.impl, known_zero=known_zero, io_threads=io_threads)


def format_table(results: Sequence[CaseResult]) -> str:
    """The people's table: medians, spread, ratio (and to QEMU, when it ran), CPU and
    memory per side."""
    with_qemu = any(result.qemu_ratios is not None for result in results)
    header = (
        f"{'impl':<19} {'ch':>2} {'method':<6} {'data':<12} {'GB/s':>6} {'min-max':>11}"
        f" {'ratio':>6}{' /qemu' if with_qemu else ''}"
        f" {'CPU s/GB snd/rcv':>16} {'RSS+ MiB snd/rcv':>16} {'ok':>3}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        obj = result.to_json()
        runs = [gbps for gbps in obj["gbps"] if gbps is not None]
        spread = f"{min(runs):.2f}-{max(runs):.2f}" if runs else "-"
        ratio = obj.get("ratio_to_raw")
        ratio_text = f"{ratio:.2f}" if isinstance(ratio, float) else ""
        to_qemu = obj.get("ratio_to_qemu")
        qemu_text = f" {to_qemu:>5.2f}" if isinstance(to_qemu, float) else " " * 6
        cpu = _pair(obj["sender_cpu_s_per_gb"], obj["receiver_cpu_s_per_gb"], ".2f")
        rss = _pair(
            obj["sender_rss_beyond_data_mib"], obj["receiver_rss_beyond_target_mib"], ".0f"
        )
        median = "-" if obj["gbps_median"] is None else f"{obj['gbps_median']:.2f}"
        lines.append(
            f"{obj['impl']:<19} {obj['channels']:>2} {obj['compression']:<6} {obj['data']:<12}"
            f" {median:>6} {spread:>11} {ratio_text:>6}"
            f"{qemu_text if with_qemu else ''} {cpu:>16} {rss:>16}"
            f" {'yes' if obj['verified'] else 'NO':>3}"
        )
    return "\n".join(lines)


def _pair(sender: float | None, receiver: float | None, spec: str) -> str:
    """A sender/receiver column of the table: ``-`` for what was not measured."""
    return "/".join("-" if value is None else format(value, spec) for value in (sender, receiver))
