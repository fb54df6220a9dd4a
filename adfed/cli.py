"""The ``adfed`` command.

Subcommands: ``data generate | describe | import | verify``, ``train``, ``compare``,
``rerank``, ``experiment run``. Every error from bad input is one line naming the field and the fix,
with exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from adfed import config as config_mod
from adfed.errors import AdfedError

app = typer.Typer(help="adfed: federated pCVR prediction across phones.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Generate, import, describe and verify datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _log_warnings() -> None:
    """Warnings and errors of adfed's loggers on stderr, one line each; dp-accounting's RDP
    search logs each order it cannot evaluate (harmless: the order is skipped), kept out."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


# -- data ------------------------------------------------------------------------------

@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Option(help="Output dataset directory.")],
    users: Annotated[int, typer.Option(help="Number of users (phones) in the population.")] = 20_000,
    ads: Annotated[int, typer.Option(help="Number of ads (the demo's 10,000 by default).")] = 10_000,
    seed: Annotated[int, typer.Option(help="World seed: same seed and sizes give byte-identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes (output does not depend on it).")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Materialize the synthetic world to parquet (streaming; memory does not grow with --users)."""
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    if workers < 1:  # before the progress bar draws its first line
        _fail(f"--workers must be an int >= 1; got {workers}")
    try:
        params = WorldParams(num_users=users, num_ads=ads)
    except ValueError as exc:  # name the flags typed, not the dataclass fields
        _fail(str(exc).replace("WorldParams.num_users", "--users").replace("WorldParams.num_ads", "--ads"))
    try:
        if out.exists() and not overwrite:
            _fail(f"--out {out} already exists; pass --overwrite or choose another --out")
        with _progress() as progress:
            task = progress.add_task("generating users", total=users, info="")
            path = generate(out, params, seed=seed, workers=workers, overwrite=overwrite,
                            progress=lambda n: progress.advance(task, n))
    except (AdfedError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {path}")


@data_app.command("import")
def data_import(
    fmt: Annotated[str, typer.Option("--format", help="Source format: talkingdata | taobao | aliccp.")],
    src: Annotated[Path, typer.Argument(
        help="Source CSV file, or a directory holding it (talkingdata: train.csv or train_sample.csv; "
             "taobao: UserBehavior.csv; aliccp: its split CSVs).")],
    out: Annotated[Path, typer.Argument(help="Output dataset directory.")],
    min_rows: Annotated[int, typer.Option(help="Clients with fewer rows are dropped or grouped.")] = 1,
    small_clients: Annotated[str, typer.Option(help="drop | group: what to do with small clients.")] = "group",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Import a real public ad dataset into adfed's layout (users become clients; no truth)."""
    from adfed.data.importers import import_dataset

    if small_clients not in ("drop", "group"):
        _fail(f"--small-clients must be drop or group; got {small_clients!r}")
    if min_rows < 1:
        _fail(f"--min-rows must be an int >= 1; got {min_rows}")
    if out.exists() and not overwrite:
        _fail(f"OUT {out} already exists; pass --overwrite or choose another OUT")
    try:
        path = import_dataset(fmt, src, out, min_rows=min_rows, small_clients=small_clients,  # type: ignore[arg-type]
                              overwrite=overwrite)
    except (AdfedError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {path}")


@data_app.command("describe")
def data_describe(
    path: Annotated[Path, typer.Argument(help="Dataset directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print a dataset's statistics (rates, rows per user, oracle AUC when truth exists)."""
    from adfed.data.store import Dataset
    from data_gen.describe import describe

    try:
        Dataset.open(path)  # the manifest, its schema and every table as training reads them
        stats = describe(path)
    except (AdfedError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return
    personas = stats.pop("personas", None) or []
    table = Table(title=f"dataset {path}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        table.add_row(key, str(value))
    out = Console()
    out.print(table)
    if personas:
        ptable = Table(title="per persona (non-IID clients)")
        for col in personas[0]:
            ptable.add_column(col, justify="right")
        for p in personas:
            ptable.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in p.values()])
        out.print(ptable)


@data_app.command("verify")
def data_verify(path: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Check every file of a dataset against the sha256 in its manifest.json, then open it
    as training does (the manifest's schema, every table's columns and types).

    Prints one line per missing, changed or unlisted file and exits 1, a one-line error
    (exit 2) for a dataset training would refuse, or one ok line.
    """
    from adfed.data.store import Dataset, verify_files

    try:
        problems = verify_files(path)
        if not problems:
            Dataset.open(path)
    except (AdfedError, ValueError) as exc:
        _fail(str(exc))
    if problems:
        for line in problems:
            console.print(f"[red]mismatch:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"ok: all {len(manifest['files'])} files of {path} match the sha256 in its manifest.json, and it opens")


# -- train -----------------------------------------------------------------------------

def _resolve_config(
    config_file: Path | None, sets: list[str], flags: dict[str, Any]
) -> config_mod.Config:
    cfg = config_mod.load(config_file) if config_file else config_mod.Config()
    items = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return config_mod.with_overrides(cfg, items + list(sets))


@app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="Run directory to write.")],
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML config file; keys it leaves out keep their defaults (e.g. experiments/configs/fedavg.toml: FedAvg, for DP and async runs).")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset directory (data.path).")] = None,
    mode: Annotated[str | None, typer.Option(help="centralized | federated (train.mode).")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (fl.rounds).")] = None,
    clients_per_round: Annotated[int | None, typer.Option(help="Phones a federated round trains (fl.clients_per_round).")] = None,
    backend: Annotated[str | None, typer.Option(help="inprocess | process | ray (fl.backend).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a federated run from OUT's checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in OUT (its run files and plots).")] = False,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any key: section.key=VALUE, VALUE in TOML (strings quoted: 'fl.strategy=\"fedavg\"'); repeatable; every key is listed in docs/config.md.")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="A centralized run directory: its AUC is drawn on this run's plots.")] = None,
) -> None:
    """Train the pCVR model centralized or federated and write a run directory.

    OUT must be new or empty unless --resume (continue its federated run) or --overwrite.
    Ends with a results table and the run directory (stderr); stdout gets the main
    figures as JSON.
    """
    from adfed import rundir
    from adfed.trainer import Trainer

    _log_warnings()
    aside: Path | None = None  # --overwrite: the old run's files, until the new run is written
    try:
        cfg = _resolve_config(config_file, sets or [], {
            "data.path": data, "train.mode": mode, "seed": seed, "fl.rounds": rounds,
            "fl.clients_per_round": clients_per_round, "fl.backend": backend,
        })
        from adfed.data.store import Dataset

        dataset = Dataset.open(cfg.data.path)  # validate before any progress output
        ignored = [f for f, v in (("--rounds", rounds), ("--clients-per-round", clients_per_round),
                                  ("--backend", backend)) if v is not None]
        if ignored and cfg.train.mode != "federated":
            console.print(f"[yellow]warning:[/yellow] {', '.join(ignored)} set federated training; this run is "
                          f"{cfg.train.mode} (one epoch per train.epochs): pass --mode federated to use "
                          f"{'them' if len(ignored) > 1 else 'it'}", highlight=False, soft_wrap=True)
        ref = _read_summary(reference) if reference else None
        cfg, extra = _clamp_clients(cfg, dataset, flag=clients_per_round is not None)
        if ref is not None:
            extra.update(reference_run=str(reference), reference_auc=ref.get("auc"))
        aside = rundir.prepare_out(out, resume=resume, overwrite=overwrite, federated=cfg.train.mode == "federated")
        total = cfg.train.epochs if cfg.train.mode == "centralized" else cfg.fl.rounds
        unit = "epoch" if cfg.train.mode == "centralized" else "round"
        with _progress() as progress:
            task = progress.add_task(f"{cfg.train.mode} training", total=total, info="")

            def on_step(row: dict[str, Any]) -> None:
                auc = row.get("auc")
                info = f"{unit} {row.get(unit, '?')}" + (f"  auc {auc:.4f}" if isinstance(auc, float) else "")
                progress.update(task, completed=row.get(unit, 0), info=info)

            try:
                result = Trainer(cfg).fit(dataset, checkpoint_dir=out, resume=resume, on_step=on_step)
            except KeyboardInterrupt:
                progress.stop()
                from adfed.fl.checkpoint import CHECKPOINT

                kept = cfg.train.mode == "federated" and (out / CHECKPOINT).exists()
                # the new run's checkpoint replaces the old run; without one the old run stays
                if kept:
                    rundir.finish_out(aside)
                else:
                    rundir.restore_out(out, aside)
                aside = None
                _interrupted(out, cfg)
        summary = rundir.write_run(out, cfg, result, reference=ref, extra=extra)
        rundir.finish_out(aside)
        aside = None
    except (AdfedError, ValueError, OSError) as exc:
        rundir.restore_out(out, aside)  # --overwrite: a run that fails leaves the old one as it was
        _fail(str(exc))
    except BaseException:
        rundir.restore_out(out, aside)
        raise
    keys = ("mode", "auc", "auc_expected", "oracle_auc", "ctcvr_auc", "logloss", "rounds", "sim_time_s", "wall_time_s")
    print(json.dumps(rundir.json_ready({k: summary[k] for k in keys if k in summary}), indent=2), flush=True)
    console.print(_results_table([(out.name or str(out), summary)], title="results"))
    _warn_noisy([(str(out), summary)])
    console.print(f"run directory: {out}  (summary.json, config.toml, plots/)", highlight=False, soft_wrap=True)


def _interrupted(out: Path, cfg: config_mod.Config) -> NoReturn:
    """Ctrl-C during training: a federated run keeps its checkpoint (written after the round
    in progress, or the last one written on a second Ctrl-C); write the
    resolved config beside it and say how to continue. Exit code 130 (SIGINT's)."""
    from adfed import rundir
    from adfed.fl.checkpoint import CHECKPOINT

    ckpt = out / CHECKPOINT
    if cfg.train.mode == "federated" and ckpt.exists():
        rundir.atomic_write(out / "config.toml", config_mod.dumps(cfg))
        console.print(f"interrupted: the run's checkpoint is {ckpt}; continue with\n"
                      f"  adfed train --config {out / 'config.toml'} --out {out} --resume",
                      highlight=False, soft_wrap=True)
    else:
        what = "centralized training keeps no checkpoint" if cfg.train.mode == "centralized" \
            else "no round had finished, so there is no checkpoint"
        console.print(f"interrupted: {what}; nothing was written to {out}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _clamp_clients(cfg: config_mod.Config, dataset: Any, *, flag: bool) -> tuple[config_mod.Config, dict[str, Any]]:
    """``cfg`` with ``fl.clients_per_round`` at most the clients that have training rows
    (a warning says so; the requested value goes to summary.json as
    ``clients_per_round_requested``), and ``window.min_clients`` at most that."""
    from adfed.data.store import num_train_rows

    population = int((num_train_rows(dataset.rows_per_user(), cfg.data.test_fraction) > 0).sum())
    asked = cfg.fl.clients_per_round
    if cfg.train.mode != "federated" or asked <= population or population == 0:
        return cfg, {}
    name = "--clients-per-round" if flag else "fl.clients_per_round"
    console.print(f"[yellow]warning:[/yellow] {name} {asked} is more than the {population} clients with "
                  f"training rows in {cfg.data.path}; using {population}", highlight=False, soft_wrap=True)
    items = [f"fl.clients_per_round={population}"]
    if cfg.window.min_clients > population:
        console.print(f"[yellow]warning:[/yellow] window.min_clients {cfg.window.min_clients} lowered to "
                      f"{population} with it", highlight=False, soft_wrap=True)
        items.append(f"window.min_clients={population}")
    return config_mod.with_overrides(cfg, items), {"clients_per_round_requested": asked}


def _read_summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; is {run} a run directory (adfed train --out)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from exc
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a run summary (a JSON object)")
    bad = [k for k in ("mode", "auc") if k not in summary] or \
        [k for k in ("auc", "auc_expected", "logloss", "wall_time_s")
         if summary.get(k) is not None and (isinstance(summary[k], bool) or not isinstance(summary[k], int | float))]
    if bad:
        raise ValueError(f"{path}: not an adfed run summary ({', '.join(bad)} missing or not a number); is {run} a "
                         f"run directory (adfed train --out)?")
    return summary


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def _fmt_auc(s: dict[str, Any]) -> str | None:
    auc, low, high = s.get("auc"), s.get("auc_ci_low"), s.get("auc_ci_high")
    if not isinstance(auc, (int, float)):
        return None
    ci = f" [{low:.3f}, {high:.3f}]" if all(isinstance(v, float) and v == v for v in (low, high)) else ""
    return f"{auc:.4f}{ci}"


def _num(key: str, fmt: str = "{:.4f}") -> Any:
    return lambda s: fmt.format(s[key]) if isinstance(s.get(key), (int, float)) else None


#: the rows of the results table: label, summary -> cell (None: not known)
RESULT_ROWS: list[tuple[str, Any]] = [
    ("mode", lambda s: s.get("mode")),
    ("CVR AUC [95% CI]", _fmt_auc),
    ("expected CVR AUC", _num("auc_expected")),
    ("CVR oracle", _num("oracle_auc")),
    ("CTCVR AUC", _num("ctcvr_auc")),
    ("CTCVR oracle", _num("oracle_ctcvr_auc")),
    ("test conversions", lambda s: None if s.get("test_positives") is None else
        f"{s['test_positives']}" + (" (noisy AUC)" if s.get("auc_noisy") else "")),
    ("epochs", _num("epochs", "{}")),
    ("rounds", _num("rounds", "{}")),
    ("clients per round", _num("clients_per_round", "{}")),
    ("upload per client", lambda s: _fmt_bytes(s["bytes_up_per_client"])
        if isinstance(s.get("bytes_up_per_client"), (int, float)) else None),
    ("download per client", lambda s: _fmt_bytes(s["bytes_down_per_client"])
        if isinstance(s.get("bytes_down_per_client"), (int, float)) else None),
    ("simulated time", _num("sim_time_s", "{:.0f} s")),
    ("wall time", _num("wall_time_s", "{:.1f} s")),
]


def _results_table(runs: list[tuple[str, dict[str, Any]]], *, title: str) -> Table:
    """One column per run, one row per figure of :data:`RESULT_ROWS` any run has."""
    table = Table(title=title)
    table.add_column("")
    for name, _ in runs:
        table.add_column(name, justify="right")
    for label, cell in RESULT_ROWS:
        cells = [cell(summary) for _, summary in runs]
        if any(c is not None for c in cells):
            table.add_row(label, *[c if c is not None else "-" for c in cells])
    return table


def _warn_noisy(runs: list[tuple[str, dict[str, Any]]]) -> None:
    from adfed.rundir import NOISY_POSITIVES

    for name, s in runs:
        if s.get("auc_noisy"):
            ci = _fmt_auc(s) or "?"
            console.print(f"[yellow]warning:[/yellow] {name}: only {s.get('test_positives')} test conversions "
                          f"(fewer than {NOISY_POSITIVES}): its CVR AUC {ci} (95% CI) is noisy; more test "
                          f"users (a bigger dataset; data.max_test_users=0 scores all) narrow it",
                          highlight=False, soft_wrap=True)


@app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (adfed train --out), side by side.")],
) -> None:
    """Print the results of finished runs side by side (e.g. centralized vs federated)."""
    try:
        summaries = [(run.name or str(run), _read_summary(run)) for run in runs]
    except ValueError as exc:
        _fail(str(exc))
    Console().print(_results_table(summaries, title="results"))
    _warn_noisy([(str(run), s) for run, (_, s) in zip(runs, summaries, strict=True)])


@app.command("rerank")
def rerank(
    run: Annotated[Path, typer.Option(help="The device model's run directory (adfed train --out; full model).")],
    data: Annotated[Path, typer.Option(help="Dataset directory with held-out requests (requests.parquet).")],
    out: Annotated[Path, typer.Option(help="Directory for rerank.json, the table, the plot, the ONNX model.")],
    cloud_run: Annotated[Path | None, typer.Option(
        help="A cloud_only run (the cloud's ranker); without it one is trained into OUT/cloud_run.")] = None,
    objective: Annotated[str, typer.Option(help="The phone's objective: conversions | revenue.")] = "conversions",
    blend: Annotated[float, typer.Option(help="Weight of the device score vs the cloud's, in [0, 1].")] = 1.0,
    top_n: Annotated[int, typer.Option(help="Candidates the cloud sends (0: all).")] = 0,
    k: Annotated[int, typer.Option(help="Cut-off of the headline figures.")] = 5,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    tags: Annotated[bool, typer.Option(help="Also mine user tags (FedAvg, LDP reports) into rerank.json.")] = True,
) -> None:
    """Re-rank a world's held-out requests on the phones and value the orders with the truth.

    The cloud ranks by eCPM with its cloud_only model; each phone re-scores what it
    receives with RUN's model exported to ONNX (onnxruntime). Writes OUT/rerank.json,
    OUT/rerank_by_k.csv, OUT/plots/uplift_vs_k.png and OUT/device_model.onnx.
    """
    from adfed.rerank.device import RerankSettings
    from adfed.rerank.report import run_rerank

    _log_warnings()
    try:
        settings = RerankSettings(objective=objective, blend=blend, top_n=top_n, k=k, seed=seed)  # type: ignore[arg-type]
        with _progress() as progress:
            task = progress.add_task("device scoring", total=None, info="requests")

            def on_progress(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            result = run_rerank(run, data, out, settings, cloud_run=cloud_run,
                                say=lambda msg: progress.console.print(msg, highlight=False, soft_wrap=True),
                                progress=on_progress)
        if tags:
            from adfed.rerank.report import add_tags

            add_tags(out, result, data, _world_tag_truth(data), seed=seed)
    except (AdfedError, ValueError, OSError) as exc:
        _fail(str(exc))
    keys = ("requests", f"uplift_conversions_at_{k}", f"uplift_conversions_at_{k}_oracle", f"uplift_revenue_at_{k}",
            f"ndcg_at_{k}_cloud", f"ndcg_at_{k}_device", f"ndcg_at_{k}_oracle", "latency_p50_ms", "latency_p99_ms",
            "onnx_max_abs_diff")
    print(json.dumps({key: result[key] for key in keys}, indent=2), flush=True)
    table = Table(title=f"re-ranking: uplift over the cloud's eCPM order (objective {objective})")
    for col in ("k", "conv. device", "95% CI", "conv. oracle", "rev. device", "rev. oracle", "NDCG device"):
        table.add_column(col, justify="right")
    for r in result["curve"]:
        table.add_row(str(r["k"]), f"{r['uplift_conversions_device']:+.1%}",
                      f"[{r['uplift_conversions_device_low']:+.1%}, {r['uplift_conversions_device_high']:+.1%}]",
                      f"{r['uplift_conversions_oracle']:+.1%}", f"{r['uplift_revenue_device']:+.1%}",
                      f"{r['uplift_revenue_oracle']:+.1%}", f"{r['ndcg_device']:.3f}")
    console.print(table)
    if "tags" in result:
        t = result["tags"]
        console.print(f"tags: accuracy {t.get('tag_accuracy', float('nan')):.3f} (no tags: "
                      f"{t.get('no_tag_accuracy', float('nan')):.3f}), AUC {t.get('tag_auc', float('nan')):.3f}; "
                      "LDP prevalence error " + ", ".join(f"eps {r['epsilon']:g}: {r['mean_abs_error']:.4f}"
                                                         for r in t["ldp"]), highlight=False, soft_wrap=True)
    console.print(f"rerank directory: {out}  (rerank.json, rerank_by_k.csv, plots/uplift_vs_k.png)",
                  highlight=False, soft_wrap=True)


def _world_tag_truth(data: Path) -> Any:
    """A synthetic world's true P(click and conversion) of every user per ad category,
    float64 [U, C] (the mean over each category's first 8 ads and 4 fixed contexts), or
    None for a dataset that is not a world of data_gen (no truth to score tags with)."""
    import numpy as np

    from adfed.data.store import read_manifest
    from data_gen.calibrate import build_world
    from data_gen.params import WorldParams
    from data_gen.truth import logits, sigmoid, user_truth_features
    from data_gen.users import user_state

    manifest = read_manifest(data)
    if manifest.get("generator") != "adfed.data_gen":
        return None
    p = WorldParams.from_dict(manifest["params"])
    world = build_world(p, int(manifest["params"]["seed"]))
    # 8 ads per category (repeated where a small world has fewer; ad 0 where it has none)
    ads = np.concatenate([np.resize(np.flatnonzero(world.ad_category == c)[:8], 8) if (world.ad_category == c).any()
                          else np.zeros(8, dtype=np.int64) for c in range(p.num_ad_categories)])
    ctx = np.random.default_rng(0).integers(0, 24 * p.num_slots * 4, size=4)
    out = np.empty((p.num_users, p.num_ad_categories))
    for start in range(0, p.num_users, 2048):
        ids = np.arange(start, min(start + 2048, p.num_users))
        uf = user_truth_features(world, user_state(world, ids))
        rows, a, c = (g.ravel() for g in np.meshgrid(np.arange(len(ids)), ads, ctx, indexing="ij"))
        lg = logits(world, uf, rows, a, c)
        prob = (sigmoid(lg.click) * sigmoid(lg.cvr)).reshape(len(ids), p.num_ad_categories, -1)
        out[ids] = prob.mean(axis=2)
    return out


experiment_app = typer.Typer(help="Run the experiments behind docs/results/ (tables and plots).",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def experiment_run(
    name: Annotated[str, typer.Argument(help="fl_vs_central | window | async | ceiling | replay | replay_parts | scale | privacy | vocabulary | all")],
    out: Annotated[Path, typer.Option(help="Directory for the experiment's runs and results.")] = Path("runs/experiments"),
    config_file: Annotated[Path | None, typer.Option("--config", help="Base TOML config; keys it leaves out keep their defaults (e.g. experiments/configs/fedavg.toml: FedAvg).")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset directory (data.path).")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (fl.rounds).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any key: section.key=VALUE, VALUE in TOML (strings quoted: 'fl.strategy=\"fedavg\"'); repeatable; every key is listed in docs/config.md.")] = None,
    users: Annotated[int | None, typer.Option(
        help="Instead of --data: a synthetic world of this many users (10,000 ads), generated "
             "into OUT/world-USERS-SEED (reused when there).")] = None,
    world_seed: Annotated[int, typer.Option(help="Seed of the world --users generates.")] = 0,
) -> None:
    """Run an experiment: several trainings, results.json, a comparison plot."""
    from experiments import fl_targets

    if name != "all" and name not in fl_targets.EXPERIMENTS:
        _fail(f"unknown experiment {name!r}; known: all, {', '.join(sorted(fl_targets.EXPERIMENTS))}")
    if users is not None and data is not None:
        _fail("--users generates a world; give either --users or --data, not both")
    names = sorted(fl_targets.EXPERIMENTS) if name == "all" else [name]
    try:
        if users is not None:
            data = str(_experiment_world(out, users, world_seed))
        cfg = _resolve_config(config_file, sets or [], {"data.path": data, "seed": seed, "fl.rounds": rounds})
        for n in names:
            results = fl_targets.run(n, cfg, out, progress=lambda msg: console.print(msg))
            print(json.dumps(results, indent=2, default=str))
    except (AdfedError, ValueError, OSError) as exc:
        _fail(str(exc))


def _experiment_world(out: Path, users: int, seed: int) -> Path:
    """The world of ``--users`` / ``--world-seed`` under OUT, generated once."""
    from data_gen.generate import generate
    from data_gen.params import WorldParams

    if users < 1:
        raise ValueError(f"--users must be an int >= 1; got {users}")
    path = out / f"world-{users}-{seed}"
    if not (path / "manifest.json").exists():
        console.print(f"generating a world of {users} users (seed {seed}) into {path}", highlight=False)
        generate(path, WorldParams(num_users=users, num_ads=10_000), seed=seed)
    return path


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
