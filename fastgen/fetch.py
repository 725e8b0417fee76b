"""Fetch weights from the Hub: plan which files a family's methods load and how big they are, check that
the Hub answers and the disk can hold them, download with progress, and turn every failure into one
sentence the user can act on.

    from fastgen import fetch
    plan = fetch.plan(get_family("sdxl").methods, fetch.HubListing())
    fetch.check_space(plan)
    fetch.download(plan, on_bytes=print)

Resuming: files that finished are in the Hub cache and are not fetched again, so a rerun continues where an
interrupted one stopped, file by file. huggingface_hub 2.4 writes each file to a process-unique
`*.incomplete` temp file and deletes it when the download fails, so a file cut off half-way starts over (within
one run huggingface_hub itself retries a dropped connection from where it stopped). Imports no torch.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastgen import hub

logger = logging.getLogger(__name__)

# A network that drops packets must fail within the 10 s a user waits for "no network": the probe gets 5 s.
PROBE_TIMEOUT = 5.0
# Listing a repo with file sizes is one small request; a slow Hub still answers well within this.
LIST_TIMEOUT = 20.0
_probe_memo: dict[str, tuple[float, str]] = {}  # endpoint -> (time, "" when reachable, else why not)
PROBE_MEMO_SECONDS = 60.0  # the page asks once per build; do not probe again for each family


class DownloadError(RuntimeError):
    """A download that cannot proceed, with one sentence saying why and what to do."""


def endpoint() -> str:
    import huggingface_hub.constants

    return huggingface_hub.constants.ENDPOINT


def hub_problem(timeout: float = PROBE_TIMEOUT, fresh: bool = False) -> str:
    """Why the Hub cannot be used now ("" when it answers): HF_HUB_OFFLINE, or no answer from the endpoint.
    Any HTTP answer counts as reachable; only the transport failing (DNS, refused, timeout) does not."""
    if hub.offline():
        return "HF_HUB_OFFLINE is set, so the Hub is not contacted"
    url = endpoint()
    now = time.monotonic()
    if not fresh and url in _probe_memo and now - _probe_memo[url][0] < PROBE_MEMO_SECONDS:
        return _probe_memo[url][1]
    import httpx2
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
        problem = ""
    except (httpx2.TransportError, OSError) as error:
        problem = f"the Hub at {url} cannot be reached ({_reason(error)})"
    _probe_memo[url] = (now, problem)
    return problem


def check_hub(problem: str | None = None) -> None:
    """Raise DownloadError when the Hub cannot be used now, naming the endpoint and HF_HUB_OFFLINE. `problem`:
    what `hub_problem` just answered (probed afresh when None)."""
    problem = hub_problem(fresh=True) if problem is None else problem
    if not problem:
        return
    if hub.offline():
        raise DownloadError(f"{problem}: unset HF_HUB_OFFLINE (and be online) to download.")
    raise DownloadError(f"{problem}: check the network connection or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 "
                        f"to use only the weights already on this machine.")


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:160]


# --- the plan ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    repo: str
    name: str
    size: int  # bytes
    revision: str | None = None  # the commit its size was read at
    present: bool = False  # already in the Hub cache at that revision

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.name}"


@dataclass(frozen=True)
class Plan:
    """The files each method loads, in method order; a file several methods share is listed under each."""

    methods: tuple[tuple[str, tuple[RemoteFile, ...]], ...]

    @property
    def files(self) -> list[RemoteFile]:
        return list({(f.repo, f.name): f for _, files in self.methods for f in files}.values())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def needed_bytes(self) -> int:
        return sum(f.size for f in self.files if not f.present)

    @property
    def repos(self) -> list[str]:
        return list(dict.fromkeys(f.repo for f in self.files))

    def preload_from_hub(self) -> list[str]:
        """The Space card's `preload_from_hub` entries: "repo_id file1,file2" per repo."""
        return [f"{repo} {','.join(sorted(f.name for f in self.files if f.repo == repo))}" for repo in self.repos]


class HubListing:
    """Repo files and sizes as the Hub lists them now (one `model_info` call per repo)."""

    def __init__(self):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint())
        self._infos = {}

    def _info(self, repo):
        if repo not in self._infos:
            with explain(repo):
                self._infos[repo] = self.api.model_info(repo, files_metadata=True, timeout=LIST_TIMEOUT)
        return self._infos[repo]

    def files(self, repo: str) -> dict[str, int]:
        return {s.rfilename: s.size or 0 for s in self._info(repo).siblings or ()}

    def revision(self, repo: str) -> str | None:
        return self._info(repo).sha

    def model_index(self, repo: str) -> dict:
        from huggingface_hub import hf_hub_download

        with explain(repo, "model_index.json"):
            path = hf_hub_download(repo, "model_index.json", cache_dir=hub.cache_dir(),
                                   endpoint=endpoint(), etag_timeout=LIST_TIMEOUT)
        return hub.read_json(Path(path))

    def present(self, repo: str, name: str) -> bool:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, name, cache_dir=hub.cache_dir(), revision=self.revision(repo))
        return isinstance(found, str)


class CacheListing:
    """The same questions answered from the files already on disk (the Hub cache): no network."""

    def files(self, repo: str) -> dict[str, int]:
        folder = hub.local_folder(repo)
        if folder is None:
            raise DownloadError(f"{repo} is not in the Hub cache at {hub.cache_dir()}.")
        return {name: (folder / name).stat().st_size for name in hub.list_files(folder)}

    def revision(self, repo: str) -> str | None:
        folder = hub.local_folder(repo)
        return folder.name if folder is not None and not hub.is_local(repo) else None

    def model_index(self, repo: str) -> dict:
        return hub.read_json(hub.local_folder(repo) / "model_index.json")

    def present(self, repo: str, name: str) -> bool:
        return True


def plan(methods, listing) -> Plan:
    """The Hub files each method loads, with sizes. Methods whose weights sit in local folders are skipped."""
    rows = []
    for spec in methods:
        if hub.is_local(spec.repo):
            continue
        wanted = [(spec.repo, ["model_index.json"])]
        model_index = listing.model_index(spec.repo)
        sources = {s for recipe in hub.every_step_file([spec])  # a file per step count: all of them
                   for s in hub.method_sources(recipe, model_index).values()}
        for source in sorted(sources, key=lambda s: (s.repo, s.subfolder or "", s.weight_name or "")):
            if hub.is_local(source.repo):
                continue
            names = hub.select_files(list(listing.files(source.repo)), source)
            if not names:
                raise DownloadError(f"{source.repo} no longer has the files {spec.label} loads from it "
                                    f"({source.label}): the repo has changed on the Hub.")
            wanted.append((source.repo, names))
        files = {}
        for repo, names in wanted:
            sizes = listing.files(repo)
            for name in names:
                files[(repo, name)] = RemoteFile(repo, name, sizes.get(name, 0), listing.revision(repo),
                                                 listing.present(repo, name))
        rows.append((spec.name, tuple(files.values())))
    return Plan(tuple(rows))


# --- disk space ------------------------------------------------------------------------------------------

def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds `path` (or, if it does not exist yet, its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def check_space(plan: Plan) -> None:
    """Refuse before the first byte when the cache's disk cannot hold what is still missing."""
    free, needed = free_bytes(hub.cache_dir()), plan.needed_bytes
    if needed > free:
        raise DownloadError(f"not enough disk space: the download needs {size_text(needed)} but {hub.cache_dir()} has "
                            f"{size_text(free)} free; free some space or point HF_HUB_CACHE at a bigger disk.")


# --- the host's cap on visitors' downloads ----------------------------------------------------------------

CUSTOM_MAX_GB = 20.0  # default cap: room for a full-precision SDXL fine-tune (about 14 GB) and its LCM-LoRA


class OverCap(DownloadError):
    """A visitor's custom model or LoRA would download more than the host allows."""


def custom_cap() -> int:
    """Bytes a visitor's custom model or LoRA may download: FASTGEN_CUSTOM_MAX_GB, else CUSTOM_MAX_GB."""
    value = os.environ.get("FASTGEN_CUSTOM_MAX_GB", "").strip()
    try:
        gigabytes = float(value) if value else CUSTOM_MAX_GB
    except ValueError:
        raise DownloadError(f"FASTGEN_CUSTOM_MAX_GB must be a number of gigabytes, got {value!r}") from None
    return int(gigabytes * 1e9)


def check_cap(what: str, needed: int) -> None:
    """Refuse, before the first byte, a visitor's download over the host's cap (FASTGEN_CUSTOM_MAX_GB)."""
    cap = custom_cap()
    if needed > cap:
        raise OverCap(f"{what} needs {size_text(needed)} of downloads, over this server's cap of {size_text(cap)} "
                      "for custom models and LoRAs (its host sets FASTGEN_CUSTOM_MAX_GB)")


def visitor_file(repo: str, name: str) -> Path:
    """One file of a visitor's Hub repo (a style LoRA, a single-file checkpoint), fetched into the Hub cache:
    its size read from the Hub first and held to the host's cap (OverCap). Raises DownloadError saying why."""
    from huggingface_hub import hf_hub_download

    size = HubListing().files(repo).get(name)
    if size is None:
        raise DownloadError(f"{repo} has no file {name}")
    check_cap(f"{repo}/{name}", size)
    with explain(repo, name):
        return Path(hf_hub_download(repo, name, cache_dir=hub.cache_dir(), endpoint=endpoint()))


def size_text(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# --- downloading -----------------------------------------------------------------------------------------

def stale_partials(repos) -> list[Path]:
    """Half-fetched files an interrupted run left in these repos' blobs. huggingface_hub 2.4 names each one
    `<etag>.<random>.incomplete` and never reads it again; one whose lock no running download holds is waste."""
    from filelock import FileLock, Timeout

    cache = Path(hub.cache_dir())
    stale = []
    for repo in repos:
        folder = f"models--{repo.replace('/', '--')}"
        for partial in sorted((cache / folder / "blobs").glob("*.incomplete")):
            lock = cache / ".locks" / folder / f"{partial.name.split('.')[0]}.lock"
            try:
                with FileLock(str(lock), timeout=0):
                    stale.append(partial)
            except Timeout:  # a download running now is writing it
                continue
    return stale


def download(plan: Plan, on_bytes=None) -> list[Path]:
    """Fetch every file of the plan not yet in the cache. `on_bytes(n)` is
    called as bytes arrive (n may be negative when huggingface_hub restarts a file). Returns the fetched paths."""
    from huggingface_hub import hf_hub_download

    received = [0]

    def count(n: int) -> None:
        received[0] += n
        if on_bytes is not None:
            on_bytes(n)

    bar_class = _forwarding_bar(count)
    paths = []
    for item in plan.files:
        if item.present:
            continue
        logger.info("fetching %s (%d bytes)", item.label, item.size)
        received[0] = 0
        with explain(item.repo, item.name):
            # The default revision, not the listed commit: only a "main" download records refs/main, which is how
            # from_pretrained and the missing-weights check find the snapshot afterwards.
            paths.append(Path(hf_hub_download(item.repo, item.name, cache_dir=hub.cache_dir(), endpoint=endpoint(),
                                              tqdm_class=bar_class)))
        if item.size > received[0]:  # identical content was already in the cache (tokenizer_2 = tokenizer)
            count(item.size - received[0])
    return paths


def _forwarding_bar(on_bytes):
    """A tqdm class for huggingface_hub's per-file bars that draws nothing and forwards each update, so the
    caller shows one bar for the whole download."""
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            if n:
                on_bytes(n)
            return super().update(n)

    return Forward


@contextmanager
def explain(repo: str, name: str | None = None):
    """Turn what huggingface_hub and the disk raise into a DownloadError with one actionable sentence."""
    try:
        yield
    except DownloadError:
        raise
    except Exception as error:
        message = describe(error, repo, name)
        if message is None:
            raise
        raise DownloadError(message) from error


def describe(error: BaseException, repo: str, name: str | None = None) -> str | None:
    """One sentence for a failure while fetching `repo` (file `name`), or None for errors we do not know."""
    import httpx2
    from huggingface_hub import errors

    what = f"{repo}/{name}" if name else repo
    page = f"https://huggingface.co/{repo}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, errors.GatedRepoError):
        return f"{repo} is gated: accept its licence on {page} while logged in, then {login}."
    if isinstance(error, errors.DisabledRepoError):
        return f"{repo} has been disabled on the Hub, so it cannot be downloaded."
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"{repo} was not found at {endpoint()}: it is private (then {login} with an account that can "
                f"read it) or it is gone.")
    if isinstance(error, (errors.RemoteEntryNotFoundError, errors.RevisionNotFoundError)):
        return f"{what} is no longer on the Hub (the repo has changed); nothing was left half-written."
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return f"the Hub refused {what} (401 unauthorized): {login} with a valid token."
        if status == 429 or status >= 500:
            return f"the Hub at {endpoint()} answered {status} for {what}: it is busy or down, try again later."
        return (f"{endpoint()} answered {status} for {what} without the Hub's error details: check HF_ENDPOINT and "
                f"any proxy between this machine and the Hub.")
    if isinstance(error, errors.OfflineModeIsEnabled) or hub.offline():
        return f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded: unset it (and be online) to download."
    if isinstance(error, (httpx2.TransportError, errors.LocalEntryNotFoundError, errors.FileMetadataError)):
        return (f"the Hub at {endpoint()} cannot be reached while fetching {what} ({_reason(error)}): check the "
                f"network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the weights on this machine.")
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk filled up while downloading {what} into {hub.cache_dir()}: the partial file was removed "
                f"and the files that finished are kept; free some space and run the same command again to fetch "
                f"the rest.")
    return None
