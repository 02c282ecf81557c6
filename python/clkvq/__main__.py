"""python -m clkvq: a small command line over the binding.

    python -m clkvq devices                 the OpenCL devices (index: platform / device)
    python -m clkvq info [--device D]       the chosen device and where libclkvq came from
    python -m clkvq eval --calib DUMP --scheme SPEC [--scheme SPEC ...] [--config FILE ...]
                    [--config-scheme SPEC] [--fit DUMP] [--queries M] [--json] [--device D]
                                            clkvq-eval's table, through the binding
    python -m clkvq tuning [--device D]     what is tuned for the device
    python -m clkvq models                  the model table (name, q:kv:d:l geometry)
    python -m clkvq configs [--device D]    stored configs per model, shipped defaults

Exit status: 0 done, 1 a library or I/O failure, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ._lib import LibraryNotFoundError, library_path
from .config import config_show
from .context import Context, list_devices
from .errors import ClkvqError, InvalidArgumentError
from .evaluate import evaluate_dump
from .models import models
from .spec import parse_spec
from .tuning import tuning_show


def _eval(a: argparse.Namespace) -> int:
    for s in a.scheme:  # every spec checked before anything runs
        parse_spec(s)
    if a.config_scheme:
        parse_spec(a.config_scheme)
    with Context(a.device) as ctx:
        rows = evaluate_dump(ctx, a.calib, a.scheme, a.config, a.config_scheme, a.queries,
                             progress=lambda layer, name, r: print(
                                 f"layer {layer}  {name:40s} rel_err {r.rel_err:.3e}",
                                 file=sys.stderr), fit=a.fit)
    if a.json:
        print(json.dumps({"calib": a.calib, "fit": a.fit, "queries": a.queries,
                          "results": [r.as_dict() for r in rows]}, indent=1))
        return 0
    print(f"| {'scheme':40s} | {'fit':13s} | bits/elem | bits_long |   rel_err |    cosine | "
          "k_rel_err | v_rel_err |")
    print("|:" + "-" * 41 + "|:" + "-" * 13 + "|" + "----------:|" * 6)
    for r in rows:
        print(f"| {r.scheme:40s} | {r.fitted:13s} | {r.bits_per_element:9.4f} | "
              f"{r.bits_long:9.4f} | {r.rel_err:9.3e} | {r.cosine:9.6f} | {r.k_rel_err:9.3e} | "
              f"{r.v_rel_err:9.3e} |")
    if any(r.fitted != "-" for r in rows):
        where = f"on {a.fit}: out of sample" if a.fit else "on this same dump: in-sample"
        print(f"note: calib/perm/center rows are fitted {where}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clkvq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list OpenCL devices")
    info = sub.add_parser("info", help="the device and the library")
    info.add_argument("--device")
    tun = sub.add_parser("tuning", help="what is tuned for the device")
    tun.add_argument("--device")
    ev = sub.add_parser("eval", help="attention-output error of schemes on a dump")
    ev.add_argument("--calib", required=True, help="calibration dump (safetensors)")
    ev.add_argument("--scheme", action="append", default=[], help="a scheme spec (repeatable)")
    ev.add_argument("--config", action="append", default=[], help="a precision config (YAML)")
    ev.add_argument("--config-scheme", help="what the configs leave out")
    ev.add_argument("--fit", help="fit calib/perm/center on this dump instead (out of sample)")
    ev.add_argument("--queries", type=int, default=128, help="positions per layer (128)")
    ev.add_argument("--json", action="store_true", help="one JSON object")
    ev.add_argument("--device")
    sub.add_parser("models", help="the model table")
    cfgs = sub.add_parser("configs", help="stored configs per model and shipped defaults")
    cfgs.add_argument("--device")
    a = p.parse_args(argv)
    if a.command == "eval" and not (a.scheme or a.config):
        p.error("give at least one --scheme or --config")
    try:
        if a.command == "devices":
            print("\n".join(list_devices()))
        elif a.command == "info":
            with Context(a.device) as ctx:
                i = ctx.device_info
                print(f"library: {library_path()}\ndevice:  {i.platform} / {i.name} "
                      f"({'GPU' if i.is_gpu else 'not a GPU'}, {i.compute_units} compute "
                      f"units, {i.global_mem_bytes >> 20} MiB)\nkey:     {i.device_key}")
        elif a.command == "tuning":
            with Context(a.device) as ctx:
                sys.stdout.write(tuning_show(ctx))
        elif a.command == "eval":
            return _eval(a)
        elif a.command == "models":
            for name, g in models().items():
                print(f"{name:20s} {g}")
        elif a.command == "configs":
            with Context(a.device) as ctx:
                sys.stdout.write(config_show(ctx))
        return 0
    except InvalidArgumentError as e:
        print(f"python -m clkvq: {e}", file=sys.stderr)
        return 2
    except (ClkvqError, LibraryNotFoundError, OSError) as e:
        print(f"python -m clkvq: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
