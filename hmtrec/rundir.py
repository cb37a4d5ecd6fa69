"""A run directory, written and read only through `RunDir`.

A run directory holds everything one run produced: the resolved config, run.json (the run-info
record: kind, models, status, versions, config hash), checkpoints, weights, vocabularies, metrics
and a log. Nothing in it is a pickle. The guarantees, for every config kind:

- nothing is written before the same-run check: a directory that holds a run of another kind or
  another resolved config is refused, naming the differing keys (`RunDir.begin`);
- one process at a time: a lock file per run directory (`fcntl.flock`, released when the process dies);
- `default_run_dir` names the folder from the config and its hash, so rerunning the same command resumes;
- every file is written through a temporary file and a rename (readers never see a torn file), and
  a write error is one line naming the file; orphaned temporary files of a killed run are removed
  when it resumes;
- the status in run.json is written last; consumers of a run's outputs call `require_done`;
- no symlink is followed for writing: the log is opened with O_NOFOLLOW, renames replace a link
  rather than its target, and a symlinked model folder is refused;
- model labels are plain names (`check_label`), so a label can neither escape the run directory
  nor forge log lines;
- every artefact read error is one line naming the file and the remedy (`ArtefactError`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from hmtrec.errors import ConfigError, HmtrecError

LOGGER_NAME = "hmtrec"
RUN_INFO = "run.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
BASELINES_DIR = "baselines"
SELECTION_DIR = "selection"   # a final fit's selection run (train.final_fit), inside the model's folder
TEMP_SUFFIX = ".tmp"
DONE, TRAINING = "done", "training"
# Keys that may change between a run and its resumption: where and how fast it runs, and its
# evaluation (re-evaluated on every run). A kind's config class adds its own in `resumable_changes`.
RESUMABLE_CHANGES = ("eval", "train.resume", "train.device", "train.threads", "name")
WEIGHTS_FILE = "model.safetensors"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
# A temporary file of `atomic_write_bytes`: ".<name>.<random>.tmp" (and, from older versions,
# ".<name>.<random>" for the files a run writes).
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}(\.tmp)?")


class ArtefactError(HmtrecError):
    """A run-directory file that cannot be read or written: one line naming the file and the remedy."""

    def __init__(self, path: str | Path, problem: str, remedy: str = ""):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}" + (f"; {remedy}" if remedy else ""))


# ---- names -------------------------------------------------------------------------------------

def check_label(label: Any, where: str = "label") -> str:
    """A model label becomes a folder name and a log field: letters, digits and `_ . + -`, starting
    with a letter or digit (so no `..`, no `/`, no newline), at most 100 characters."""
    text = str(label)
    if not _LABEL.fullmatch(text) or ".." in text:
        raise ConfigError(f"key {where!r}: {text!r} is not a plain name (letters, digits and _ . + -, "
                          f"starting with a letter or digit, no '..', at most 100 characters)")
    return text


def config_hash(config_dump: dict, ignored: Iterable[str] = RESUMABLE_CHANGES) -> str:
    """A short hash of the resolved config without the keys a resumed run may change."""
    flat = {key: value for key, value in flatten(config_dump).items() if not _ignored(key, ignored)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


def default_run_dir(config, config_path: str | Path | None = None, root: str | Path = "runs") -> Path:
    """runs/<config file stem or kind>-<config hash>: the same command lands in the same folder
    (and resumes), a changed config in a new one."""
    dump = config.model_dump(mode="json")
    stem = Path(config_path).stem if config_path is not None else dump.get("kind", "run")
    return Path(root) / f"{check_label(stem, 'config file name')}-{config_hash(dump, _resumable(config))}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.0.c": value} of nested mappings and lists (an empty one is a value itself)."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _ignored(key: str, ignored: Iterable[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in ignored)


def _with_current_defaults(saved: dict) -> dict:
    """A saved config as this version resolves it: a key added since, at its default, changes
    nothing the run did. A config this version no longer accepts is compared as it was saved."""
    from hmtrec.config import build_config
    from hmtrec.models.registry import saved_config_as_trained

    try:
        return build_config(saved_config_as_trained(saved)).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an unreadable old config is compared key by key below
        return saved


def _resumable(config) -> tuple[str, ...]:
    return RESUMABLE_CHANGES + tuple(getattr(type(config), "resumable_changes", ()))


def versions() -> dict[str, str]:
    import torch

    import hmtrec

    return {"hmtrec": getattr(hmtrec, "__version__", "unknown"), "torch": torch.__version__,
            "python": platform.python_version()}


# ---- writing -----------------------------------------------------------------------------------

def _write_error(path: Path, error: OSError) -> ArtefactError:
    if error.errno == errno.ENOSPC:
        remedy = "the disk is full: free some space and rerun (a training run resumes)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = "no permission to write there: choose another --run-dir or fix the folder's permissions"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        remedy = "a file stands where a folder is needed: choose another --run-dir"
    else:
        remedy = "check the folder and rerun"
    return ArtefactError(path, f"cannot write ({error.strerror or error})", remedy)


def make_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtefactError(path, "is a file, not a folder", "give a folder (new or a run directory) as --run-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(path, error) from None
    return path


def atomic_write_bytes(path: str | Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a torn
    file, and a symlink at `path` is replaced, never written through."""
    path = Path(path)
    make_dir(path.parent)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(handle)
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes files private; a run's files are not
        os.replace(temporary, path)
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    def write(temporary):
        with open(temporary, "w") as f:
            f.write(text)
    atomic_write_bytes(path, write)


def write_json(path: str | Path, data: Any) -> None:
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
    atomic_write_bytes(path, write)


def write_frame(path: str | Path, frame, **to_csv) -> None:
    """A pandas frame as CSV, atomically."""
    atomic_write_bytes(path, lambda temporary: frame.to_csv(temporary, index=False, **to_csv))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_weights(path: str | Path, state_dict: dict) -> None:
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    atomic_write_bytes(path, lambda temporary: save_file(tensors, temporary))


def save_tensors(path: str | Path, data: dict) -> None:
    """torch.save of tensors and plain containers only, read back with weights_only=True."""
    import torch

    atomic_write_bytes(path, lambda temporary: torch.save(data, temporary))


def remove_temporary_files(root: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left (".checkpoint.pt.ab12cd34.tmp", ...)."""
    removed = []
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            if name != LOCK_FILE and _TEMPORARY.fullmatch(name):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ---- reading -----------------------------------------------------------------------------------

def _read(path: Path, what: str, read: Callable[[Path], Any], remedy: str) -> Any:
    if not path.exists():
        raise ArtefactError(path, f"{what} is missing", remedy)
    if path.is_dir():
        raise ArtefactError(path, f"is a folder, not {what}", remedy)
    try:
        return read(path)
    except OSError as error:
        raise ArtefactError(path, f"cannot read {what} ({error.strerror or error})", remedy) from None
    except Exception as error:  # any parser's complaint: the file is not what it should be
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtefactError(path, f"not a valid {what} ({type(error).__name__}: {reason[:200]})", remedy) from None


def read_json(path: str | Path, remedy: str = "the file is damaged: rerun the command that wrote it") -> Any:
    def read(p):
        with open(p) as f:
            return json.load(f)
    return _read(Path(path), "JSON file", read, remedy)


def load_weights(path: str | Path, remedy: str = "the weights are damaged: retrain the model "
                                                 "(rerun `hmtrec train` with the same run directory)") -> dict:
    from safetensors.torch import load_file

    return _read(Path(path), "safetensors file", lambda p: load_file(str(p)), remedy)


def load_tensors(path: str | Path, remedy: str = "delete it to train this model from the start") -> dict:
    """A checkpoint written by `save_tensors` (weights_only: no pickled code runs)."""
    import torch

    return _read(Path(path), "checkpoint", lambda p: torch.load(p, map_location="cpu", weights_only=True), remedy)


def read_yaml(path: str | Path, remedy: str = "the file is damaged: restore it or rerun `hmtrec train`") -> Any:
    import yaml

    def read(p):
        with open(p) as f:
            return yaml.safe_load(f)
    return _read(Path(path), "YAML file", read, remedy)


# ---- logging -----------------------------------------------------------------------------------

class _OneLineFormatter(logging.Formatter):
    """Control characters in a message are escaped, so nothing logged can start a new line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _open_no_follow(path: Path):
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ArtefactError(path, "is a symbolic link; hmtrec never writes through one",
                                "remove the link (and check who made it)") from None
        raise _write_error(path, error) from None
    return os.fdopen(handle, "a", encoding="utf-8")


def _log_key(path: Path) -> str:
    return os.path.abspath(path / LOG_FILE)


def open_run_dir(path: str | Path) -> Path:
    """Create the folder and attach its log.txt (never through a symlink) to the hmtrec logger."""
    path = make_dir(path)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    key = _log_key(path)
    if not any(getattr(h, "baseFilename", None) == key for h in logger.handlers):
        handler = logging.StreamHandler(_open_no_follow(path / LOG_FILE))
        handler.baseFilename = key
        handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return path


def close_run_dir(path: str | Path) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    key = _log_key(Path(path))
    for handler in list(logger.handlers):
        if getattr(handler, "baseFilename", None) == key:
            handler.close()
            if hasattr(handler, "stream"):
                handler.stream.close()
            logger.removeHandler(handler)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


# ---- locking -----------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # run dir -> [open lock file, holders in this process]


def _acquire(path: Path) -> None:
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    lock_path = path / LOCK_FILE
    try:
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ArtefactError(lock_path, "is a symbolic link; hmtrec never writes through one",
                                "remove the link") from None
        raise _write_error(lock_path, error) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise HmtrecError(f"{path}: another hmtrec process is using this run directory (its {LOCK_FILE} is "
                          f"locked); wait for it to finish or choose another --run-dir") from None
    _HELD[key] = [handle, 1]


def _release(path: Path) -> None:
    key = os.path.abspath(path)
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        os.close(_HELD.pop(key)[0])  # closing the descriptor drops the flock


# ---- the run directory -------------------------------------------------------------------------

class RunDir:
    """Named paths of one run directory and its run-info record (run.json)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info: dict = {}
        self._open = False

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def info_path(self) -> Path:
        return self.path / RUN_INFO

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def file(self, name: str) -> Path:
        return self.path / check_label(name, "file name")

    def model_dir(self, label: str, main_label: str | None = None) -> Path:
        """Where a model's checkpoint and weights live: the run directory for the main model,
        baselines/<label> for the others."""
        label = check_label(label, "model label")
        if label == main_label:
            return self.path
        directory = self.path / BASELINES_DIR / label
        for folder in (self.path / BASELINES_DIR, directory):
            if folder.is_symlink():
                raise ArtefactError(folder, "is a symbolic link; hmtrec never writes through one", "remove the link")
        return directory

    # reading
    def exists(self) -> bool:
        return self.info_path.exists()

    def read_info(self, expected_kind: str | None = None) -> dict:
        """run.json, checked: a mapping with a known `kind` (and the expected one, when given)."""
        if not self.path.exists():
            raise ArtefactError(self.path, "does not exist", "give a run directory written by `hmtrec train`")
        if not self.path.is_dir():
            raise ArtefactError(self.path, "is a file, not a run directory",
                                "give a run directory written by `hmtrec train`")
        if not self.info_path.exists():
            raise ArtefactError(self.path, f"is not a run directory (no {RUN_INFO})",
                                "give a run directory written by `hmtrec train`")
        info = read_json(self.info_path, "the run record is damaged: retrain into a new run directory")
        if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
            raise ArtefactError(self.info_path, "records no 'kind' (sequence, ranking, geo)",
                                "the run record is damaged: retrain into a new run directory")
        if expected_kind is not None and info["kind"] != expected_kind:
            raise ArtefactError(self.path, f"holds a {info['kind']!r} run, not a {expected_kind!r} run",
                                f"give a {expected_kind} run directory")
        self.info = info
        return info

    @property
    def kind(self) -> str:
        return (self.info or self.read_info())["kind"]

    @property
    def status(self) -> str | None:
        return (self.info or self.read_info()).get("status")

    def require_done(self, consumer: str) -> dict:
        """The run finished (its status, written last, says so): its outputs are complete."""
        info = self.read_info()
        if info.get("status") != DONE:
            state = f"status {info['status']!r}" if info.get("status") else "no completion status"
            raise ArtefactError(self.path, f"the run has {state}, so its outputs may be incomplete and "
                                f"{consumer} will not use them",
                                "rerun `hmtrec train` with the same config and --run-dir to finish it")
        return info

    def read_config(self, overrides: list[str] | None = None):
        """The run's resolved config (validated again), with `overrides` applied."""
        from hmtrec.config import build_config, parse_overrides, _set_dotted

        raw = read_yaml(self.config_path)
        if not isinstance(raw, dict):
            raise ArtefactError(self.config_path, "is not a config mapping",
                                "the file is damaged: restore it or rerun `hmtrec train`")
        from hmtrec.models.registry import saved_config_as_trained

        raw = saved_config_as_trained(raw)
        for key, value in parse_overrides(overrides):
            _set_dotted(raw, key, value)
        return build_config(raw, str(self.config_path))

    # writing
    @classmethod
    def begin(cls, path: str | Path, config, *, models: Iterable[str] = (), refittable: Iterable[str] = (),
              **extra) -> "RunDir":
        """Open a run directory for training `config`: check it holds nothing or the same run (kind
        and resolved config, but for the `refittable` keys of a refit) before writing anything, take
        its lock, remove a killed run's temporary files, attach the log, then write config.yaml and
        run.json (status "training")."""
        run = cls(path)
        kind = config.kind
        models = [check_label(label, "model label") for label in models]
        refittable = tuple(refittable)
        run.check_same_run(config, refittable)
        make_dir(run.path)
        _acquire(run.path)
        try:
            run.check_same_run(config, refittable)  # again, now that no other process can write it
            removed = remove_temporary_files(run.path)
            open_run_dir(run.path)
            run._open = True
            if removed:
                get_logger().info("removed %d temporary file(s) left by an interrupted run", len(removed))
            dump = config.model_dump(mode="json")
            from hmtrec.config import dump_config

            dump_config(config, run.config_path)
            run.info = {"kind": kind, "models": models, "status": TRAINING, "versions": versions(),
                        "config_hash": config_hash(dump, _resumable(config)), **extra}
            write_json(run.info_path, run.info)
        except BaseException:
            run.close()
            raise
        return run

    def check_same_run(self, config, refittable: Iterable[str] = ()) -> None:
        """Refuse a folder that is a file, or holds a run of another kind or another resolved config
        (`refittable`: keys a refit may change besides the resumable ones)."""
        if self.path.exists() and not self.path.is_dir():
            raise ArtefactError(self.path, "is a file, not a folder", "give a folder (new or a run directory)")
        if not self.path.exists():
            return
        kind = config.kind
        if self.info_path.exists():
            saved_kind = self.read_info()["kind"]
            if saved_kind != kind:
                raise ConfigError(f"{self.path} holds a {saved_kind!r} run; a {kind!r} config cannot be trained "
                                  f"into it: use another --run-dir")
        if not self.config_path.exists():
            return
        saved = read_yaml(self.config_path)
        if not isinstance(saved, dict):
            raise ArtefactError(self.config_path, "is not a config mapping", "use another --run-dir")
        current = config.model_dump(mode="json")
        if saved.get("kind", kind) != kind:
            raise ConfigError(f"{self.path} holds a {saved.get('kind')!r} run; a {kind!r} config cannot be "
                              f"trained into it: use another --run-dir")
        ignored = _resumable(config) + tuple(refittable)
        old, new = flatten(_with_current_defaults(saved)), flatten(current)
        different = sorted(key for key in set(old) | set(new)
                           if not _ignored(key, ignored) and old.get(key, _MISSING) != new.get(key, _MISSING))
        if different:
            shown = ", ".join(different[:12]) + (" ..." if len(different) > 12 else "")
            post = tuple(getattr(config, "refit_keys", lambda: ())())
            hint = ("; only keys fitted after training differ: `hmtrec refit RUN --set KEY=VALUE` refits them on "
                    "the trained weights") if post and all(_ignored(key, post) for key in different) else ""
            raise ConfigError(f"{self.path} holds a run with a different config (differs in: {shown}); "
                              f"use another --run-dir, or the same config to resume{hint}")

    def update(self, **fields) -> None:
        self.info.update(fields)
        write_json(self.info_path, self.info)

    def finish(self, **fields) -> None:
        """Mark the run done: the last write of a run, after every output file."""
        self.update(**fields, status=DONE)

    def close(self) -> None:
        if self._open:
            close_run_dir(self.path)
            self._open = False
        _release(self.path)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # a consumer that writes (evaluate, calibrate): same lock and log
    @classmethod
    def open_existing(cls, path: str | Path, expected_kind: str | None = None) -> "RunDir":
        run = cls(path)
        run.read_info(expected_kind)
        _acquire(run.path)
        try:
            open_run_dir(run.path)
            run._open = True
        except BaseException:
            _release(run.path)
            raise
        return run


_MISSING = object()
