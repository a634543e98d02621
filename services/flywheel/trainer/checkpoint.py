"""Policy checkpoints: write durably and atomically via fsspec, find the latest, load to resume.

A checkpoint directory `<root>/policy-NNNN/` holds
- the Hugging Face causal LM (`config.json`, `generation_config.json`, `model.safetensors`) and the
  tokenizer: the policy service loads it with `AutoModelForCausalLM.from_pretrained`;
- `value_head.safetensors` (the PPO value head);
- `trainer_state.pt` (optimizer state) and `trainer_state.json` (step, KL controller, the trained
  rollout ids per behaviour version, counters);
- `flywheel.json` (version, parent, step, metrics, config): written last, it marks the checkpoint
  complete. Readers ignore directories without it.

The directory is assembled in a local staging dir, fsynced, then moved into place: for local
paths (`file://`) with one atomic `rename`; for remote filesystems every file is uploaded and
`flywheel.json` last, so a reader never sees a half-written checkpoint as complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file, save_file

from flywheel import checkpoints
from flywheel.runtime.config import default_home
from flywheel.versions import POLICY, version_number

log = logging.getLogger(__name__)

METADATA_FILE = "flywheel.json"
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
KIND = POLICY


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CheckpointInfo:
    version: str
    uri: str
    step: int
    parent_version: str
    metrics: dict[str, float]
    created_at: float
    base: bool = False
    model_name: str = ""

    @property
    def number(self) -> int:
        return version_number(self.version)


class CheckpointStore:
    """Checkpoints under one root URI (`file:///...` or any fsspec URL)."""

    def __init__(self, root_uri: str | Path, *, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir or default_home() / "checkpoints"  # local copies of remote checkpoints
        root_uri = str(root_uri)
        if "://" not in root_uri:
            root_uri = Path(root_uri).resolve().as_uri()
        self.root_uri = root_uri.rstrip("/")
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root_uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self.root_path, exist_ok=True)

    def uri_for(self, version: str) -> str:
        return f"{self.root_uri}/{version}"

    def _path_for(self, version: str) -> str:
        return f"{self.root_path.rstrip('/')}/{version}"

    # -- write ------------------------------------------------------------------------------
    def save(self, version: str, *, model: torch.nn.Module, tokenizer: Any | None, value_head: torch.nn.Module | None,
             optimizer_state: dict[str, Any] | None, trainer_state: dict[str, Any], metadata: dict[str, Any]) -> str:
        """Write checkpoint `version` durably; returns its URI. Idempotent for an existing version."""
        target = self._path_for(version)
        if self.fs.exists(f"{target}/{METADATA_FILE}"):
            log.warning("checkpoint %s already complete; keeping the existing one", version)
            return self.uri_for(version)
        staging_parent = Path(self.root_path) if self.local else None
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=staging_parent))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if value_head is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in value_head.state_dict().items()},
                          str(staging / VALUE_HEAD_FILE))
            if optimizer_state is not None:
                torch.save(optimizer_state, staging / STATE_PT)
            (staging / STATE_JSON).write_text(json.dumps(trainer_state))
            meta = {"kind": KIND, "version": version, "complete": True, "created_at": time.time(), **metadata}
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if self.local:
                _fsync_tree(staging)
                if os.path.exists(target):  # an incomplete leftover (no flywheel.json): replace it
                    shutil.rmtree(target)
                os.rename(staging, target)
                _fsync_dir(Path(self.root_path))
            else:
                names = sorted(p.name for p in staging.iterdir() if p.name != METADATA_FILE)
                for name in names:
                    self.fs.put_file(str(staging / name), f"{target}/{name}")
                self.fs.put_file(str(staging / METADATA_FILE), f"{target}/{METADATA_FILE}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.uri_for(version)

    def cleanup_staging(self) -> list[str]:
        """Remove staging directories left by a trainer killed while writing a checkpoint."""
        removed = []
        if not self.local:
            return removed
        for entry in Path(self.root_path).glob(f".{KIND}-*.tmp-*"):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        return removed

    # -- read -------------------------------------------------------------------------------
    def versions(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        out = []
        try:
            entries = self.fs.ls(self.root_path, detail=False)
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or not name.startswith(f"{KIND}-"):
                continue
            try:
                version_number(name)
            except ValueError:
                continue
            info = self.info(name)
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda i: i.number)

    def info(self, version: str) -> CheckpointInfo | None:
        path = f"{self._path_for(version)}/{METADATA_FILE}"
        try:
            with self.fs.open(path, "r") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            return None
        return CheckpointInfo(version=version, uri=self.uri_for(version), step=int(meta.get("step", 0)),
                              parent_version=meta.get("parent_version", ""), metrics=meta.get("metrics", {}),
                              created_at=float(meta.get("created_at", 0.0)), model_name=meta.get("model_name", ""))

    def latest(self) -> CheckpointInfo | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def local_dir(self, version: str) -> Path:
        """A local directory with the checkpoint's files (the checkpoint itself for file://)."""
        if self.local:
            return Path(self._path_for(version))
        return checkpoints.resolve(self.uri_for(version), self.cache_dir)

    def load_trainer_state(self, version: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        d = self.local_dir(version)
        state = json.loads((d / STATE_JSON).read_text())
        opt = torch.load(d / STATE_PT, map_location="cpu", weights_only=False) if (d / STATE_PT).exists() else None
        return state, opt

    def load_value_head(self, version: str, value_head: torch.nn.Module) -> bool:
        path = self.local_dir(version) / VALUE_HEAD_FILE
        if not path.exists():
            return False
        value_head.load_state_dict(load_file(str(path)))
        return True

    def prune(self, keep_last: int, protect: set[str] = frozenset()) -> list[str]:
        """Delete all but the newest `keep_last` complete checkpoints (never those in `protect`)."""
        if keep_last <= 0:
            return []
        removed = []
        for info in self.versions()[:-keep_last]:
            if info.version in protect:
                continue
            self.fs.rm(self._path_for(info.version), recursive=True)
            removed.append(info.version)
        return removed
