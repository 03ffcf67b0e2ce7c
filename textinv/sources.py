"""Where an embedding comes from, resolved to local files for the safe readers of :mod:`textinv.formats`.

Every command and function that accepts an embedding passes what the user gave through
:func:`resolve`, so all of them accept the same things and fail with the same one-line messages:

- a file, a diffusers SDXL folder or a library folder (a training run inside a library counts once,
  as its final embedding);
- a training run folder (``runs/NAME``): its final embedding; ``RUN@STEP`` one of its saves
  (``@final`` the final one); the demo's output folder stands for the run in its ``run/``;
- a Hugging Face Hub id: ``user/repo`` (its embedding file), ``user/repo/sub/file.safetensors``;
- an ``http(s)://`` URL (a hub ``resolve/`` URL is read through the hub's own cache).

Downloads go to the Hugging Face cache (``HF_HUB_CACHE``) and obey its offline mode
(``HF_HUB_OFFLINE=1``); what is downloaded is read by the same readers as a local file, never
trusted more.  A local path that exists always wins over a hub id spelled the same.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import huggingface_hub
from huggingface_hub import HfApi, constants, is_offline_mode, scan_cache_dir
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from . import formats, runs
from .atomic import atomic_path
from .errors import EmbeddingFileError, TextinvError

# An embedding is kB to a few MB; a larger download is a checkpoint or a LoRA (the readers refuse those too).
MAX_DOWNLOAD_BYTES = formats.MAX_FILE_BYTES
URL_FOLDER = "textinv-urls"  # under HF_HUB_CACHE: one folder per URL, named by the URL's hash
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # diffusers' load_textual_inversion order
HUB_SUFFIXES = (".safetensors", ".bin", ".pt")  # a repo's images are samples, not cards: not candidates there
# Files in a hub repo that are model weights or training leftovers, never an embedding.
MODEL_STEMS = {"pytorch_model", "model", "diffusion_pytorch_model", "adapter_model", "optimizer", "scheduler",
               "rng_state", "training_args", "state"}
MODEL_FOLDERS = {"unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "controlnet",
                 "safety_checker", "image_encoder", "prior", "decoder"}
_PART = re.compile(r"[A-Za-z0-9][\w.-]*")
_HUB_HOSTS = {"huggingface.co", "hf.co"}


@dataclass(frozen=True)
class Source:
    """An embedding source resolved to what the readers read.

    ``path``: a file, a diffusers SDXL folder or a library folder.  ``name``: the trigger when the
    file's own name is no name (a run's step save ``NAME-200``, diffusers' ``learned_embeds``).
    ``run``: the training run the source stands for (eval measures all its saves), ``step`` set for
    ``RUN@STEP``.  ``label``: how output names the source, as the user wrote it, never a cache path."""

    spec: str
    path: Path
    name: str | None = None
    run: Path | None = None
    step: int | None = None
    label: str = ""
    remote: bool = False

    def shown(self, emb) -> str:
        """How output names the place ``emb`` came from: the label, or its file in a library folder."""
        if emb.path is None or Path(emb.path) == self.path:
            return self.label or self.spec
        return str(emb.path)


def resolve(spec) -> Source:
    """What ``spec`` (a path, ``RUN@STEP``, a hub id or a URL) names, downloaded if need be.

    Raises a one-line :class:`TextinvError` naming ``spec`` as given when it names nothing usable."""
    if isinstance(spec, Source):
        return spec
    text = os.fspath(spec)
    path = Path(text)
    if path.exists():
        return _local(text, path)
    base, at, step = text.rpartition("@")
    if at and base and Path(base).exists():
        return _at_step(text, Path(base), step)
    if text.startswith(("https://", "http://")):
        return _url(text)
    hub = _hub_id(text)
    if hub is not None:
        return _hub(text, *hub)
    raise TextinvError(f"{text}: no such file or folder")


def load_all(path, *, on_error=None) -> list:
    """Every embedding in a file or library folder (:func:`textinv.formats.load_all`), where a
    training run counts once, as its final embedding (never its state, log or step saves)."""
    return formats.load_all(path, on_error=on_error, stands_for=runs.in_library)


def load(spec, *, on_error=None) -> list:
    """Every embedding ``spec`` names (see :func:`resolve`; a library folder gives several).
    ``on_error(path, err)``: as in :func:`textinv.formats.load_all`, for broken files in a folder."""
    src = resolve(spec)
    with _relabelled(src):
        found = load_all(src.path, on_error=on_error)
    if src.name and len(found) == 1 and found[0].name == _own_name(src.path):
        found[0].name = src.name
    return found


def load_one(spec, *, name: str | None = None, select: str | None = None):
    """The one embedding ``spec`` names (``select``: a name in a LoRA bundle); a folder of several is an error."""
    src = resolve(spec)
    path = src.path
    if src.run is not None and path.is_dir() and not formats.is_embedding_candidate(path):
        path = runs.final(src.run) or path  # the demo's output folder: its run's final embedding
    with _relabelled(src):
        emb = formats.load(path, select=select)
    if name:
        emb.name = name
    elif src.name and emb.name == _own_name(src.path):
        emb.name = src.name
    return emb


def warn_skipped(path, err) -> None:
    """``on_error`` for library scans: warn about a broken file and go on."""
    msg, where = str(err), formats.printable(path)
    warnings.warn(f"skipped {msg}" if msg.startswith(where) else f"skipped {where}: {msg}", stacklevel=3)


def _steps_text(saves, final) -> str:
    return ", ".join(f"{s} (final)" if p == final else str(s) for s, p in saves)


def _local(text: str, path: Path) -> Source:
    if runs.is_state_file(path):
        raise TextinvError(f"{text}: a training run's state (for --resume), not an embedding; "
                           f"give the run folder {path.parent} for its final embedding")
    run = runs.folder_of(path)
    if run is None:
        return Source(text, path, label=text)
    if run != path:  # the demo's output folder: its library scan finds the run's final embedding
        return Source(text, path, run=run, label=text)
    final = runs.final(run)
    if final is None:
        try:
            _, saves = runs.saves(run)
        except TextinvError:
            saves = []
        hint = f"; pick a save with {text}@STEP (saved steps: {_steps_text(saves, None)})" if saves else ""
        raise TextinvError(f"{text}: this training run has no final embedding yet{hint}")
    return Source(text, final, run=run, label=str(final))


def _at_step(text: str, base: Path, step: str) -> Source:
    run = runs.folder_of(base)
    if run is None:
        raise TextinvError(f"{text}: @STEP picks a save of a training run, and {base} is not a run folder")
    cfg, saves = runs.saves(run)
    final = runs.final(run, cfg)
    steps = _steps_text(saves, final)
    if step.lower() in ("final", "last"):
        if final is None:
            raise TextinvError(f"{text}: this run has no final embedding yet (saved steps: {steps})")
        return Source(text, final, run=run, step=dict((p, s) for s, p in saves)[final], label=text)
    if not step.isdigit():
        raise TextinvError(f"{text}: after @ give a step number or 'final' (saved steps: {steps})")
    path = dict(saves).get(int(step))
    if path is None:
        raise TextinvError(f"{text}: no save at step {int(step)} in this run (saved steps: {steps})")
    name = None if path == final else formats.file_stem(cfg.token)  # NAME-200 is triggered by NAME, as the final
    return Source(text, path, name=name, run=run, step=int(step), label=text)


def _own_name(path: Path) -> str:
    """The name a reader gives an embedding that stores none: its file's stem, a folder's name."""
    return path.name if path.is_dir() else path.stem


class _relabelled:
    """Errors about a downloaded file name the source as the user wrote it, not the cache path."""

    def __init__(self, src: Source):
        self.src = src

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if self.src.remote and isinstance(err, EmbeddingFileError):
            where = formats.printable(self.src.path)
            raise type(err)(str(err).replace(where, self.src.label)) from None
        return False


# --------------------------------------------------------------------------- Hugging Face Hub
def _hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, file in the repo or None) when ``text`` reads as a hub id rather than a missing local path."""
    if text.startswith((".", "~")) or os.path.isabs(text) or "\\" in text or ":" in text:
        return None
    parts = text.rstrip("/").split("/")
    if len(parts) < 2 or not all(_PART.fullmatch(p) for p in parts) or Path(parts[0]).is_dir():
        return None  # the first part is a local folder: a missing file in it, not a hub id
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if len(parts) == 2:
        return None if Path(parts[1]).suffix.lower() in formats.CANDIDATE_SUFFIXES else (repo_id, None)
    return (repo_id, "/".join(parts[2:])) if Path(parts[-1]).suffix.lower() in formats.CANDIDATE_SUFFIXES else None


def _hub(text: str, repo_id: str, filename: str | None, revision: str | None = None, repo_type: str = "model",
         url: bool = False) -> Source:
    sizes: dict = {}
    if filename is None:
        sizes = _repo_files(text, repo_id, revision, url)
        chosen = _choose(text, repo_id, sizes)
    else:
        chosen = [filename]
    paths = [_hub_file(text, repo_id, f, revision, repo_type, sizes.get(f), url) for f in chosen]
    # diffusers' SDXL pair (learned_embeds + learned_embeds_2) is read as the folder holding both
    path = paths[0].parent if len(paths) == 2 else paths[0]
    label = f"{repo_id}/{chosen[0]}" if filename is None and len(chosen) == 1 and not url else text
    # diffusers' learned_embeds names no concept (its trigger is stored inside): the repo's name does
    plain = len(paths) == 2 or Path(chosen[0]).stem in formats.DIFFUSERS_SDXL_STEMS
    return Source(text, path, name=repo_id.split("/")[1] if plain else None, label=label, remote=True)


def _not_found(text: str, problem: str, url: bool) -> TextinvError:
    return TextinvError(f"{text}: {problem}" if url else f"{text}: no such file or folder here, and {problem}")


def _offline_hint() -> str:
    return "HF_HUB_OFFLINE=1 forbids downloading it (unset HF_HUB_OFFLINE, or give a local file)"


def _repo_files(text: str, repo_id: str, revision: str | None, url: bool) -> dict[str, int | None]:
    """The repo's files with their sizes (None: unknown): from the Hub, else from the local cache."""
    why = None
    if not is_offline_mode():
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            return {s.rfilename: s.size for s in info.siblings or []}
        except GatedRepoError:
            raise _not_found(text, f"the Hugging Face repo {repo_id} is gated: accept its terms on its page and log in "
                                   "(hf auth login)", url) from None
        except RepositoryNotFoundError:
            raise _not_found(text, f"no Hugging Face model repo {repo_id} (a private one needs hf auth login)", url) from None
        except HfHubHTTPError as e:
            why = f"the Hugging Face Hub answered: {formats.printable(' '.join(str(e).split()))[:200]}"
        except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, TLS: fall back on the cache
            why = f"the Hugging Face Hub cannot be reached ({type(e).__name__})"
    cached = _cached_files(repo_id, revision)
    if cached:
        return dict.fromkeys(cached)
    if why is None:
        raise _not_found(text, f"{repo_id} is not in the local Hugging Face cache; {_offline_hint()}", url)
    raise _not_found(text, f"{why}, and {repo_id} is not in the local Hugging Face cache", url)


def _cached_files(repo_id: str, revision: str | None) -> list[str]:
    """The files of a model repo's cached snapshot (of ``revision``, default main), as repo paths."""
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - no cache folder yet
        return []
    want = revision or "main"
    for repo in cache.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        revs = [r for r in repo.revisions if want in r.refs or r.commit_hash == want]
        if not revs and revision is None and len(repo.revisions) == 1:
            revs = list(repo.revisions)
        if revs:
            return sorted(f.file_path.relative_to(revs[0].snapshot_path).as_posix() for f in revs[0].files)
    return []


def _looks_like_embedding(name: str) -> bool:
    parts = name.split("/")
    stem = parts[-1].split(".")[0].lower()
    return (Path(name).suffix.lower() in HUB_SUFFIXES and stem not in MODEL_STEMS
            and not any(p.startswith(".") for p in parts) and parts[0].lower() not in MODEL_FOLDERS)


def _choose(text: str, repo_id: str, sizes: dict[str, int | None]) -> list[str]:
    """The repo's embedding: diffusers' file names first (with learned_embeds_2: the SDXL pair), else the only candidate."""
    for first in DIFFUSERS_FILES:
        if first in sizes:
            second = first.replace("learned_embeds", "learned_embeds_2")
            return [first, second] if second in sizes else [first]
    found = sorted(f for f in sizes if _looks_like_embedding(f))
    fit = [f for f in found if sizes[f] is None or sizes[f] <= MAX_DOWNLOAD_BYTES]
    if len(fit) == 1:
        return fit
    if fit:
        raise TextinvError(f"{text}: {len(fit)} embedding files in the Hugging Face repo; give one as "
                           f"{repo_id}/FILE: {', '.join(fit)}")
    if found:
        raise TextinvError(f"{text}: every candidate file in {repo_id} is larger than {MAX_DOWNLOAD_BYTES >> 20} MB, "
                           f"too large for an embedding (a checkpoint or LoRA repo?): {', '.join(found)}")
    held = ", ".join(sorted(sizes)[:8]) + (", …" if len(sizes) > 8 else "")
    raise TextinvError(f"{text}: the Hugging Face repo {repo_id} holds no embedding file (.safetensors, .bin, .pt)"
                       + (f"; it holds {held}" if sizes else ""))


def _hub_file(text: str, repo_id: str, filename: str, revision: str | None, repo_type: str, size: int | None,
              url: bool) -> Path:
    """One repo file through ``hf_hub_download`` (its cache, its offline mode), refused when too large."""
    where = f"{repo_id}/{filename}"
    kw = dict(repo_id=repo_id, filename=filename, revision=revision, repo_type=repo_type, cache_dir=constants.HF_HUB_CACHE)
    try:
        if not is_offline_mode():
            if size is None:
                size = _download_size(huggingface_hub.hf_hub_download, kw)
            if size is not None and size > MAX_DOWNLOAD_BYTES:
                raise TextinvError(f"{text}: {where} is {size / 2**20:.0f} MB, larger than an embedding can be "
                                   f"(limit {MAX_DOWNLOAD_BYTES >> 20} MB; a checkpoint or LoRA?): not downloaded")
        return Path(huggingface_hub.hf_hub_download(**kw))
    except TextinvError:
        raise
    except LocalEntryNotFoundError:
        if is_offline_mode():
            raise _not_found(text, f"{where} is not in the local Hugging Face cache; {_offline_hint()}", url) from None
        raise _not_found(text, f"the Hugging Face Hub cannot be reached, and {where} is not in the local cache", url) from None
    except GatedRepoError:
        raise _not_found(text, f"the Hugging Face repo {repo_id} is gated: accept its terms on its page and log in "
                               "(hf auth login)", url) from None
    except RepositoryNotFoundError:
        raise _not_found(text, f"no Hugging Face {repo_type} repo {repo_id} (a private one needs hf auth login)", url) from None
    except RevisionNotFoundError:
        raise _not_found(text, f"the Hugging Face repo {repo_id} has no revision {revision}", url) from None
    except EntryNotFoundError:
        raise _not_found(text, f"the Hugging Face repo {repo_id} has no file {filename}", url) from None
    except HfHubHTTPError as e:
        raise TextinvError(f"{text}: the Hugging Face Hub answered: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # noqa: BLE001 - network, proxy, TLS, a full disk: one line, not a traceback
        raise TextinvError(f"{text}: cannot download {where} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _download_size(hf_hub_download, kw) -> int | None:
    """The file's size before downloading it (None when cached or unknown)."""
    try:
        info = hf_hub_download(**kw, dry_run=True)
    except TypeError:  # a huggingface_hub without dry runs: the readers' own size limits still apply
        return None
    return None if info.is_cached else info.file_size


# ------------------------------------------------------------------------------------- URLs
def _url(text: str) -> Source:
    hub = _hub_url(text)
    if hub is not None:
        repo_id, filename, revision, repo_type = hub
        return _hub(text, repo_id, filename, revision, repo_type, url=True)
    path = download(text)
    return Source(text, path, label=text, remote=True)


def _hub_url(text: str) -> tuple[str, str | None, str | None, str] | None:
    """(repo id, file, revision, repo type) of a hub page or ``resolve/``/``blob/`` file URL, else None."""
    u = urlparse(text)
    if u.netloc.lower() not in _HUB_HOSTS | {urlparse(constants.ENDPOINT).netloc.lower()}:
        return None
    parts = [unquote(p) for p in u.path.split("/") if p]
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces"):
        repo_type, parts = parts[0][:-1], parts[1:]
    if len(parts) == 2 and repo_type == "model":
        return "/".join(parts), None, None, repo_type
    if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
        return "/".join(parts[:2]), "/".join(parts[4:]), parts[3], repo_type
    return None


def download_folder(url: str) -> Path:
    """Where a plain URL's download is kept: a folder of the hub cache named by the URL's hash."""
    return Path(constants.HF_HUB_CACHE) / URL_FOLDER / hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def download(url: str) -> Path:
    """A URL's file, downloaded once into :func:`download_folder` (atomically, at most
    :data:`MAX_DOWNLOAD_BYTES`; offline only from there).  A URL is taken not to change: delete its
    folder to fetch it again."""
    folder = download_folder(url)
    kept = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")] if folder.is_dir() else []
    if len(kept) == 1:
        return kept[0]
    if is_offline_mode():
        raise TextinvError(f"{url}: not downloaded yet; {_offline_hint()}")
    too_large = f"{url}: larger than an embedding can be (limit {MAX_DOWNLOAD_BYTES >> 20} MB; a checkpoint or LoRA?): not downloaded"
    try:
        with huggingface_hub.get_session().stream("GET", url, follow_redirects=True, timeout=30) as r:
            if r.status_code != 200:
                raise TextinvError(f"{url}: cannot download (HTTP {r.status_code})")
            declared = str(r.headers.get("content-length", ""))
            if declared.isdigit() and int(declared) > MAX_DOWNLOAD_BYTES:
                raise TextinvError(too_large)
            dest = folder / _file_name(url, r.headers.get("content-disposition"))
            with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                got = 0
                for chunk in r.iter_bytes():
                    got += len(chunk)
                    if got > MAX_DOWNLOAD_BYTES:
                        raise TextinvError(too_large)
                    f.write(chunk)
    except TextinvError:
        _remove_if_empty(folder)
        raise
    except Exception as e:  # noqa: BLE001 - network, proxy, TLS errors of whichever HTTP library: one line
        _remove_if_empty(folder)
        raise TextinvError(f"{url}: cannot download ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return dest


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _file_name(url: str, disposition: str | None) -> str:
    """The download's file name (its stem is the trigger, as for any file): the server's, else the URL's last part."""
    name = ""
    if disposition:
        m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", disposition) or re.search(r'filename\s*=\s*"?([^";]+)"?', disposition)
        if m:
            name = unquote(m.group(1).strip())
    if not name:
        name = unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    name = formats.file_stem(name.replace("\\", "/").rsplit("/", 1)[-1])
    stem, suffix = os.path.splitext(name)
    return stem[:100] + suffix[:20]
