"""The model repository: Triton's layout on disk, and the versions loaded from it.

`<root>/<model>/config.pbtxt` (optional) and `<root>/<model>/<version>/model.onnx`. Loads build the
new versions completely before swapping them in, so a failed load leaves the previous versions
serving and other models never notice; retired versions finish their queued requests first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hotpath._proto import model_config_pb2
from hotpath.errors import InferenceError, InvalidArgument, LoadError, ModelNotFound, shown
from hotpath.observability.stats import StatsStore
from hotpath.serving.config import DEFAULT_MODEL_FILE, read_config
from hotpath.serving.model import Model
from hotpath.settings import Settings

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_NAME_LENGTH = 255
"""Longest model name: a directory name on every common filesystem (NAME_MAX)."""


def check_model_name(name: str) -> str:
    """Refuse any name that is not a plain directory name, so no request reads outside the repository."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"invalid model name {shown(name)}: a model name is a directory name "
                              f"of at most {MAX_NAME_LENGTH} characters")
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"invalid model name {shown(name)}: use letters, digits, '_', '-' and '.', without path separators or '..'")
    return name


def _select_versions(model_dir: Path, config: model_config_pb2.ModelConfig) -> list[int]:
    filename = config.default_model_filename or DEFAULT_MODEL_FILE
    available = sorted(int(p.name) for p in model_dir.iterdir()
                       if p.is_dir() and p.name.isdigit() and (p / filename).is_file())
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        chosen = available
    elif choice == "specific":
        missing = sorted(set(policy.specific.versions) - set(available))
        if missing:
            raise LoadError(f"model '{config.name}': version policy asks for versions {missing}, which have no {filename} in {model_dir}")
        chosen = sorted(policy.specific.versions)
    else:
        n = policy.latest.num_versions if choice == "latest" else 1
        chosen = available[-max(n, 1):]
    if not chosen:
        raise LoadError(f"model '{config.name}': no version directory with a {filename} in {model_dir}")
    return chosen


@dataclass
class ModelEntry:
    """What the repository knows about one model name: its served versions and last load outcome."""

    versions: dict[int, Model] = field(default_factory=dict)
    state: str = "UNAVAILABLE"
    reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelRepository:
    """Loads, serves and unloads the models of one repository directory."""

    def __init__(self, root: Path, settings: Settings, store: StatsStore) -> None:
        self.root = root
        self.settings = settings
        self.store = store
        self._entries: dict[str, ModelEntry] = {}
        self.on_change: list[Callable[[str, bool], None]] = []
        """Called with (model name, ready) after every load or unload (health, cache invalidation)."""

    def names_on_disk(self) -> list[str]:
        """Every model directory in the repository."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _PLAIN_NAME.fullmatch(p.name))

    async def load_all(self) -> None:
        """Load every model on disk; a model that fails is logged and left unavailable."""
        for name in self.names_on_disk():
            try:
                await self.load(name)
            except InferenceError as exc:
                log.error("model '%s' failed to load: %s", name, exc.message)

    async def load(self, name: str) -> list[Model]:
        """Load (or reload) a model's versions from disk and serve them; raises LoadError or ModelNotFound."""
        check_model_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"no model '{name}' in the model repository")
        entry = self._entries.setdefault(name, ModelEntry())
        async with entry.lock:
            try:
                config = read_config(model_dir)
                versions = _select_versions(model_dir, config)
                filename = config.default_model_filename or DEFAULT_MODEL_FILE
                loaded = {}
                for version in versions:
                    loaded[version] = await asyncio.to_thread(
                        Model.load, name, version, model_dir / str(version) / filename, config, self.settings, self.store)
            except Exception as exc:
                error = exc if isinstance(exc, LoadError) else LoadError(
                    f"model '{name}' failed to load: {type(exc).__name__}: {exc}")
                if error is not exc:
                    log.exception("model '%s': unexpected error while loading", name)
                error = LoadError(self._relative(error.message))
                entry.reason = error.message
                if not entry.versions:
                    entry.state = "UNAVAILABLE"
                raise error from None
            retired = list(entry.versions.values())
            entry.versions = loaded
            entry.state, entry.reason = "READY", ""
        for model in loaded.values():
            log.info("loaded model '%s' version %d: %s, max_batch_size %d, inputs %s",
                     name, model.version, model.plan.describe(), model.config.max_batch_size,
                     ", ".join(f"{s.name} {s.datatype.name}{list(s.dims)}" for s in model.inputs))
        self._notify(name, True)
        for model in retired:
            await model.close()
        return list(loaded.values())

    async def unload(self, name: str) -> None:
        """Stop serving every version of a model; queued requests finish first."""
        check_model_name(name)
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            raise ModelNotFound(f"model '{name}' is not loaded")
        async with entry.lock:
            retired = list(entry.versions.values())
            entry.versions = {}
            entry.state, entry.reason = "UNAVAILABLE", "unloaded"
        self._notify(name, False)
        for model in retired:
            await model.close()
        log.info("unloaded model '%s'", name)

    def _relative(self, message: str) -> str:
        """`message` with the repository's own location cut from its paths: clients see `model/1/model.onnx`."""
        for root in {str(self.root.resolve()), str(self.root)}:
            message = message.replace(root + os.sep, "").replace(root, "the model repository")
        return message

    def _notify(self, name: str, ready: bool) -> None:
        for callback in self.on_change:
            callback(name, ready)

    def get(self, name: str, version: str = "") -> Model:
        """The served model for a name and version string ("" means the latest); raises ModelNotFound."""
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            check_model_name(name)
            raise ModelNotFound(f"model '{name}' is not loaded" + (f" ({entry.reason})" if entry and entry.reason else ""))
        if not version:
            return entry.versions[max(entry.versions)]
        try:
            return entry.versions[int(version)]
        except (ValueError, KeyError):
            raise ModelNotFound(f"model '{name}' has no loaded version {shown(version)}; loaded versions are {sorted(entry.versions)}") from None

    def served(self) -> list[Model]:
        """Every loaded model version."""
        return [m for entry in self._entries.values() for m in entry.versions.values()]

    def serves(self, model: Model) -> bool:
        """Whether `model` is still the served copy of its version (not retired by a reload or unload)."""
        entry = self._entries.get(model.name)
        return entry is not None and entry.versions.get(model.version) is model

    def versions(self, name: str) -> list[int]:
        """Loaded versions of a model, ascending."""
        entry = self._entries.get(name)
        return sorted(entry.versions) if entry else []

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or loaded."""
        rows = []
        for name in sorted(set(self.names_on_disk()) | set(self._entries)):
            entry = self._entries.get(name)
            if entry and entry.versions:
                rows.extend((name, str(v), "READY", "") for v in sorted(entry.versions))
            else:
                rows.append((name, "", entry.state if entry else "UNAVAILABLE", entry.reason if entry else ""))
        return rows

    def ready(self) -> bool:
        """Whether every model that was asked to load is serving."""
        return all(entry.versions or entry.reason == "unloaded" for entry in self._entries.values())

    async def close(self) -> None:
        """Unload everything, letting queued requests finish."""
        for entry in self._entries.values():
            for model in entry.versions.values():
                await model.close()
            entry.versions = {}
