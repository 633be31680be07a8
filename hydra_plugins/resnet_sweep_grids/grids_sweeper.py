import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.resnet_sweep_grids.grids_sweeper.GridsSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None  # common to every grid (Hydra's grid syntax)
    grids: list[dict[str, str]] = field(default_factory=list)  # each one a cartesian product


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="resnet_sweep")


class GridsSweeper(BasicSweeper):
    """Jobs = the concatenation of each grid's cartesian product. A key given on the command line
    replaces the same key in every grid (e.g. a smoke run's ``trainer.max_epochs=1``)."""

    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        grids: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in (grids or [])] or [{}]

    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs: list[list[str]] = []
        for grid in self.grids:
            entries: dict[str, str] = {}
            for line in [*self._parse_config(), *(f"{k}={v}" for k, v in grid.items()), *arguments]:
                entries[parser.parse_override(line).get_key_element()] = line
            jobs += self.split_arguments(parser.parse_overrides(list(entries.values())), None)[0]
        log.info("%d grids, %d jobs", len(self.grids), len(jobs))
        self.overrides = list(self.split_overrides_to_chunks(jobs, self.max_batch_size))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, job_idx = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for r in results:
                _ = r.return_value
            job_idx += len(batch)
            returns.append(results)
        return returns
