"""Rule engine throughput: indexed (uncached and cached) against a naive first-match scan, in one run.

    python benchmarks/rules.py [--rules 10000] [--lookups 100000] [--naive-lookups 2000]
                               [--platform windows|posix] [--seed 1]

Generates a realistic rule set (mostly exe names, then wildcards, directories, path globs and a few
regexes) and lookups of realistic paths (hits on each kind, and misses), then prints matches per second
for each strategy and the ratios against the naive scan measured in the same run (machines are shared and
noisy: compare ratios, not absolute figures). Every strategy's answers are checked against the others.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from awg_split_tunnel.core.rule_engine import Decision, Rule, RuleEngine
from awg_split_tunnel.process.matcher import ExePath, Pattern, Platform

# Share of each rule kind in the generated set; the rest are exact exe names.
WILDCARDS = 0.15
DIRECTORIES = 0.15
GLOBS = 0.10
REGEXES = 25


class Corpus:
    """Vendor and program names shared by rules and paths, so that lookups hit as well as miss."""

    def __init__(self, rng: random.Random, platform: Platform) -> None:
        self.rng = rng
        self.windows = platform is Platform.WINDOWS

    def word(self) -> str:
        rng = self.rng
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))) + str(rng.randint(0, 999))

    def exe(self, stem: str) -> str:
        return stem + ".exe" if self.windows else stem

    def install_dir(self, vendor: str) -> str:
        if self.windows:
            root = self.rng.choice(["C:\\Program Files", "C:\\Program Files (x86)", "D:\\Apps"])
            return f"{root}\\{vendor.capitalize()}"
        return self.rng.choice(["/opt", "/usr/lib", "/usr/local/lib"]) + "/" + vendor

    def join(self, *parts: str) -> str:
        return ("\\" if self.windows else "/").join(parts)

    def user_dir(self, user: str) -> str:
        return f"C:\\Users\\{user}\\AppData\\Local" if self.windows else f"/home/{user}/.local"


def generate(
    count: int, lookups: int, platform: Platform, seed: int
) -> tuple[list[Rule], list[str], dict[str, int]]:
    """Rules, lookup paths, and how many lookups were drawn to hit each kind (or miss)."""
    rng = random.Random(seed)
    corpus = Corpus(rng, platform)
    rules: list[Rule] = []
    hits: dict[str, list[str]] = {"name": [], "wildcard": [], "directory": [], "glob": [], "regex": []}
    for i in range(count):
        vendor, program = corpus.word(), corpus.word()
        roll = rng.random()
        if i % max(1, count // REGEXES) == 0:
            pattern = f"re:[/\\\\]{vendor}[/\\\\].*{program}(-helper)?(\\.exe)?$"
            hits["regex"].append(
                corpus.join(corpus.install_dir("x"), vendor, corpus.exe(program + "-helper"))
            )
        elif roll < WILDCARDS:
            pattern = f"*{program}*"
            hits["wildcard"].append(corpus.join(corpus.install_dir(vendor), corpus.exe(f"my{program}64")))
        elif roll < WILDCARDS + DIRECTORIES:
            directory = corpus.install_dir(vendor)
            pattern = corpus.join(directory, "")
            hits["directory"].append(corpus.join(directory, "bin", corpus.exe(program)))
        elif roll < WILDCARDS + DIRECTORIES + GLOBS:
            pattern = corpus.join(corpus.user_dir("*"), vendor, "*", corpus.exe(program))
            hits["glob"].append(
                corpus.join(corpus.user_dir(corpus.word()), vendor, "app-1.2", corpus.exe(program))
            )
        else:
            pattern = corpus.exe(program)
            hits["name"].append(corpus.join(corpus.install_dir(vendor), corpus.exe(program)))
        rules.append(Rule(pattern, f"tunnel{i % 8}"))

    # About as many distinct exes as a busy machine runs, each looked up many times (one per new flow).
    distinct = max(1, min(lookups, 20_000))
    misses = [
        corpus.join(corpus.install_dir(corpus.word()), corpus.exe(corpus.word())) for _ in range(distinct)
    ]
    pool: list[str] = []
    drawn_from: list[str] = []
    kinds = list(hits)
    for i in range(distinct):
        if i % 3 == 0:
            pool.append(misses[i])
            drawn_from.append("miss")
        else:
            kind = kinds[i % len(kinds)]
            pool.append(rng.choice(hits[kind]) if hits[kind] else misses[i])
            drawn_from.append(kind if hits[kind] else "miss")
    order = [rng.randrange(distinct) for _ in range(lookups)]
    counts: dict[str, int] = {}
    for i in order:
        counts[drawn_from[i]] = counts.get(drawn_from[i], 0) + 1
    return rules, [pool[i] for i in order], counts


def naive_first_match(patterns: Sequence[Pattern], platform: Platform) -> Callable[[str], int | None]:
    """A linear first-match scan over precompiled patterns: the baseline."""

    def match(path: str) -> int | None:
        exe = ExePath.parse(path, platform)
        for index, pattern in enumerate(patterns):
            if pattern.matches_exe(exe):
                return index
        return None

    return match


def rate(function: Callable[[str], object], paths: Sequence[str]) -> tuple[float, list[object]]:
    started = time.perf_counter()
    answers = [function(path) for path in paths]
    return len(paths) / (time.perf_counter() - started), answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--naive-lookups", type=int, default=2_000)
    parser.add_argument("--platform", choices=[p.value for p in Platform], default=Platform.WINDOWS.value)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    platform = Platform(args.platform)

    started = time.perf_counter()
    rules, paths, counts = generate(args.rules, args.lookups, platform, args.seed)
    compiled_at = time.perf_counter()
    uncached_engine = RuleEngine(rules, "direct", platform, cache_size=0)
    build_seconds = time.perf_counter() - compiled_at
    cached_engine = RuleEngine(rules, "direct", platform)
    naive = naive_first_match(uncached_engine.patterns, platform)

    kinds = ", ".join(f"{k}={n}" for k, n in Counter(p.kind.value for p in uncached_engine.patterns).items())
    print(f"platform {platform.value}: {len(rules)} rules ({kinds})")
    print(f"lookups: {len(paths)} ({', '.join(f'{k}={v}' for k, v in sorted(counts.items()))})")
    print(f"generated in {compiled_at - started:.2f} s; engine built in {build_seconds * 1000:.0f} ms")

    def index_of(decision: Decision) -> int | None:
        return decision.rule_index

    uncached_rate, uncached = rate(lambda p: index_of(uncached_engine.match(p)), paths)
    cached_rate, cached = rate(lambda p: index_of(cached_engine.match(p)), paths)
    warm_rate, warm = rate(lambda p: index_of(cached_engine.match(p)), paths)
    subset = paths[: args.naive_lookups]
    naive_rate, naive_answers = rate(naive, subset)

    if cached != uncached or warm != uncached or naive_answers != uncached[: len(subset)]:
        print("MISMATCH: strategies disagree", file=sys.stderr)
        return 1
    matched = sum(answer is not None for answer in uncached)
    print(f"matched {matched} of {len(paths)} lookups; all strategies agree")
    print(f"naive first-match scan : {naive_rate:>12,.0f} matches/s  ({len(subset)} lookups)")
    print(f"indexed, uncached      : {uncached_rate:>12,.0f} matches/s  ({len(paths)} lookups)")
    print(f"indexed, cached (cold) : {cached_rate:>12,.0f} matches/s  ({len(paths)} lookups, empty cache)")
    print(f"indexed, cached (warm) : {warm_rate:>12,.0f} matches/s  ({len(paths)} lookups, all cached)")
    print(f"indexed/naive          : {uncached_rate / naive_rate:>12,.1f}x")
    print(f"cached (cold)/naive    : {cached_rate / naive_rate:>12,.1f}x")
    print(f"cached (warm)/naive    : {warm_rate / naive_rate:>12,.1f}x")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
