"""A/B of the `gptx` command's huge-page switch (gptx/launcher.py): the same `gptx bench` with GPTX_HUGE_PAGES=0
and with the default, in interleaved rounds, so the machine's drift hits both arms alike.

Each round runs both arms once, in a fresh random order, each in its own process (glibc reads the tunable only
at process start). Ratios are medians of per-round ratios (on / off).

    python benchmarks/huge_pages_ab.py --workdir /tmp/hp --rounds 6 --json /tmp/hp/ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from harness import export_variant, log  # also puts the repository root on sys.path

from gptx.launcher import OPT_OUT, TUNABLE

METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_mib")


def arm_environment(environ: dict[str, str], huge_pages: bool) -> dict[str, str]:
    """The environment of one arm: on leaves the tunable to the `gptx` launcher; off opts out and drops the
    tunable (only ours: other glibc tunables the user set stay)."""
    env = {**environ, OPT_OUT: "1" if huge_pages else "0"}
    if not huge_pages:
        kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
        if kept:
            env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def bench(gptx: str, directory: Path, prompt_len: int, huge_pages: bool, out: Path, new_tokens: int = 128,
          runs: int = 3) -> dict:
    """One `gptx bench` run in a fresh process; its single result row and the tunables it ran with."""
    subprocess.run([gptx, "bench", str(directory), "--runs", str(runs), "--compare", "none",
                    "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--json", str(out)],
                   env=arm_environment(dict(os.environ), huge_pages), check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    row = report["results"][0]
    return {**{k: row[k] for k in METRICS}, "glibc_tunables": report["machine"].get("glibc_tunables")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="exports are made (or reused) here")
    ap.add_argument("--modes", default="fp32,int4", help="comma-separated: fp32 and/or gptx presets")
    ap.add_argument("--prompt-lens", default="32,512", help="32 gives decode at short context; 512 prefill")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # the gptx installed beside this interpreter first (a venv not activated), then PATH
    gptx = shutil.which("gptx", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if gptx is None:
        sys.exit("the gptx command is not on PATH: pip install -e . first")
    rng = random.Random(0)
    results = {}
    for mode in args.modes.split(","):
        directory = args.workdir / mode
        export_variant("random:gpt2", directory, None if mode == "fp32" else mode, reuse=True)
        for prompt_len in (int(p) for p in args.prompt_lens.split(",")):
            rounds = []
            for r in range(args.rounds):
                arms = [True, False]
                rng.shuffle(arms)
                row = {arm: bench(gptx, directory, prompt_len, arm, args.workdir / "bench.json") for arm in arms}
                rounds.append({"on": row[True], "off": row[False]})
                log(f"{mode} prompt {prompt_len} round {r + 1}: decode on {row[True]['decode_tokens_per_s']:.1f} "
                    f"off {row[False]['decode_tokens_per_s']:.1f}")
            summary = {f"{k}_ratio_on_off": statistics.median(x["on"][k] / x["off"][k] for x in rounds)
                       for k in METRICS[:2]}
            summary.update({f"{k}_median_{arm}": statistics.median(x[arm][k] for x in rounds)
                            for k in METRICS for arm in ("on", "off")})
            summary["peak_rss_mib_diff_median"] = statistics.median(
                x["on"]["peak_rss_mib"] - x["off"]["peak_rss_mib"] for x in rounds)
            results[f"{mode} prompt {prompt_len}"] = {"summary": summary, "rounds": rounds}
            print(f"{mode} prompt {prompt_len}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
