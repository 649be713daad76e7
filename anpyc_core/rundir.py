"""The run directory: crash-safe checkpoints as numbered generations, plus the human-facing files.

Layout::

    RUN/
      run.json                 manifest (format anpyc.run, version): config, backbone, input spec, generation
      state/000007/            the committed generation (never modified once committed)
        trunk.safetensors      trunk parameters and shared buffers          (format anpyc.trunk)
        masks.safetensors      unit owners, uint8, 255 = free                (format anpyc.masks)
        heads.safetensors      head/<task>/weight|bias                       (format anpyc.heads)
        stats.safetensors      stats/<task>/<buffer>: per-task BatchNorm statistics (format anpyc.stats)
        consolidation.safetensors  omega/<param>, anchor/<param>, tracker/...  (format anpyc.consolidation)
        optimizer.safetensors  mid-phase optimizer state (only between epochs)  (format anpyc.optimizer)
        state.json             cursor (task, phase, epoch, prune step), task records, accuracy matrices
      metrics.json             accuracy matrix, ACC, BWT, forgetting, capacity, params/FLOPs per task
      events.jsonl             one line per epoch / prune step / evaluation
      config.json              the resolved configuration

A save writes a complete new generation into a temporary folder, renames it into place, then atomically
replaces ``run.json`` to point at it, then deletes older generations: a crash at any moment leaves the last
committed generation intact and referenced. A lock file keeps two processes from writing one run.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import AnpycError, RunDirError, clip
from .fileio import atomic_write_json, read_json, sha256_file
from .runfiles import check_manifest

__all__ = ["RunDir", "RUN_FORMAT", "RUN_VERSION", "RUN_READS"]

RUN_FORMAT = "anpyc.run"
RUN_VERSION = 3
# version 1 recorded a named backbone with the importable factory that built it ({"factory": "module:function"});
# version 2 records only its name ({"source": "name" | "custom"}): a file must not name code. Both are read (the
# one factory string version 1 ever wrote is read as a name, see anpyc.backbones.name_from_record).
# version 3 adds "growth" (every widening of the backbone, replayed on open; "layout" is the layout before it).
RUN_READS = (1, 2, 3)


class RunDir:
    """A run directory; ``commit`` writes generations, ``state_dir`` is the committed one."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False, lock: bool = True):
        self.path = Path(path)
        self._lock_fd: int | None = None
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-", delete=True)
                probe.close()
            except OSError as e:
                raise RunDirError(f"cannot write to output directory {self.path} ({e.strerror})",
                                  "choose a writable --out directory or fix its permissions") from None
        elif not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} does not exist", "check the path (it is what --out was)")
        if lock and create:
            self._acquire_lock()
            self._remove_debris()

    # ------------------------------------------------------------------ locking
    def _acquire_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(f"run directory {self.path} is in use by another anpyc process",
                              "wait for it to finish, or use another --out directory") from None
        self._lock_fd = fd

    def _remove_debris(self) -> None:
        """Temporary files, uncommitted generations and superseded ones left by a process killed mid-save."""
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        state = self.path / "state"
        if not state.is_dir():
            return
        try:
            committed = self.manifest().get("generation") if self.manifest_path.exists() else None
        except AnpycError:
            return  # an unreadable manifest: leave everything for the user to look at
        for p in state.iterdir():
            if p.name.startswith(".") or (p.name.isdigit() and committed is not None and int(p.name) != committed):
                shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / "run.json"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise RunDirError(f"{self.path} is not an anpyc run directory (run.json is missing)",
                              "pass the directory given to --out when training")
        m = read_json(self.manifest_path, what="run manifest")
        if not isinstance(m, dict) or m.get("format") != RUN_FORMAT:
            raise RunDirError(f"{self.manifest_path} is not an anpyc run manifest",
                              "pass the directory given to --out when training")
        version = m.get("version")
        if isinstance(version, bool) or version not in RUN_READS:
            raise RunDirError(f"run {self.path} has format version {clip(version, 40)}, this anpyc reads "
                              f"{list(RUN_READS)}",
                              "use the anpyc version that wrote it")
        return check_manifest(m, f"run manifest {self.manifest_path}")

    def state_dir(self) -> Path:
        """The committed generation; every file it lists must be present, a regular file and unchanged, and it may
        hold no file the manifest does not list (run.json names plain file names only: nothing outside it is read)."""
        m = self.manifest()
        gen = m.get("generation")
        if gen is None:
            raise RunDirError(f"run {self.path} has no committed state yet", "train at least one epoch first")
        d = self.path / "state" / f"{gen:06d}"
        if not d.is_dir() or d.is_symlink():
            raise RunDirError(f"run {self.path} is missing its committed generation state/{gen:06d}",
                              "restore the run directory from a backup, or re-train")
        files = m.get("files") or {}
        for name, digest in files.items():
            f = d / name
            try:
                mode = os.lstat(f).st_mode
            except FileNotFoundError:
                raise RunDirError(f"run {self.path} is missing {f.relative_to(self.path)}",
                                  "restore the file, or re-run training with --resume from an intact copy") from None
            if not stat.S_ISREG(mode):
                raise RunDirError(f"{f.relative_to(self.path)} in run {self.path} is not a regular file",
                                  "restore the file from a backup or re-train")
            if sha256_file(f) != digest:
                raise RunDirError(f"{f.relative_to(self.path)} in run {self.path} is corrupt (checksum mismatch)",
                                  "restore the file from a backup or re-train")
        extra = sorted(p.name for p in d.iterdir() if p.name not in files)
        if extra:
            raise RunDirError(f"state/{gen:06d} in run {self.path} holds {clip(extra[0], 60)!r}, which run.json "
                              "does not list", "remove the file, or restore the run directory from a backup")
        return d

    # ------------------------------------------------------------------ commit
    def commit(self, write: Callable[[Path], None], manifest: dict[str, Any]) -> int:
        """Write a new generation with ``write(tmpdir)`` and make it the committed one; returns its number."""
        state_root = self.path / "state"
        state_root.mkdir(parents=True, exist_ok=True)
        prev = None
        if self.manifest_path.exists():
            try:
                prev = int(read_json(self.manifest_path).get("generation"))
            except (TypeError, ValueError, Exception):
                prev = None
        existing = [int(p.name) for p in state_root.iterdir() if p.name.isdigit()]
        gen = max(existing + ([prev] if prev is not None else []) + [0]) + 1
        tmp = Path(tempfile.mkdtemp(prefix=f".{gen:06d}-", dir=state_root))
        try:
            write(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            final = state_root / f"{gen:06d}"
            os.replace(tmp, final)
            doc = dict(manifest)
            doc.update({"format": RUN_FORMAT, "version": RUN_VERSION, "generation": gen, "files": files})
            atomic_write_json(self.manifest_path, doc)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise RunDirError(f"disk full while saving run {self.path}; the previous state is intact",
                                  "free disk space and resume with --resume") from None
            raise RunDirError(f"could not save run {self.path} ({e.strerror or e}); the previous state is intact",
                              "check the disk and permissions, then resume with --resume") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for p in state_root.iterdir():
            if p.name != f"{gen:06d}" and (p.name.isdigit() or p.name.startswith(".")):
                shutil.rmtree(p, ignore_errors=True)
        return gen
