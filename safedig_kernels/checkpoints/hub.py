"""Directories and the Hugging Face Hub: `write_pretrained` writes this project's format as
`directory/safedig_sae.safetensors` (`TopKSAE.save_pretrained`, a Hub repo's layout);
`read_pretrained` reads any format from a local path, an `"owner/name"` repo id or an
`hf://owner/name[/subfolder][@revision]` name (`TopKSAE.from_pretrained`, steering configs).
huggingface_hub is imported only when a repo is read, and only the files an SAE is made of are
downloaded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from ._checks import CheckpointError, DeviceLike, DTypeLike, PathLike, as_path
from ._foreign import CFG_FILENAME
from .detect import detect_format, read_sae
from .saelens import SAELENS_SCALER, SAELENS_WEIGHTS
from .safedig import PRETRAINED_WEIGHTS, header_json, write_safedig
from .sparsify import SPARSIFY_WEIGHTS
from .weights import SAEWeights

HUB_SCHEME = "hf://"
HUB_EXTRA = "pip install 'safedig-kernels[diffusers]'"
# What a repo (or its subfolder) may hold of an SAE: only these are downloaded.
_HUB_FILES = (PRETRAINED_WEIGHTS, CFG_FILENAME, SAELENS_WEIGHTS, SAELENS_SCALER, SPARSIFY_WEIGHTS)
_HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")  # the Hub's owner/name rules
_HUB_FORM = "hf://owner/name[/subfolder][@revision]"


def write_pretrained(directory: PathLike, weights: SAEWeights) -> Path:
    """Write `weights` as `directory/safedig_sae.safetensors` (this project's format, atomic),
    the layout `read_pretrained` reads and a Hub repo (or one subfolder of it) holds. The
    header holds k, the harmful set, strengths and metadata, so no other file is needed.
    Makes the directory; refuses one holding a SAELens or sparsify checkpoint (a mix would be
    ambiguous). Returns the file's path."""
    if not isinstance(weights, SAEWeights):
        raise TypeError(f"weights must be SAEWeights, got {type(weights).__name__}")
    d = as_path(directory, "directory")
    if d.exists() and not d.is_dir():
        raise CheckpointError(d, None, f"exists and is not a directory; save_pretrained writes a directory "
                                       f"holding {PRETRAINED_WEIGHTS} (TopKSAE.save writes one file)")
    foreign = [n for n in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) if (d / n).exists()]
    if foreign:
        raise CheckpointError(d, None, f"already holds {foreign[0]} (a SAELens or sparsify checkpoint); writing "
                                       f"{PRETRAINED_WEIGHTS} next to it would make the directory ambiguous")
    header_json(weights)  # refuse unsavable metadata before making the directory
    d.mkdir(parents=True, exist_ok=True)
    write_safedig(d / PRETRAINED_WEIGHTS, weights)
    return d / PRETRAINED_WEIGHTS


def is_hub_uri(name: Any) -> bool:
    """Whether `name` is a string naming an SAE on the Hub (`hf://...`)."""
    return isinstance(name, str) and name.startswith(HUB_SCHEME)


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(_HUB_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts)


def _check_subfolder(subfolder: Any, argument: str) -> Optional[str]:
    if subfolder is None:
        return None
    if not isinstance(subfolder, str):
        raise TypeError(f"{argument} must be a str (a folder inside the repo), got {type(subfolder).__name__}")
    parts = subfolder.strip("/").split("/")
    if subfolder.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{argument} must be a relative folder inside the repo without '.', '..' or empty "
                         f"parts, got {subfolder!r}")
    return "/".join(parts)


def _check_revision(revision: Any, argument: str) -> Optional[str]:
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise TypeError(f"{argument} must be a non-empty str (a branch, tag or commit), got {revision!r}")
    return revision


def parse_hub_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(repo_id, subfolder, revision) of `"hf://owner/name[/subfolder][@revision]"`. The
    revision follows the first `@` and may hold `/` (`@refs/pr/3`); repo names never hold `@`."""
    if not is_hub_uri(uri):
        raise CheckpointError(repr(uri), None, f"expected a str of the form {_HUB_FORM}")
    path, at, revision = uri[len(HUB_SCHEME):].partition("@")
    parts = path.split("/")
    if len(parts) < 2 or not _is_repo_id("/".join(parts[:2])):
        raise CheckpointError(uri, None, f"expected {_HUB_FORM}, with owner and name made of letters, digits, "
                              f"'-', '_' and '.'")
    try:
        subfolder = _check_subfolder("/".join(parts[2:]), "the subfolder") if len(parts) > 2 else None
        revision = _check_revision(revision if at else None, "the revision after '@'")
    except (TypeError, ValueError) as e:
        raise CheckpointError(uri, None, f"{e} (expected {_HUB_FORM})") from None
    return "/".join(parts[:2]), subfolder, revision


def hub_uri(repo_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None) -> str:
    """The `hf://` name of a repo, subfolder and revision (`parse_hub_uri`'s inverse)."""
    return f"{HUB_SCHEME}{repo_id}{'/' + subfolder if subfolder else ''}{'@' + revision if revision else ''}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id: str, subfolder: Optional[str], revision: Optional[str], cache_dir: Optional[PathLike],
                  local_files_only: bool, token: Any) -> tuple[Path, bool]:
    """The local snapshot folder of `repo_id` at `revision`, holding the SAE files of `subfolder`
    that the repo has (downloaded into the Hub cache, or those cached when offline), and
    whether it was found offline."""
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import utils as hub_utils
    except ImportError as e:
        raise ImportError(f"loading an SAE from the Hugging Face Hub ({hub_uri(repo_id, subfolder, revision)}) "
                          f"needs huggingface_hub, which comes with the diffusers extra: {HUB_EXTRA}") from e
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; setting it later must still keep us offline
    offline = bool(local_files_only) or bool(hub_constants.HF_HUB_OFFLINE) or _env_flag("HF_HUB_OFFLINE")
    prefix = f"{subfolder}/" if subfolder else ""
    name = hub_uri(repo_id, subfolder, revision)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            allow_patterns=[prefix + f for f in _HUB_FILES], local_files_only=offline, token=token)
    except hub_utils.LocalEntryNotFoundError as e:
        cache = os.fspath(cache_dir) if cache_dir is not None else hub_constants.HF_HUB_CACHE
        why = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline
               else "the Hub could not be reached")
        raise FileNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'!r}) is not in the local "
                                f"Hugging Face cache {cache} and {why}; download it once online "
                                f"(TopKSAE.from_pretrained({name!r}) or `hf download {repo_id}`)") from e
    except hub_utils.RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r} (a branch, tag or "
                                f"commit)") from e
    except hub_utils.RepositoryNotFoundError as e:  # also private or gated without access
        raise FileNotFoundError(f"Hub repo {repo_id!r} does not exist, or is private or gated and the token "
                                f"given (token=, HF_TOKEN or `hf auth login`) has no access") from e
    return Path(folder), offline


def read_pretrained(repo_id_or_path: Any, *, subfolder: Optional[str] = None, revision: Optional[str] = None,
                    device: Optional[DeviceLike] = None, dtype: Optional[DTypeLike] = None,
                    activation_scale: Optional[float] = None, site: Optional[str] = None,
                    stream: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False, token: Any = None) -> SAEWeights:
    """Read an SAE from a local path or a Hugging Face Hub repo.

    `repo_id_or_path`: an existing local file or directory (this project's file or
    `write_pretrained` directory, a SAELens or sparsify directory: `read_sae`); an
    `"owner/name"` Hub repo id (used when no such local path exists); or `"hf://owner/name
    [/subfolder][@revision]"`. `subfolder` is a folder inside the directory or repo (e.g. one
    sparsify hookpoint), `revision` a branch, tag or commit of the repo. Hub files are
    downloaded into the Hub cache (`cache_dir`, default `HF_HUB_CACHE`) through
    `huggingface_hub.snapshot_download`, only those an SAE is made of; with `HF_HUB_OFFLINE=1`
    or `local_files_only=True` they are read from the cache without network. `token` is
    passed to huggingface_hub (private and gated repos). The rest is `read_sae`'s.
    """
    subfolder = _check_subfolder(subfolder, "subfolder")
    revision = _check_revision(revision, "revision")
    hub = dict(device=device, dtype=dtype, activation_scale=activation_scale, site=site, stream=stream,
               cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if is_hub_uri(repo_id_or_path):
        repo_id, sub, rev = parse_hub_uri(repo_id_or_path)
        for argument, ours, theirs in (("subfolder", subfolder, sub), ("revision", revision, rev)):
            if ours is not None and theirs is not None and ours != theirs:
                raise ValueError(f"{argument}={ours!r} disagrees with the {argument} {theirs!r} in "
                                 f"{repo_id_or_path!r}; give it once")
        return _read_hub(repo_id, subfolder or sub, revision or rev, **hub)
    if isinstance(repo_id_or_path, os.PathLike) or (isinstance(repo_id_or_path, str)
                                                       and (os.path.exists(repo_id_or_path)
                                                            or not _is_repo_id(repo_id_or_path))):
        path = as_path(repo_id_or_path, "repo_id_or_path")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {str(path)!r} is a local path")
        if not path.exists():
            raise FileNotFoundError(f"repo_id_or_path {str(path)!r}: no such file or directory, and not a Hub "
                                    f"repo id ('owner/name') or {_HUB_FORM}")
        return read_sae(path / subfolder if subfolder else path, device=device, dtype=dtype,
                        activation_scale=activation_scale, site=site, stream=stream)
    if isinstance(repo_id_or_path, str):
        try:
            return _read_hub(repo_id_or_path, subfolder, revision, **hub)
        except FileNotFoundError as e:  # the name may have been meant as a local path
            raise FileNotFoundError(f"{e} (nor is there a local path {repo_id_or_path!r})") from e
    raise TypeError(f"repo_id_or_path must be a str (a local path, 'owner/name' or {_HUB_FORM}) or "
                    f"os.PathLike, got {type(repo_id_or_path).__name__}")


def _read_hub(repo_id: str, subfolder: Optional[str], revision: Optional[str], *, device: Optional[DeviceLike],
              dtype: Optional[DTypeLike], activation_scale: Optional[float], site: Optional[str],
              stream: Optional[str], cache_dir: Optional[PathLike], local_files_only: bool,
              token: Any) -> SAEWeights:
    root, offline = _hub_snapshot(repo_id, subfolder, revision, cache_dir, local_files_only, token)
    folder = root / subfolder if subfolder else root
    name = hub_uri(repo_id, subfolder, revision)
    if not folder.is_dir():  # only SAE files are fetched: a folder without any is not there at all
        place = f"folder {subfolder!r}" if subfolder else "root folder"
        cached = " that are in the local cache (offline)" if offline else ""
        raise FileNotFoundError(f"{name}: no SAE files{cached} in the repo's {place} ({', '.join(_HUB_FILES)}); "
                                f"snapshot {root}")
    try:
        detect_format(folder)
    except CheckpointError as e:
        raise CheckpointError(name, e.key, f"holds no SAE this package reads: {e}") from e
    weights = read_sae(folder, device=device, dtype=dtype, activation_scale=activation_scale, site=site,
                       stream=stream)
    if subfolder is None and site is None and weights.metadata.source == "sparsify":
        weights.metadata.site = ""  # the snapshot folder is named after a commit, not the hooked module
    return weights
