"""Training monitors behind one small interface: TensorBoard (OUT/tb), Weights & Biases (an offline run in OUT/wandb)
and MLflow (a local store, by default OUT/mlflow.db). Everything stays inside the run's output directory; the
packages are optional (`pip install 'gptx[monitor]'`) and a missing one fails before any training work."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from gptx.runtime.errors import InvalidInput, MissingDependency

REPORTERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "gptx"  # wandb project and mlflow experiment, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


class Reporter:
    """What the training loop needs from a monitoring backend (one run each)."""

    name: str
    location: str  # where the run's records are, for the user

    def log_config(self, config: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, name: str) -> None:
        """Nothing by default (TensorBoard has no artifact store; the checkpoint stays in the output directory)."""

    def close(self, failed: bool = False) -> None: ...


def installed(name: str) -> bool:
    """Importable without importing it (wandb and mlflow take seconds); sys.modules[name] = None means blocked."""
    return sys.modules[name] is not None if name in sys.modules else importlib.util.find_spec(name) is not None


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """'tensorboard,wandb' or ['wandb'] -> ('tensorboard', 'wandb'); None: tensorboard when installed; 'none': ()."""
    if value is None:
        return ("tensorboard",) if installed("tensorboard") else ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise InvalidInput(f"unknown report_to {', '.join(unknown)}: choose from {', '.join(REPORTERS)} "
                           "(comma-separated) or none")
    return tuple(dict.fromkeys(names))  # de-duplicated, order kept


def require_installed(names: Iterable[str]) -> None:
    missing = [n for n in names if not installed(n)]
    if missing:
        raise MissingDependency(f"--report-to {','.join(missing)} needs {' and '.join(missing)}: "
                                "pip install 'gptx[monitor]'")


def check_mlflow_uri(uri: str) -> str:
    if not uri.startswith(("file:", "sqlite:")):
        raise InvalidInput(f"mlflow_uri must be a local store (a file: or sqlite: URI), got {uri!r}")
    return uri


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params and TensorBoard text are flat."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoardReporter(Reporter):
    name = "tensorboard"

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.location = str(out_dir / "tb")
        self.writer = SummaryWriter(log_dir=self.location)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


@contextmanager
def env_default(name: str, value: str):
    """Set an environment variable for the duration of a block unless the user set it; restore it afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


class WandbReporter(Reporter):
    """An offline W&B run in OUT/wandb; `wandb sync` can upload it later."""

    name = "wandb"

    def __init__(self, out_dir: Path):
        import wandb

        self.wandb = wandb
        self.data_dir = str(out_dir / "wandb")  # artifact staging copies: keep them with the run, not in ~/.local
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        with env_default("WANDB_DATA_DIR", self.data_dir):
            self.run = wandb.init(dir=str(out_dir), project=os.environ.get("WANDB_PROJECT", PROJECT), mode=mode,
                                  settings=wandb.Settings(console="off", quiet=True))
        self.location = str(self.run.dir).removesuffix("/files") if self.run.dir else str(out_dir / "wandb")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        with env_default("WANDB_DATA_DIR", self.data_dir):
            artifact = self.wandb.Artifact(name=f"{name}-{self.run.id}", type="model")
            artifact.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        with env_default("WANDB_DATA_DIR", self.data_dir):
            self.run.finish(exit_code=1 if failed else 0)


class MlflowReporter(Reporter):
    """An MLflow run in a local store (default: OUT/mlflow.db, artifacts in OUT/mlartifacts); no server. Metrics go in
    batches at most FLUSH_SECONDS apart: one SQLite commit (~28 ms) costs more than a small model's training step."""

    name = "mlflow"
    FLUSH_SECONDS = 2.0
    MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, out_dir: Path, tracking_uri: str | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        uri = check_mlflow_uri(tracking_uri) if tracking_uri else f"sqlite:///{out_dir.resolve() / 'mlflow.db'}"
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # a new store's default artifact root is ./mlartifacts of the current directory: keep it in OUT
                experiment_id = self.client.create_experiment(
                    experiment_name, artifact_location=(out_dir.resolve() / "mlartifacts").as_uri())
            self.run_id = self.client.create_run(experiment_id).info.run_id
        except (MlflowException, SQLAlchemyError) as e:
            reason = str(getattr(e, "orig", None) or e).split(". ")[0].splitlines()[0][:200]
            if uri.startswith("file:"):
                reason = ("MLflow 3 opens file: stores only with MLFLOW_ALLOW_FILE_STORE=true; a sqlite: URI needs "
                          "nothing")
            raise InvalidInput(f"mlflow cannot use the tracking store {uri}: {reason}") from None
        self.tracking_uri = uri
        self.location = f"{uri} (run {self.run_id})"
        self.pending, self.last_flush = [], time.time()

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = time.time()
        self.pending += [Metric(k, float(v), int(now * 1000), step) for k, v in metrics.items()]
        if len(self.pending) >= self.MAX_BATCH - 10 or now - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending, self.last_flush = [], time.time()

    def log_artifact(self, path: Path, name: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def close(self, failed: bool = False) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Reporters(list):
    """Several reporters driven as one (the training loop holds exactly one of these, possibly empty)."""

    @property
    def locations(self) -> dict[str, str]:
        return {r.name: r.location for r in self}

    def log_config(self, config: dict) -> None:
        for r in self:
            r.log_config(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for r in self:
            r.log_metrics(metrics, step)

    def log_artifact(self, path: Path, name: str) -> None:
        for r in self:
            r.log_artifact(path, name)

    def close(self, failed: bool = False) -> None:
        for r in self:
            r.close(failed)


def open_reporters(names: Sequence[str], out_dir: Path, *, mlflow_uri: str | None = None) -> Reporters:
    """Start one run per named backend (names from `parse_report_to`); on failure, close the ones already open."""
    require_installed(names)
    start = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter,
             "mlflow": lambda out: MlflowReporter(out, mlflow_uri)}
    opened: list[Reporter] = []
    try:
        for name in names:
            opened.append(start[name](out_dir))
    except BaseException:
        Reporters(opened).close(failed=True)
        raise
    return Reporters(opened)
