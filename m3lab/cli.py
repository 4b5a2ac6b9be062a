"""`m3lab` command line: run the DAG, list its stages, show resolved params, stop stray servers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from m3lab import digest, plan, serve, wheelhouse
from m3lab.dag import RunError, run
from m3lab.params import DEFAULT_PROFILE, ParamsError, load_params
from m3lab.plan import PlanError
from m3lab.quant import inspector
from m3lab.registry import STAGES, RegistryError
from m3lab.stage import StageError, results_root
from m3lab.wheelhouse import WheelhouseError

__all__ = ["main"]


def _cmd_run(a: argparse.Namespace) -> int:
    rep = run(a.params, only=a.only, from_=a.from_, force=a.force)
    print(f"index: {rep.index_html}")
    return 0 if rep.status == "ok" else 1


def _cmd_stages(a: argparse.Namespace) -> int:
    for i, st in enumerate(STAGES.values(), 1):
        deps = ", ".join(st.deps) or "—"
        print(f"{i}. {st.name:<12} notebooks/{st.notebook:<22} params: {', '.join(st.sections):<24} after: {deps}")
    return 0


def _cmd_show(a: argparse.Namespace) -> int:
    p = load_params(a.params)
    sys.stdout.write(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    sys.stdout.write(plan.format_plan(plan.make_plan(load_params(a.params))))
    return 0


def _cmd_wheelhouse(a: argparse.Namespace) -> int:
    house = wheelhouse.build_wheelhouse(Path(a.out_dir), a.requirements or None, a.python_version,
                             [Path(p) for p in a.provided])
    size = sum((Path(a.out_dir) / w["file"]).stat().st_size for w in house.wheels)
    print(f"{len(house.wheels)} wheels ({size / 2**20:.1f} MiB) in {a.out_dir}, {len(house.skipped)} skipped "
          f"(provided or never carried); on the host: bash {a.out_dir}/install.sh /tmp/m3lab-site")
    return 0


def _cmd_stop(a: argparse.Namespace) -> int:
    run_dir = Path(a.run_dir) if a.run_dir else results_root() / a.profile / "interactive"
    stopped = serve.stop_all(run_dir)
    print(f"stopped {len(stopped)} server(s) recorded under {run_dir / 'servers'}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    return inspector.main([a.model_dir] + (["--json"] if a.json else []))


def _cmd_compare(a: argparse.Namespace) -> int:
    from m3lab import compare

    return compare.main(a.run_a, a.run_b, a.gpu_memory_gib)


def _cmd_verify(a: argparse.Namespace) -> int:
    return digest.main(a.paths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="m3lab", description="Reproduce quantized MiniMax-M3 results: "
                                 "download → quantize → serve → correctness → needle → benchmark → plot.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the DAG for a params profile (default: the embedded tiny model on CPU)")
    r.add_argument("params", nargs="?", default=None, help=f"profile name or YAML path (default {DEFAULT_PROFILE})")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STAGE", help="run just this stage (reusing earlier outputs upstream)")
    g.add_argument("--from", dest="from_", metavar="STAGE", help="re-run this stage and everything after it")
    r.add_argument("--force", action="store_true", help="re-run stages even if unchanged")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("stages", help="list the stages in DAG order")
    s.set_defaults(fn=_cmd_stages)

    sh = sub.add_parser("show", help="print the resolved (merged, validated) params of a profile")
    sh.add_argument("params", nargs="?", default=None)
    sh.set_defaults(fn=_cmd_show)

    pl = sub.add_parser("plan", help="print every command a profile would run and its memory plan; runs nothing")
    pl.add_argument("params", nargs="?", default=None)
    pl.set_defaults(fn=_cmd_plan)

    wh = sub.add_parser("wheelhouse", help="write the wheels m3lab needs on an offline host (versions as tested here)")
    wh.add_argument("out_dir")
    wh.add_argument("requirements", nargs="*", help="distributions to carry (default: what a batch DAG run needs)")
    wh.add_argument("--python-version", default="3.12", help="the host's Python (default 3.12)")
    wh.add_argument("--provided", action="append", default=[], metavar="FILE",
                    help="pip-freeze/lock file or name list of what the host already has (repeatable)")
    wh.set_defaults(fn=_cmd_wheelhouse)

    ins = sub.add_parser("inspect", help="a checkpoint folder's bits per weight, formats, exclusions and "
                         "shared-expert check (exit 1 when a check fails)")
    ins.add_argument("model_dir")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.set_defaults(fn=_cmd_inspect)

    ve = sub.add_parser("verify", help="re-hash every cached checkpoint the runs under PATH used; exit 1 if any "
                        "file changed or is missing")
    ve.add_argument("paths", nargs="+", metavar="PATH", help="a run folder, a profile folder or a results folder")
    ve.set_defaults(fn=_cmd_verify)

    co = sub.add_parser("compare", help="run B against run A cell for cell (needle, numerics, evals, prompts; "
                        "benchmark ratio) and B's memory plan against vLLM's start-up facts; exit 1 if they differ")
    co.add_argument("run_a")
    co.add_argument("run_b")
    co.add_argument("--gpu-memory-gib", type=float, default=None,
                    help="the GPU B really ran on, if not the profile's hardware file's (nvidia-smi memory.total)")
    co.set_defaults(fn=_cmd_compare)

    st = sub.add_parser("stop", help="stop servers left running by interactive notebook sessions")
    st.add_argument("profile", nargs="?", default=DEFAULT_PROFILE)
    st.add_argument("--run-dir", default=None, help="a run folder (default results/<profile>/interactive)")
    st.set_defaults(fn=_cmd_stop)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ParamsError, RunError, StageError, PlanError, WheelhouseError, RegistryError) as e:
        print(f"m3lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
