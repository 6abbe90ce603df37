"""The cost of constrained decoding per token, against plain decoding, on one bundle.

For each constraint: the same chat prompt is answered greedily with and without it; the
time spent in the grammar (computing the token mask, applying it to the logits, advancing
the matcher) is timed around those calls alone, and divided by the tokens generated.
Plain decode time per token comes from unconstrained answers of the same length.

    python bench/constrained.py bundles/smollm2-135m-instruct-gguf [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jishi
from jishi.runtime import constraints

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["name", "country", "population", "languages"],
}
CASES = {
    "json_schema": dict(schema=SCHEMA),
    "json_object": dict(json_object=True),
    "regex": dict(regex=r"[A-Z][a-z]+( [a-z]+){3,12}\."),
    "lark": dict(grammar='start: "yes" | "no" | sentence\nsentence: /[A-Za-z ,]{10,80}/ "."'),
}
MESSAGES = [{"role": "user", "content": "Describe Paris as JSON with its name, country, population and languages."}]


class Timed:
    """Wraps the matcher's calls to add up the seconds spent in them."""

    seconds = 0.0
    calls = 0

    @classmethod
    def install(cls):
        for name in ("apply", "accept"):
            original = getattr(constraints.Matcher, name)

            def timed(self, *args, _f=original):
                t = time.perf_counter()
                try:
                    return _f(self, *args)
                finally:
                    cls.seconds += time.perf_counter() - t
                    cls.calls += 1
            setattr(constraints.Matcher, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=f"bench/results/constrained-{time.strftime('%Y%m%d-%H%M')}.json")
    args = ap.parse_args()
    m = jishi.load(args.bundle)
    Timed.install()
    m.chat(MESSAGES, max_new_tokens=8, temperature=0)  # warm up
    rows = []
    for name, kw in CASES.items():
        t = time.perf_counter()
        m.matcher(jishi.runtime.model.pick_constraint(**kw))  # compile (kept for the runs below)
        compile_s = time.perf_counter() - t
        per_token, mask_per_token, plain_per_token, lengths = [], [], [], []
        for _ in range(args.repeats):
            Timed.seconds = 0.0
            t = time.perf_counter()
            r = m.chat(MESSAGES, max_new_tokens=args.tokens, temperature=0, **kw)
            total = time.perf_counter() - t
            n = r.completion_tokens
            lengths.append(n)
            per_token.append(total / n)
            mask_per_token.append(Timed.seconds / n)
            t = time.perf_counter()
            p = m.chat(MESSAGES, max_new_tokens=n, temperature=0, logit_bias={})
            plain_per_token.append((time.perf_counter() - t) / p.completion_tokens)
        row = {"constraint": name, "compile_ms": round(compile_s * 1000, 1), "tokens": statistics.median(lengths),
               "constrained_ms_per_token": round(statistics.median(per_token) * 1000, 3),
               "plain_ms_per_token": round(statistics.median(plain_per_token) * 1000, 3),
               "mask_ms_per_token": round(statistics.median(mask_per_token) * 1000, 3)}
        row["mask_share_of_plain_decode"] = round(row["mask_ms_per_token"] / row["plain_ms_per_token"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"bundle": str(args.bundle), "threads": m.threads, "note": "noisy: a shared 2-core machine", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
