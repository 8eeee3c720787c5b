"""The Pareto experiment of docs/search.md, in one command:

    nice -n 10 .venv/bin/python -m mpcvit.bench.pareto --out runs/pareto

On Fashion-MNIST with the ``demo`` config: profile the blocks (cost file), train softmax /
ReLU-softmax / scale ViTs, search (attention kinds; and attention + activations for
MPCViT+ points under latency budgets of 0.4 and a third of the softmax ViT's, the third
also priced on WAN), binarise at μ ∈ {0.1, 0.3, 0.5, 0.7}, retrain every searched spec
with and without distillation from the softmax ViT, run each architecture in a real
2-party secure run (gRPC + dealer) for measured per-image latency on loopback and
(``--wan-images``) over the emulated WAN, and write docs/search.md's results section and
docs/pareto.png.

Every step's output is a file under ``--out``; a finished step is skipped when the command
is run again, and an interrupted training continues from its last epoch (``--resume``), so
an interrupted experiment resumes.  Training and search run as
``mpcvit train`` / ``mpcvit search`` subprocesses, up to ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.configs import get_config
from ..models.costs import NETWORKS, CostModel
from ..models.plan import ModelPlan, arch_plan, arch_yaml
from ..models.secure import program_fingerprint
from ..models.spec import ArchSpec

MUS = (0.1, 0.3, 0.5, 0.7)
# Hand-picked uniform models: name -> (attention kind, activation kind).  scale_relu and
# scale_relu_nobias are the cheapest ones whose every activation is a comparison (no
# polynomial stand-in); the second without fc1 bias, so its ReLU joins the LayerNorm's.
BASELINES = {"softmax": ("softmax", "gelu"), "relu_softmax": ("relu_softmax", "gelu"),
             "scale": ("scale", "gelu"), "scale_relu": ("scale", "relu"),
             "scale_relu_nobias": ("scale", "relu_nobias")}
# MPCViT+ searches: name -> (budget as a fraction of the softmax ViT's predicted latency,
# network it is priced on; None: --plus-network).
PLUS_BUDGETS = {"plus": (0.4, None), "plus3x": (1 / 3, None), "plus3x_wan": (1 / 3, "wan")}
PLUS_ACTIVATIONS = "gelu,relu,relu_nobias,quad,identity"
# Baselines under a named protocol plan: name -> (trained baseline, plan).  Same weights,
# so no training: the softmax ViT under the planner's WAN pick is the baseline a searched
# model that runs an FSS plan has to beat.
REPLANNED = {"softmax_wan": ("softmax", "wan")}
BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"


@dataclass
class Job:
    """One step: a subprocess (``argv``) or an in-process function; done when ``output``
    exists."""

    name: str
    output: Path
    deps: list[str] = field(default_factory=list)
    argv: list[str] | Callable[[], list[str]] | None = None  # callable: built when started
    fn: Callable[[], None] | None = None
    after: list[str] = field(default_factory=list)  # wait for these, whatever their outcome


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpcvit.commands", *args]


def run_jobs(jobs: list[Job], parallel: int, log_dir: Path) -> dict[str, str]:
    """Run jobs in list order as their dependencies finish; returns name -> status."""
    log_dir.mkdir(parents=True, exist_ok=True)
    status = {j.name: "done" for j in jobs if j.output.exists()}
    running: dict[str, subprocess.Popen] = {}
    while True:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is not None:
                del running[name]
                job = next(j for j in jobs if j.name == name)
                status[name] = "done" if rc == 0 and job.output.exists() else f"failed rc={rc}"
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {status[name]}", flush=True)
        pending = [j for j in jobs if j.name not in status and j.name not in running]
        for job in pending:
            if any(status.get(d, "").startswith("failed") or status.get(d) == "skipped"
                   for d in job.deps):
                status[job.name] = "skipped"
                continue
            if not all(status.get(d) == "done" for d in job.deps):
                continue
            if any(a not in status for a in job.after):
                continue
            if job.fn is not None:
                print(f"[{time.strftime('%H:%M:%S')}] {job.name}: running", flush=True)
                try:
                    job.fn()
                    status[job.name] = "done"
                except Exception as exc:  # report and carry on with the other steps
                    status[job.name] = f"failed {type(exc).__name__}: {exc}"
                print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {status[job.name]}",
                      flush=True)
                break  # re-poll the subprocesses
            if len(running) < parallel and job.argv is not None:
                log = open(log_dir / f"{job.name}.log", "w")  # noqa: SIM115 (lives with proc)
                argv = job.argv() if callable(job.argv) else job.argv
                running[job.name] = subprocess.Popen(argv, stdout=log,
                                                     stderr=subprocess.STDOUT)
                print(f"[{time.strftime('%H:%M:%S')}] {job.name}: started", flush=True)
        if not running and all(j.name in status for j in jobs):
            return status
        if not running and not any(
            all(status.get(d) == "done" for d in j.deps) and all(a in status for a in j.after)
            for j in jobs if j.name not in status
        ):
            for j in jobs:
                status.setdefault(j.name, "skipped")
            return status
        time.sleep(2.0)


# ----------------------------------------------------------------------------- steps


def _test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ..models.data import load_dataset

    data = load_dataset("fashion-mnist")
    x, y = data.test.tensors()
    return x[:n].clone(), y[:n].clone()


def measure_many_party(blob: bytes, images: torch.Tensor) -> dict[str, list[dict]]:
    """Party program: every model in one session, images interleaved across models (in a
    rotating order) so that a shared machine's changing load hits all models alike.

    As the party service does, the dealer's material for each image is prepared before
    the image arrives (the offline phase, from the tuple trace of a warm-up forward): a
    row's ``compute_s`` is the online latency and ``offline_s`` the preparation.

    ``blob`` is ``torch.save({name: (config, spec, state_dict)})``: one byte string, not
    hundreds of tensors (each would cost the process launch a shared-memory handle)."""
    import io

    from ..models.profiler import build_secure, prepare_offline, record_trace, timed_forward
    from ..mpc import runtime

    provider = runtime.dealer_provider()
    entries = torch.load(io.BytesIO(blob), weights_only=True)
    secures = {name: build_secure(*e) for name, e in entries.items()}
    # warm-up; records each model's tuple trace
    traces = {name: record_trace(provider, lambda sec=sec: timed_forward(sec, images[:1]))
              for name, sec in secures.items()}
    names = list(secures)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(len(images)):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            offline_s = prepare_offline(provider, traces[name])
            row = timed_forward(secures[name], images[i : i + 1])
            row["offline_s"] = offline_s
            rows[name].append(row)
    return rows


def measure_step(models: dict[str, dict], out: Path, images: int) -> Callable[[], None]:
    """Measured secure latency of every trained architecture (their own weights)."""

    def step() -> None:
        from ..models.profiler import secure_run
        from ..mpc.launcher import run_parties

        costs_path = out / "costs.yaml"
        if CostModel.load(costs_path).meta.get("ops_sha1") != program_fingerprint():
            # The secure ops changed since profiling: re-profile, so that predictions and
            # measurements describe the same code (the search used the old file).
            from ..models.profiler import profile

            costs_path.rename(out / "costs.searched.yaml")
            profile(get_config("demo")).save(costs_path, NETWORKS["lan"])
        blob, plain = _trained_models(models, out)
        x, y = _test_images(images)
        # by its importable name: under `python -m` this module is __main__, which the
        # party processes cannot unpickle functions from
        from . import pareto

        res = run_parties(pareto.measure_many_party, blob, x, provider="dealer", timeout=7200)
        for name, rows in res[0].items():
            run = secure_run(rows)
            with torch.no_grad():
                ref = plain[name](x)
            (out / "measure" / f"{name}.json").write_text(json.dumps({
                "rounds": run.rounds, "bytes": run.bytes, "seconds": run.seconds,
                "median_s": run.cost.compute_s, "dealer_requests": run.dealer_requests,
                "offline_s": statistics.median(r["offline_s"] for r in rows),
                "max_logit_error": float((run.logits - ref).abs().max()),
                "argmax_agree": int((run.logits.argmax(-1) == ref.argmax(-1)).sum()),
                "secure_correct": int((run.logits.argmax(-1) == y).sum()), "images": len(y),
                "ops_sha1": program_fingerprint(),
            }))
        (out / "measure" / "all.json").write_text(json.dumps(sorted(res[0])))

    return step


def _trained_models(models: dict[str, dict], out: Path) -> tuple[bytes, dict[str, Any]]:
    """``measure_many_party``'s blob of every trained model, and the plain models."""
    import io

    from ..models.checkpoint import load_model

    entries, plain = {}, {}
    for name, m in models.items():
        ckpt = out / "ckpt" / f"{name}.pt"
        if not ckpt.exists():
            continue
        model = load_model(str(ckpt))
        if model.spec != ArchSpec.from_yaml(m["spec"].read_text()):
            raise ValueError(f"{ckpt} has another spec than {m['spec']}")
        # the protocol plan the checkpoint carries (the search's pick) runs with it
        entries[name] = (model.config.to_dict(), model.spec.to_dict(), model.state_dict(),
                         model.protocol.to_dict())
        plain[name] = model
    buf = io.BytesIO()
    torch.save(entries, buf)
    return buf.getvalue(), plain


def measure_wan_step(models: dict[str, dict], out: Path, images: int) -> Callable[[], None]:
    """Online latency of every trained architecture over the emulated WAN (the kernel
    shapes and delays the link between the parties' network namespaces; see
    ``mpc.netem``): measured, where the table's other WAN column is priced."""

    def step() -> None:
        from ..models.profiler import secure_run
        from ..mpc.launcher import run_parties
        from ..mpc.netem import EmulatedNetwork, parse_network
        from . import pareto

        blob, _ = _trained_models(models, out)
        x, _ = _test_images(images)
        with EmulatedNetwork(parse_network("wan")) as net:
            where = "namespaces + tbf + relays" if net.use_namespaces else (
                f"loopback relays ({net.fallback_reason})")
            print(f"measuring on the emulated WAN via {where}", flush=True)
            res = run_parties(pareto.measure_many_party, blob, x, provider="dealer",
                              network=net, timeout=6 * 3600, recv_timeout=600)
        (out / "measure_wan").mkdir(exist_ok=True)
        for name, rows in res[0].items():
            run = secure_run(rows)
            (out / "measure_wan" / f"{name}.json").write_text(json.dumps({
                "rounds": run.rounds, "bytes": run.bytes, "seconds": run.seconds,
                "median_s": run.cost.compute_s, "images": len(x), "emulation": where,
                "offline_s": statistics.median(r["offline_s"] for r in rows)}))
        (out / "measure_wan" / "all.json").write_text(json.dumps(sorted(res[0])))

    return step


def evaluate_step(out: Path) -> Callable[[], None]:
    """Plaintext accuracy of every checkpoint on the whole Fashion-MNIST test set (10,000
    images): the training runs score on ``--test-limit`` images only, whose sampling
    error (about ±1 point at 2000 images) is as large as the 1-point target itself."""

    def step() -> None:
        from ..models.checkpoint import load_model
        from ..models.data import load_dataset
        from ..models.train import evaluate

        x, y = load_dataset("fashion-mnist").test.tensors()
        (out / "eval").mkdir(exist_ok=True)
        for ckpt in sorted((out / "ckpt").glob("*.pt")):
            if _fresh_eval(ckpt) is not None:
                continue
            with torch.no_grad():
                _, acc = evaluate(load_model(str(ckpt)), x, y)
            _eval_path(ckpt).write_text(json.dumps({"accuracy": acc, "images": len(y)}))
        (out / "eval" / "all.json").write_text(json.dumps(
            sorted(p.stem for p in (out / "ckpt").glob("*.pt"))))

    return step


def binarise_step(search_json: Path, costs_path: Path, network: str, out_dir: Path,
                  mus: tuple[float, ...] = MUS) -> Callable[[], None]:
    """Binarise the attention search's α at every μ (one YAML per μ)."""

    def step() -> None:
        from ..models.costs import NETWORKS as nets
        from ..models.search import binarize_mu, cheapest
        from ..models.spec import AttentionKind

        res = _last_json(search_json)
        probs = torch.tensor(res["attention_probs"])
        kinds = [AttentionKind(k) for k in ("relu_softmax", "scale")]
        cheap = cheapest(kinds, CostModel.load(costs_path), nets[network])
        for mu in mus:
            spec = binarize_mu(probs, kinds, mu, cheap)
            (out_dir / f"mu{mu:g}.yaml").write_text(spec.to_yaml())

    return step


def _last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"{log} has no JSON line")


def plan(args: argparse.Namespace) -> tuple[list[Job], dict[str, dict]]:
    """All steps, most important first, and the models they produce."""
    out: Path = args.out
    for sub in ("specs", "ckpt", "measure", "logs", "eval"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    costs = out / "costs.yaml"
    data = ["--data", "fashion-mnist", "--limit", str(args.limit)]
    train_common = ["--model", "demo", *data, "--test-limit", str(args.test_limit),
                    "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                    "--threads", str(args.threads), "--resume"]
    search_data = ["--data", "fashion-mnist", "--limit", str(args.search_limit or args.limit)]
    search_common = ["--model", "demo", *search_data, "--costs", str(costs), "--network",
                     args.network, "--epochs", str(args.search_epochs), "--threads",
                     str(args.threads), "--json"]
    cfg = get_config("demo")
    jobs = [Job("profile", costs, argv=_cli("profile", "--model", "demo", "--network",
                                            args.network, "--repeats", "5", "--out",
                                            str(costs)))]
    # the profile times blocks on loopback: nothing else may share the cores meanwhile
    alone = ["profile"]
    models: dict[str, dict] = {}
    for name, (attention, activation) in BASELINES.items():
        spec = out / "specs" / f"{name}.yaml"
        if not spec.exists():
            spec.write_text(ArchSpec.uniform(cfg.depth, cfg.heads, attention,
                                             activation).to_yaml())
        models[name] = {"spec": spec, "group": "baseline"}
    # searches: attention only (mu sweep) and MPCViT+ (attention + activations, budget)
    jobs.append(Job("search_attn", out / "specs" / "search_attn.yaml", ["profile"],
                    argv=_cli("search", *search_common, "--mu", "0.5", "--out",
                              str(out / "specs" / "search_attn.yaml"), "--pareto",
                              str(out / "search_attn_pareto.csv"))))
    jobs.append(Job("binarise", out / "specs" / f"mu{MUS[-1]:g}.yaml", ["search_attn"],
                    fn=binarise_step(out / "logs" / "search_attn.log", costs, args.network,
                                     out / "specs")))
    for mu in MUS:
        models[f"mu{mu:g}"] = {"spec": out / "specs" / f"mu{mu:g}.yaml", "group": "searched",
                               "dep": "binarise"}
    # MPCViT+ (attention and activations searched) under budgets of 2.5x and of the
    # target itself, a third of the softmax ViT's predicted latency, and that third priced
    # on the WAN preset (a search fails if the fixed part makes its budget unreachable).
    for name, (fraction, network) in PLUS_BUDGETS.items():
        spec_path = out / "specs" / f"{name}.yaml"
        jobs.append(Job(f"search_{name}", spec_path, ["profile"], argv=lambda n=name,
                        f=fraction, sp=spec_path, net=network or args.plus_network: _cli(
            "search", *search_common, "--network", net, "--latency-budget",
            f"{_plus_budget(costs, net, fraction=f):.6f}",
            "--activations", PLUS_ACTIVATIONS, "--out", str(sp), "--pareto",
            str(out / f"search_{n}_pareto.csv"))))
        models[name] = {"spec": spec_path, "group": "mpcvit+", "dep": f"search_{name}"}

    teacher = args.teacher or out / "ckpt" / "softmax.pt"
    teacher_dep = [] if args.teacher else ["train_softmax"]
    # the points that decide the claim first (the teacher, then the MPCViT+ searches)
    order = ["softmax", "plus3x_wan", "plus3x", "plus", "mu0.5", "scale_relu", "relu_softmax",
             "scale", "mu0.1", "mu0.3", "mu0.7", "scale_relu_nobias"]
    for name in order:
        m = models[name]
        deps = [m["dep"]] if "dep" in m else []
        jobs.append(Job(f"train_{name}", out / "ckpt" / f"{name}.pt", deps,
                        argv=_cli("train", *train_common, "--arch", str(m["spec"]),
                                  "--out", str(out / "ckpt" / f"{name}.pt")), after=alone))
        if name != "softmax" and args.distill:
            jobs.append(Job(f"distill_{name}", out / "ckpt" / f"{name}_kd.pt",
                            deps + teacher_dep,
                            argv=_cli("train", *train_common, "--arch", str(m["spec"]),
                                      "--teacher", str(teacher), "--out",
                                      str(out / "ckpt" / f"{name}_kd.pt")), after=alone))
    for name, (source, plan_name) in REPLANNED.items():
        spec = out / "specs" / f"{name}.yaml"
        if not spec.exists():
            spec.write_text(arch_yaml(ArchSpec.from_yaml(models[source]["spec"].read_text()),
                                      ModelPlan.of(plan_name)))
        jobs.append(Job(f"replan_{name}", out / "ckpt" / f"{name}.pt", [f"train_{source}"],
                        fn=replan_step(out / "ckpt" / f"{source}.pt", plan_name,
                                       out / "ckpt" / f"{name}.pt")))
        models[name] = {"spec": spec, "group": "baseline", "dep": f"replan_{name}"}
    # Secure measurements last, in one session, so that all models share the same load.
    trainings = [j.name for j in jobs if j.name.startswith(("train_", "distill_", "replan_"))]
    # the softmax ViT's rows first, then the others in the order they were added
    models = dict(sorted(models.items(), key=lambda kv: not kv[0].startswith("softmax")))
    # always re-run: it skips the checkpoints it has already scored
    (out / "eval" / "all.json").unlink(missing_ok=True)
    jobs.append(Job("evaluate", out / "eval" / "all.json", [], after=trainings,
                    fn=evaluate_step(out)))
    jobs.append(Job("measure", out / "measure" / "all.json", ["train_softmax"],
                    after=trainings, fn=measure_step(models, out, args.images)))
    if args.wan_images:
        jobs.append(Job("measure_wan", out / "measure_wan" / "all.json", ["train_softmax"],
                        after=[*trainings, "measure"],
                        fn=measure_wan_step(models, out, args.wan_images)))
    return jobs, models


def replan_step(source: Path, plan_name: str, out: Path) -> Callable[[], None]:
    """``source``'s checkpoint under the named protocol plan (weights and scores kept)."""

    def step() -> None:
        from ..models.checkpoint import load_checkpoint, save_checkpoint

        model, extra = load_checkpoint(source)
        model.set_protocol(plan_name)
        save_checkpoint(model, out, extra)

    return step


def _plus_budget(costs: Path, network: str, fraction: float) -> float:
    """An MPCViT+ budget: ``fraction`` of the softmax ViT's predicted latency."""
    cm = CostModel.load(costs)
    cfg, net = cm.config, NETWORKS[network]
    return fraction * cm.seconds(ArchSpec.uniform(cfg.depth, cfg.heads, "softmax", "gelu"), net)


# ----------------------------------------------------------------------------- report


def _eval_path(ckpt: Path) -> Path:
    return ckpt.parent.parent / "eval" / f"{ckpt.stem}.json"


def _fresh_eval(ckpt: Path) -> Path | None:
    """The whole-test-set score of ``ckpt`` if it was written after the checkpoint."""
    path = _eval_path(ckpt)
    return path if path.exists() and path.stat().st_mtime >= ckpt.stat().st_mtime else None


def checkpoint_accuracy(ckpt: Path) -> float | None:
    """Accuracy on the whole test set (``evaluate_step``) when it was evaluated, else the
    training run's own score on ``--test-limit`` images."""
    from ..models.checkpoint import read_checkpoint

    if not ckpt.exists():
        return None
    full = _fresh_eval(ckpt)
    if full is not None:
        return json.loads(full.read_text())["accuracy"]
    return read_checkpoint(ckpt)["extra"].get("test_acc")


def collect(args: argparse.Namespace, models: dict[str, dict]) -> list[dict]:
    out: Path = args.out
    costs = CostModel.load(out / "costs.yaml")
    rows = []
    for name, m in models.items():
        if not m["spec"].exists():
            continue
        spec = ArchSpec.from_yaml(m["spec"].read_text())
        plan = arch_plan(str(m["spec"])) or ModelPlan()
        pred = costs.predict(spec, plan)
        row = {"name": name, "group": m["group"], "kinds": spec.summary(),
               "plan": plan.describe(),
               "acc": checkpoint_accuracy(out / "ckpt" / f"{name}.pt"),
               "acc_kd": (None if name == "softmax"
                          else checkpoint_accuracy(out / "ckpt" / f"{name}_kd.pt")),
               "pred_rounds": pred.rounds, "pred_bytes": pred.bytes,
               "pred_compute_s": pred.compute_s,
               "pred_lan_s": NETWORKS["lan"].seconds(pred),
               "pred_wan_s": NETWORKS["wan"].seconds(pred)}
        mpath = out / "measure" / f"{name}.json"
        if mpath.exists():
            meas = json.loads(mpath.read_text())
            from ..models.costs import Cost

            c = Cost(meas["rounds"], meas["bytes"], meas["median_s"])
            row |= {"meas_rounds": meas["rounds"], "meas_bytes": meas["bytes"],
                    "meas_s": meas["median_s"], "meas_lan_s": NETWORKS["lan"].seconds(c),
                    "meas_wan_s": NETWORKS["wan"].seconds(c),
                    "agree": f"{meas['argmax_agree']}/{meas['images']}",
                    "logit_err": meas["max_logit_error"],
                    "ops_match": meas.get("ops_sha1") == costs.meta.get("ops_sha1")}
        wpath = out / "measure_wan" / f"{name}.json"
        if wpath.exists():
            wan = json.loads(wpath.read_text())
            row |= {"wan_meas_s": wan["median_s"], "wan_emulation": wan.get("emulation")}
        rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def _fmt(v: float | None, spec: str = ".3f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _teacher_desc(args: argparse.Namespace) -> str:
    if args.teacher is None:
        return "the softmax ViT of the table"
    acc = checkpoint_accuracy(args.teacher)
    return f"a softmax ViT of the same shape and recipe (test accuracy {_fmt(acc, '.4f')})"


def _acc_images(args: argparse.Namespace) -> str:
    evals = list((args.out / "eval").glob("*.json"))
    return "all 10000" if any(p.stem != "all" for p in evals) else str(args.test_limit)


def _wan_emulation(rows: list[dict]) -> str:
    ways = {r["wan_emulation"] for r in rows if r.get("wan_emulation")}
    return " / ".join(sorted(ways)) or "not measured yet"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = next((r for r in rows if r["name"] == "softmax"), None)
    lines = [
        f"Setup: `demo` config, Fashion-MNIST, {args.limit} training images, "
        f"accuracy on {_acc_images(args)} test images, {args.epochs} epochs per training "
        f"(batch {args.batch_size}), "
        f"{args.search_epochs} search epochs on {args.search_limit or args.limit} images "
        f"(10% held out), search priced on `{args.network}`, "
        + (f"distillation teacher: {_teacher_desc(args)}. " if args.distill
           else "every point trained alone (no distillation). ")
        + f"Measured = a real 2-party CrypTen run over gRPC with the dealer on this machine "
        f"(loopback, 2 shared cores), batch 1, median of {args.images} test images "
        f"after one warm-up; online seconds: as in the party service, the dealer prepares "
        f"each image's correlated randomness before the image arrives. LAN/WAN columns "
        f"price the measured rounds and bytes with the network model on top of the "
        f"measured loopback seconds"
        + (f"; WAN meas is measured over the emulated WAN (100 Mbps, 40 ms RTT; "
           f"{_wan_emulation(rows)}), median of {args.wan_images} test images, online "
           f"seconds" if args.wan_images else "")
        + f". The MPCViT+ budgets are priced on `{args.plus_network}` (`plus3x_wan`: "
          f"on `wan`).",
        "",
        "| model | kinds | acc | acc (distilled) | rounds meas / pred | MB meas / pred "
        "| loopback s meas / pred | speed-up vs softmax | LAN s | WAN s | WAN meas s "
        "| speed-up on WAN meas | vs softmax_wan on WAN meas | secure = plain argmax |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    planned = next((r for r in rows if r["name"] == "softmax_wan"), None)

    def speed_up(ref: dict | None, r: dict, key: str) -> float | None:
        """``ref``'s seconds over ``r``'s under ``key``, when both were measured."""
        return ref[key] / r[key] if ref is not None and r.get(key) and ref.get(key) else None

    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        if r.get("plan", "default") != "default":
            kinds += f"; plan {r['plan']}"
        speed = speed_up(base, r, "meas_s")
        mb = None if r.get("meas_bytes") is None else r["meas_bytes"] / 1e6
        wan_speed = speed_up(base, r, "wan_meas_s")
        planned_speed = speed_up(planned, r, "wan_meas_s")
        lines.append(
            f"| {r['name']} | {kinds} | {_fmt(r['acc'], '.4f')} | {_fmt(r['acc_kd'], '.4f')} "
            f"| {_fmt(r.get('meas_rounds'), '.0f')} / {r['pred_rounds']:.0f} "
            f"| {_fmt(mb, '.1f')} / {r['pred_bytes'] / 1e6:.1f} "
            f"| {_fmt(r.get('meas_s'))} / {r['pred_compute_s']:.3f} | {_fmt(speed, '.2f')}x "
            f"| {_fmt(r.get('meas_lan_s'))} | {_fmt(r.get('meas_wan_s'))} "
            f"| {_fmt(r.get('wan_meas_s'))} | {_fmt(wan_speed, '.2f')}x "
            f"| {_fmt(planned_speed, '.2f')}{'x' if planned_speed else ''} "
            f"| {r.get('agree', '—')} |")
    stale = [r["name"] for r in rows if r.get("ops_match") is False]
    if stale:
        lines += ["", f"Note: the secure ops changed between profiling and the measured runs "
                      f"of {', '.join(stale)}; their predicted and measured costs differ."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"baseline": ("s", "tab:gray"), "searched": ("o", "tab:blue"),
              "mpcvit+": ("*", "tab:red")}
    wan_measured = any(r.get("wan_meas_s") is not None for r in rows)
    wan = (("wan_meas_s", "measured on the emulated WAN (100 Mbps, 40 ms RTT)") if wan_measured
           else ("meas_wan_s", "WAN model (100 Mbps, 40 ms RTT)"))
    for ax, (key, title) in zip(axes, (("meas_s", "measured (loopback, 2 parties over gRPC)"),
                                       wan), strict=True):
        labelled: dict[tuple[float, float], list[str]] = {}
        for r in rows:
            if r.get(key) is None:
                continue
            marker, color = styles[r["group"]]
            for acc, filled in ((r["acc"], True), (r["acc_kd"], False)):
                if acc is None:
                    continue
                ax.scatter(r[key], 100 * acc, marker=marker, s=70,
                           facecolors=color if filled else "none", edgecolors=color)
            best = max(a for a in (r["acc"], r["acc_kd"]) if a is not None) \
                if (r["acc"] is not None or r["acc_kd"] is not None) else None
            if best is not None:  # one label per point (two specs can be the same model)
                at = (round(r[key], 2), round(100 * best, 1))
                labelled.setdefault(at, []).append(r["name"])
        for (x, y), names in labelled.items():
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        base = next((r for r in rows if r["name"] == "softmax"), None)
        if base is not None and base.get(key) is not None and base["acc"] is not None:
            ax.axhline(100 * base["acc"] - 1, ls="--", lw=0.8, color="gray",
                       label="softmax accuracy − 1 point")
            ax.axvline(base[key] / 3, ls=":", lw=0.8, color="gray",
                       label="softmax latency / 3")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("seconds per image")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("demo ViT on Fashion-MNIST: filled = trained alone, hollow = distilled",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(rows: list[dict], args: argparse.Namespace) -> None:
    """The table goes between the markers of search.md (created if missing) and of
    benchmarks.md (if it has them); the plot to pareto.png."""
    block = f"{BEGIN}\n{markdown(rows, args)}\n{END}"
    for md, required in ((args.docs / "search.md", True), (args.docs / "benchmarks.md", False)):
        text = md.read_text() if md.exists() else ""
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        elif required:
            text = (text or "# Search\n") + "\n" + block + "\n"
        else:
            continue
        md.write_text(text)
    plot(rows, args.docs / "pareto.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/pareto"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--limit", type=int, default=10000, help="training images")
    p.add_argument("--test-limit", type=int, default=2000, help="test images")
    p.add_argument("--search-limit", type=int, default=None,
                   help="images for the searches (default --limit)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="train every point alone only (no distilled twin)")
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--network", default="lan", choices=sorted(NETWORKS))
    p.add_argument("--plus-network", default="wan", choices=sorted(NETWORKS),
                   help="network the MPCViT+ budget is priced on")
    p.add_argument("--images", type=int, default=3, help="images per secure measurement")
    p.add_argument("--wan-images", type=int, default=0,
                   help="images per model measured over the emulated WAN (0: none)")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--teacher", type=Path, default=None,
                   help="softmax checkpoint to distil from (default: the softmax ViT trained "
                   "here)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    p.add_argument("--finish", action="store_true",
                   help="start no new search or training: measure what is trained, report")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    jobs, models = plan(args)
    if args.finish:
        jobs = [j for j in jobs if j.output.exists() or j.fn is not None]
        for j in jobs:
            j.deps = [d for d in j.deps if any(k.name == d for k in jobs)]
            j.after = [a for a in j.after if any(k.name == a for k in jobs)]
    if not args.report_only:
        status = run_jobs(jobs, args.jobs, args.out / "logs")
        for name, st in status.items():
            print(f"{name:<22}{st}")
    rows = collect(args, models)
    write_docs(rows, args)
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
