"""Write the README's Results section, and redraw its figures, from the benchmarks' JSON files.

    python -m benchmarks.report              # rewrite README.md between the markers, redraw
    python -m benchmarks.report --check      # fail if README.md is not what the JSON says

Reads benchmarks/results/{transport,transport-netns,study-*,vs-ddp,load,
transport-compression,across-hosts,chaos}/
(written by the benchmarks with ``--out``); a section whose file is missing is left out.
Each study-* directory (benchmarks.sync_vs_async's results.json) gets its table and
figures, and the studies together a "Which mode and rule, when" table computed from them
(benchmarks.study.which_rule_when).
Each figure is drawn by its benchmark's own ``plot`` from the same JSON the benchmark
wrote, so a change to a plot shows in the README without running the benchmark again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchmarks.across_hosts
import benchmarks.chaos
import benchmarks.load
import benchmarks.transport
import benchmarks.vs_ddp
from benchmarks import study, sync_vs_async
from benchmarks.machine import describe
from benchmarks.transport import compression_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
STUDIES = "study-*"  # benchmarks.sync_vs_async's studies, one directory per setting
KIB, MIB = 1 << 10, 1 << 20


def _size(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def _gbps(value: float) -> str:
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _rel(path: Path) -> str:
    """A path as the README links it: relative to the repository when inside it."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def _provenance(result: dict) -> list[str]:
    return [
        f"Measured on {describe(result['machine'])}. Reproduce with:",
        "",
        "```sh",
        f".venv/bin/{result['command']}",
        "```",
        "",
    ]


def _met(measured: float | None, goal: float, lower_is_better: bool = False) -> str:
    if measured is None:
        return "not measured"
    ok = measured <= goal if lower_is_better else measured >= goal
    return "met" if ok else "**missed**"


TRANSPORT_TITLES = {
    "loopback": "Transport on one host",
    "netns": "Transport across hosts (network namespaces)",
}


def transport(result: dict, directory: Path) -> list[str]:
    sizes, counts = result["sizes"], result["servers"]
    hosts = result.get("hosts", "loopback")
    paths = result.get("paths", ["tcp", "unix", "shm"])
    rows = {(r["bytes"], r["servers"], r["path"]): r for r in result["results"]}
    where = (
        "the client in one namespace, each server and reference peer on a host of its own"
        if hosts == "netns"
        else "every process on this host"
    )
    lines = [
        f"### {TRANSPORT_TITLES[hosts]}",
        "",
        *_provenance(result),
        "Push plus pull of one float32 model from one client, GB/s (both directions "
        "counted), through "
        + ", ".join(str(c) for c in counts)
        + f" servers, {where}; raw TCP and torch rpc move the same bytes between two "
        "processes:",
        "",
        "| size | raw TCP | torch rpc | "
        + " | ".join(f"{p} ({'/'.join(map(str, counts))} servers)" for p in paths)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(paths),
    ]
    for n in sizes:
        cells = ["/".join(_gbps(rows[n, c, p]["push_pull_gbps"]) for c in counts) for p in paths]
        lines.append(
            f"| {_size(n)} | {_gbps(result['raw_tcp'][str(n)]['gbps'])} | "
            f"{_gbps(result['torch_rpc'][str(n)]['push_pull_gbps'])} | " + " | ".join(cells) + " |"
        )
    t = result["targets"]
    step = t["step_vs_gloo_allreduce"]
    lines += [
        "",
        "Targets, worst case over tensors of 16 MiB and more:",
        "",
        "| target | goal | measured | |",
        "|---|---:|---:|---|",
    ]
    for key, (what, _, lower) in benchmarks.transport.TARGETS.items():
        if key in t:
            lines.append(_target_row(what, t[key], lower_is_better=lower))
    for path in paths:
        lines.append(
            _target_row(
                f"step over {path} / gloo all-reduce (as many processes)",
                {"goal": step["goal"], "measured": step["measured"][path]},
                lower_is_better=True,
            )
        )
    lat = result["latency"]
    lines += [
        "",
        "A tiny push (one float) takes "
        + ", ".join(
            f"{v['tiny_push_s'] * 1e6:.0f} us over {p} (a bare gRPC round trip to the same "
            f"server {v['grpc_round_trip_s'] * 1e6:.0f} us)"
            for p, v in lat.items()
        )
        + ".",
        "",
        f"![transport]({_rel(directory / 'transport.png')})",
        "",
    ]
    return lines


def _target_row(name: str, target: dict, lower_is_better: bool = False) -> str:
    measured, goal = target["measured"], target["goal"]
    sign = "<=" if lower_is_better else ">="
    shown = "-" if measured is None else f"{measured:.2f}"
    return f"| {name} | {sign} {goal} | {shown} | {_met(measured, goal, lower_is_better)} |"


# Sections that are a benchmark's own table: (directory, JSON file, title, table, images).
TABLES = [
    ("vs-ddp", "vs_ddp.json", "Against DistributedDataParallel", benchmarks.vs_ddp.markdown,
     [("vs DDP", "vs_ddp.png")]),
    ("load", "load.json", "Many clients at once", benchmarks.load.markdown, [("load", "load.png")]),
    ("transport-compression", "compression.json", "Compression on the wire",
     lambda r: "\n".join(compression_markdown(r["compression"])).lstrip() + "\n", []),
    ("across-hosts", "across_hosts.json", "One host against six", benchmarks.across_hosts.markdown,
     []),
    ("chaos", "chaos.json", "A SIGKILL mid-job", benchmarks.chaos.markdown, []),
]  # fmt: skip

# Who draws each figure from a result: (directory, JSON file) -> plot(result, directory).
TRANSPORTS = ("transport", "transport-netns")  # on one host, across hosts
PLOTS = {
    **{
        (name, "transport.json"): lambda r, d: benchmarks.transport.plot(r, d / "transport.png")
        for name in TRANSPORTS
    },
    ("vs-ddp", "vs_ddp.json"): benchmarks.vs_ddp.plot,
    ("load", "load.json"): benchmarks.load.plot,
}


def studies(results: Path = RESULTS) -> list[tuple[Path, dict]]:
    """Each study's directory and results.json, by workers then name."""
    found = [(d, _load(d / "results.json")) for d in results.glob(STUDIES) if d.is_dir()]
    found = [(d, r) for d, r in found if r is not None]
    return sorted(found, key=lambda dr: (dr[1]["workers"], dr[0].name))


def redraw(results: Path = RESULTS) -> list[Path]:
    """Draw every figure again from its JSON file (those whose file exists)."""
    drawn = []
    for directory, result in studies(results):
        sync_vs_async.plot(result, directory)
        drawn.append(directory)
    for (name, file), plot in PLOTS.items():
        data = _load(results / name / file)
        if data is not None:
            plot(data, results / name)
            drawn.append(results / name)
    return drawn


STUDY_IMAGES = [
    ("accuracy against time", "accuracy_time.png"),
    ("accuracy against samples", "accuracy_samples.png"),
    ("staleness", "staleness.png"),
]


def study_sections(results: Path = RESULTS) -> list[str]:
    """A section per study, then the "which mode and rule, when" table of them all."""
    found = studies(results)
    lines: list[str] = []
    for directory, result in found:
        title = f"Modes and rules: {study.setting(result)}"
        lines += table_section(result, directory, title, study.markdown, STUDY_IMAGES)
    if found:
        measured = [r for _, r in found]
        lines += ["### Which mode and rule, when", "", study.which_rule_when(measured)]
        lines += ["Targets, from the same runs:", "", study.targets(measured)]
    return lines


def table_section(
    result: dict, directory: Path, title: str, table, images: list[tuple[str, str]]
) -> list[str]:
    lines = [f"### {title}", "", *_provenance(result), table(result)]
    if images:
        lines += [" ".join(f"![{alt}]({_rel(directory / name)})" for alt, name in images), ""]
    return lines


def section(results: Path = RESULTS) -> str:
    """The Results section's body, from whatever JSON files exist."""
    parts: list[str] = [
        "Generated by `python -m benchmarks.report` from the JSON files in "
        f"`{_rel(results)}/`; each benchmark's `--quick` form runs in the tests.",
        "",
    ]
    for name in TRANSPORTS:
        data = _load(results / name / "transport.json")
        if data is not None:
            parts += transport(data, results / name)
    parts += study_sections(results)
    for name, file, title, table, images in TABLES:
        data = _load(results / name / file)
        if data is not None:
            parts += table_section(data, results / name, title, table, images)
    return "\n".join(parts).rstrip() + "\n"


def render(readme: str, body: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="only check the README is current")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    wanted = render(current, section(args.results.resolve()))
    if args.check:
        if wanted != current:
            print(f"{args.readme}: the Results section is stale; run python -m benchmarks.report")
            return 1
        print(f"{args.readme}: Results section is current")
        return 0
    args.readme.write_text(wanted)
    print(f"wrote the Results section of {args.readme}")
    for directory in redraw(args.results.resolve()):
        print(f"redrew the figures in {_rel(directory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
