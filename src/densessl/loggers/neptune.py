"""A Lightning logger on the ``neptune`` client (Lightning dropped its own Neptune logger).

Project and token come from ``NEPTUNE_PROJECT`` / ``NEPTUNE_API_TOKEN`` (or the arguments). On
air-gapped nodes use ``mode="offline"``: the run is written under ``<data_directory>/offline/``
(``logger=neptune``: ``<run folder>/logs/.neptune``) and ``neptune sync --path <run folder>/logs``
uploads it later from a connected machine. Only rank 0 creates a run, one per training: it stays open
after ``Trainer.fit`` (Lightning's ``finalize``) for what the training script logs afterwards (the
before/after figures and pictures), until :meth:`close`.
"""
from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class NeptuneLogger(Logger):
    """Log hyperparameters, metrics (with steps), images and files to a Neptune run.

    Args:
        project: "workspace/project" (default: ``NEPTUNE_PROJECT``).
        api_token: default ``NEPTUNE_API_TOKEN``; unused offline.
        mode: "async" (default), "sync", "offline" or "debug".
        name / tags / description: run metadata.
        with_id: resume logging into an existing run (e.g. after preemption).
        prefix: namespace all metrics are logged under (e.g. "training").
        data_directory: where the client keeps its local data (offline runs, the async queue);
            default the client's own, ``./.neptune``.
    """

    def __init__(self, project: str | None = None, api_token: str | None = None, mode: str = "async",
                 name: str | None = None, tags: list[str] | None = None, description: str | None = None,
                 with_id: str | None = None, prefix: str = "", data_directory: str | None = None,
                 **init_kwargs: Any) -> None:
        super().__init__()
        self._init = dict(project=project or os.environ.get("NEPTUNE_PROJECT"),
                          api_token=api_token or os.environ.get("NEPTUNE_API_TOKEN"), mode=mode, name=name,
                          tags=list(tags or []), description=description, with_id=with_id, **init_kwargs)
        missing = [f"{env} (or logger.neptune.{key}=...)" for env, key in
                   (("NEPTUNE_PROJECT=workspace/project", "project"), ("NEPTUNE_API_TOKEN", "api_token"))
                   if not self._init[key]]
        if mode not in ("offline", "debug") and missing:  # here, not as the client's banner at the first log
            raise ValueError(f"the Neptune logger (mode={mode}) needs {' and '.join(missing)}; without network "
                             f"access or a token use NEPTUNE_MODE=offline (or logger.neptune.mode=offline) and "
                             f"upload later with `neptune sync`")
        self._prefix = prefix.rstrip("/")
        self.data_directory = data_directory
        self._run: Any = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``neptune.Run`` (created lazily on rank 0)."""
        if self._run is None:
            import neptune

            kwargs = {k: v for k, v in self._init.items() if v is not None}
            if kwargs.get("mode") == "offline":
                kwargs.setdefault("project", "offline/offline")
            # The client takes its folder from this variable only, when the run is created.
            previous = os.environ.get("NEPTUNE_DATA_DIRECTORY")
            if self.data_directory is not None:
                os.environ["NEPTUNE_DATA_DIRECTORY"] = str(self.data_directory)
            try:
                self._run = neptune.init_run(**kwargs)
            finally:
                if previous is None:
                    os.environ.pop("NEPTUNE_DATA_DIRECTORY", None)
                else:
                    os.environ["NEPTUNE_DATA_DIRECTORY"] = previous
        return self._run

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from neptune.utils import stringify_unsupported

        params = vars(params) if isinstance(params, Namespace) else params
        self.experiment["parameters"] = stringify_unsupported(params)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.experiment[self._key(k)].append(float(v), step=step)

    @rank_zero_only
    def log_image(self, key: str, image: Any, step: int | None = None) -> None:
        """``image``: a file path, PIL image, HWC numpy array or CHW/HWC tensor in [0, 1] or uint8."""
        from neptune.types import File

        if isinstance(image, (str, Path)):
            value = File(str(image))
        else:
            value = File.as_image(image.permute(1, 2, 0).cpu().numpy() if hasattr(image, "permute") and
                                  image.ndim == 3 and image.shape[0] in (1, 3) else image)
        self.experiment[self._key(key)].append(value, step=step)

    @rank_zero_only
    def log_text(self, key: str, text: str, extension: str = "txt") -> None:
        """A file attribute with ``text`` as content (e.g. the resolved YAML config)."""
        from neptune.types import File

        self.experiment[key].upload(File.from_content(text, extension=extension))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End of ``Trainer.fit``: marks a failed fit and flushes, but leaves the run open (see the module)."""
        if self._run is not None:
            if status and status != "success":
                self._run["sys/failed"] = True
            self._run.wait()

    @rank_zero_only
    def close(self) -> None:
        """Stop the run (the neptune client also stops open runs when the process exits)."""
        if self._run is not None:
            self._run.stop()
            self._run = None

    @property
    def name(self) -> str:
        return self._init.get("name") or "densessl"

    @property
    def version(self) -> str | None:
        # The run id is only known to the server; offline runs get theirs at `neptune sync`.
        if self._run is None or self._init["mode"] in ("offline", "debug"):
            return None
        return self._run["sys/id"].fetch()

    @property
    def save_dir(self) -> str | None:
        if self._init["mode"] != "offline":
            return None
        return str(Path(self.data_directory or ".neptune").resolve())
