"""Try bad and hostile inputs on every command and write docs/reliability.md.

Each case runs ``magnet ...`` in a fresh process on a small synthetic slide (written,
prepared, encoded and trained once, ~1 minute), then records the exit code and the last
line of stderr. A case is *clean* when the command exits 2 with one line that names the
problem (no "unexpected", no traceback, no torch advice to load a file unsafely) and
leaves nothing behind (no output folder it was refused before making, no file outside
the folders it was given).

    python benchmarks/reliability.py                     # writes docs/reliability.md
    python benchmarks/reliability.py --work /tmp/rel --out -   # print the table only
"""

from __future__ import annotations

import argparse
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    argv: list[str]
    must_not_exist: list[str] = field(default_factory=list)  # relative to the work folder
    setup: Callable[[Path], None] | None = None
    shell: str = ""  # run through bash after this prefix (e.g. "ulimit -f 64;")
    hold: str = ""  # a folder another magnet-st run holds while this case runs


def magnet(
    work: Path, argv: list[str], timeout: float = 600, shell: str = ""
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "magnet_st", *argv]
    if shell:
        cmd = ["bash", "-c", f"{shell} exec {shlex.join(cmd)}"]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


HOLDER = """
import sys, time
from magnet_st.util.lock import hold
with hold(sys.argv[1], "magnet features"):
    print("held", flush=True)
    time.sleep(120)
"""


def build(work: Path) -> None:
    """A 0.3 mm synthetic slide, its dataset, dense features and a one-epoch model."""
    steps = [
        ["synth", "slide", "--size-mm", "0.3", "--seed", "1", "--genes", "60", "--quiet"],
        ["synth", "other", "--size-mm", "0.3", "--seed", "2", "--genes", "60", "--quiet"],
        ["prepare", "ds", "slide", "--n-genes", "30", "--quiet"],
        ["features", "ds", "--encoder", "mobilenetv3_small_050", "--levels", "bin", "spot",
         "region", "--dense-mpp", "1", "--quiet"],
        ["train", "ds", "model", "--features", "mobilenetv3_small_050", "--epochs", "1",
         "--width", "16", "--max-batches", "2", "--train-slides", "slide", "--val-slides",
         "--quiet"],
    ]  # fmt: skip
    for argv in steps:
        done = {"synth": "slide", "prepare": "ds/manifest.json", "train": "model/model.pt"}
        target = work / (argv[1] if argv[0] == "synth" else done.get(argv[0], "_"))
        if argv[0] == "features" and list((work / "ds" / "features").glob("*/meta.json")):
            continue
        if target.exists() and argv[0] != "features":
            continue
        res = magnet(work, argv)
        if res.returncode != 0:
            sys.exit(f"setup step {argv[:2]} failed:\n{res.stderr[-2000:]}")


def _files(work: Path) -> None:
    import torch

    (work / "random.pt").write_bytes(bytes(range(256)) * 64)
    torch.save({"w": torch.ones(2), "p": Path("/etc")}, work / "object.pt")
    (work / "plain.pkl").write_bytes(pickle.dumps({"x": print}))
    (work / "afile").write_text("not a folder")
    (work / "path_only.csv").write_text("path\nslide\n")
    (work / "escape.csv").write_text("name,path\n../../escaped,slide\n")
    (work / "absolute.csv").write_text("name,path\n/tmp/abs_escape,slide\n")
    (work / "bad_config.toml").write_text('n_genes = "ten"\n')
    import h5py

    zero = work / "zero"
    if not zero.exists():
        shutil.copytree(work / "slide", zero)
        h5 = zero / "outs" / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5"
        with h5py.File(h5, "r+") as f:
            f["matrix/data"][...] = 0
    payload = torch.load(work / "model" / "model.pt", weights_only=True)
    torch.save({**payload, "format_version": 99}, work / "model_v99.pt")
    torch.save({k: v for k, v in payload.items() if k != "genes"}, work / "model_nogenes.pt")
    src = work / "slide" / "he_fullres.tif"
    (work / "truncated.tif").write_bytes(src.read_bytes()[: src.stat().st_size // 3])


def cases() -> list[Case]:
    enc = ["--encoder", "mobilenetv3_small_050"]
    img = ["--image", "other/he_fullres.tif"]
    pm = ["predict", "--model", "model/model.pt"]
    return [
        Case("info: a path that does not exist", ["info", "nope"]),
        Case("info: an empty folder", ["info", "empty"], setup=lambda w: (w / "empty").mkdir(exist_ok=True)),
        Case("info: --table on a Space Ranger run", ["info", "slide", "--table", "x"]),
        Case("prepare: a name that is a path (../../escaped)",
             ["prepare", "o_esc", "--samples", "escape.csv"], ["o_esc", "../escaped"]),
        Case("prepare: an absolute name", ["prepare", "o_abs", "--samples", "absolute.csv"],
             ["o_abs"]),
        Case("prepare: a sheet with only a path column",
             ["prepare", "o_sheet", "--samples", "path_only.csv"], ["o_sheet"]),
        Case("prepare: --out is a file", ["prepare", "afile/ds", "slide"]),
        Case("prepare: --config of the wrong type",
             ["prepare", "o_cfg", "slide", "--config", "bad_config.toml"], ["o_cfg"]),
        Case("features: --encoder-kwargs imports torch.save",
             ["features", "ds", *enc, "--encoder-kwargs", '{"act_layer": "torch.save"}']),
        Case("features: --encoder-kwargs not an object",
             ["features", "ds", *enc, "--encoder-kwargs", "[1]"]),
        Case("features: --weights random bytes", ["features", "ds", *enc, "--weights",
                                                  "random.pt"]),
        Case("features: --weights a pickled object", ["features", "ds", *enc, "--weights",
                                                      "object.pt"]),
        Case("features: --weights a plain pickle", ["features", "ds", *enc, "--weights",
                                                    "plain.pkl"]),
        Case("features: --input-px with dense features", ["features", "ds", *enc,
                                                          "--input-px", "112"]),
        Case("features: --dense-tile not a multiple of 32", ["features", "ds", *enc,
                                                             "--dense-tile", "100"]),
        Case("features: --pretrained offline", ["features", "ds", "--encoder", "resnet18",
                                                "--pretrained"]),
        Case("features: an hf-hub encoder offline", ["features", "ds", "--encoder",
                                                     "hf-hub:MahmoodLab/uni"]),
        Case("features: a dataset folder that does not exist", ["features", "nope", *enc]),
        Case("train: --resume a random file",
             ["train", "ds", "o_res", "--features", "mobilenetv3_small_050", "--resume",
              "random.pt", "--train-slides", "slide", "--val-slides"], ["o_res"]),
        Case("train: one slide in two roles",
             ["train", "ds", "o_two", "--features", "mobilenetv3_small_050",
              "--train-slides", "slide", "--val-slides", "slide"], ["o_two"]),
        Case("predict: --model random bytes", ["predict", "--model", "random.pt", *img,
                                               "--out", "o_p1"], ["o_p1"]),
        Case("predict: --model a pickled object", ["predict", "--model", "object.pt", *img,
                                                   "--out", "o_p2"], ["o_p2"]),
        Case("predict: --name ../../../escape", [*pm, *img, "--out", "o_p3", "--name",
                                                 "../../../escape"], ["o_p3", "../escape"]),
        Case("predict: --roi with x1 < x0", [*pm, *img, "--out", "o_p4", "--roi", "5", "5",
                                             "1", "1"], ["o_p4"]),
        Case("predict: a grid over --max-bins", [*pm, *img, "--out", "o_p5", "--max-bins",
                                                 "10"], ["o_p5/work"]),
        Case("predict: an image that does not exist", [*pm, "--image", "nope.tif", "--out",
                                                       "o_p6"], ["o_p6"]),
        Case("predict: a truncated TIFF", [*pm, "--image", "truncated.tif", "--mpp",
                                           "0.2738", "--out", "o_p7"]),
        Case("predict: --out is a file", [*pm, *img, "--out", "afile/pred"]),
        Case("plot: --formats xyz", ["plot", "model", "--out", "o_f1", "--formats", "xyz"],
             ["o_f1"]),
        Case("plot: --n-genes 0", ["plot", "model", "--out", "o_f2", "--n-genes", "0"],
             ["o_f2"]),
        Case("cv: a dataset of one slide", ["cv", "ds", "o_cv", "--features",
                                            "mobilenetv3_small_050"], ["o_cv"]),
        Case("prepare: a slide whose counts are all zero", ["prepare", "o_zero", "zero"],
             ["o_zero/manifest.json"]),
        Case("predict: a model file of format version 99", ["predict", "--model",
             "model_v99.pt", *img, "--out", "o_v99"], ["o_v99"]),
        Case("predict: a model file without genes", ["predict", "--model", "model_nogenes.pt",
             *img, "--out", "o_ng"], ["o_ng"]),
        Case("train: --lr inf (diverges)", ["train", "ds", "o_inf", "--features",
             "mobilenetv3_small_050", "--epochs", "1", "--width", "16", "--max-batches", "2",
             "--train-slides", "slide", "--val-slides", "--lr", "inf", "--quiet"],
             ["o_inf/model.pt"]),
        Case("prepare: past the shell's file size limit (ulimit -f 64)",
             ["prepare", "o_ulim", "slide", "--quiet"], ["o_ulim/manifest.json"],
             shell="ulimit -f 64;"),
        Case("features: a dataset another run is working on", ["features", "ds", *enc],
             hold="ds"),
    ]  # fmt: skip


def run(work: Path) -> list[dict]:
    rows = []
    for case in cases():
        if case.setup is not None:
            case.setup(work)
        t = time.perf_counter()
        holder = None
        if case.hold:
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work / case.hold)],
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        try:
            res = magnet(work, case.argv, shell=case.shell)
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
        # what the user reads: not progress bars, not argparse's usage lines
        lines = [
            line
            for line in res.stderr.splitlines()
            if line.strip()
            and "\r" not in line
            and "%|" not in line
            and not line.startswith(("usage:", " "))
        ]
        last = lines[-1] if lines else ""
        left = [p for p in case.must_not_exist if (work / p).exists()]
        bad_text = any(s in res.stderr for s in ("unexpected", "Traceback", "weights_only"))
        clean = res.returncode == 2 and len(lines) <= 1 and not bad_text and not left
        rows.append({"case": case.name, "argv": case.argv, "rc": res.returncode,
                     "message": last, "left": left, "clean": clean,
                     "seconds": time.perf_counter() - t})  # fmt: skip
        print(f"{'clean' if clean else 'WEAK '} rc={res.returncode} {case.name}: {last[:160]}",
              flush=True)  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    n_clean = sum(r["clean"] for r in rows)
    out = [
        "# Reliability: bad and hostile inputs",
        "",
        "Generated by `python benchmarks/reliability.py` (do not edit by hand): every command "
        "given inputs a careful new user or an attacker might give it, each in a fresh "
        "process on a small synthetic slide. *Clean*: exit code 2, one line naming the "
        'problem (no "unexpected", no traceback, no advice to load a file unsafely; '
        "argparse's usage line and progress bars aside) and nothing left behind.",
        "",
        f"**{n_clean} of {len(rows)} clean.**",
        "",
        "| case | command | exit | message | clean |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        msg = r["message"].replace("|", "\\|")
        if len(msg) > 220:
            msg = msg[:217] + "..."
        cmd = "magnet " + " ".join(r["argv"]).replace("|", "\\|")
        left = f" (left: {', '.join(r['left'])})" if r["left"] else ""
        out.append(f"| {r['case']} | `{cmd}` | {r['rc']} | {msg}{left} | "
                   f"{'yes' if r['clean'] else '**no**'} |")  # fmt: skip
    out += [
        "",
        "Covered by tests only (root ignores file permissions, and a full disk needs a "
        "mount): a full disk (memory maps reserve their blocks first; prepare checks free "
        "space; any ENOSPC is one line), a read-only output folder (EROFS / EACCES: one "
        "line), errors raised in reader processes (the worker's own line), a model file "
        "with non-finite weights.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", default="benchmark_reliability", help="scratch folder")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"),
                    help="where to write the table ('-': print it)")  # fmt: skip
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    _files(work)
    for p in work.glob("o_*"):
        shutil.rmtree(p, ignore_errors=True)
    text = table(run(work))
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
